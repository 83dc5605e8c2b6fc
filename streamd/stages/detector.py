"""The shared detector behind every detect stage: one per loaded model (and device, precision and runtime).

`SharedDetector` batches requests from every stage (every pipeline) that uses the model: requests waiting while a
forward pass runs go together into the next one. Forward passes run in lanes:

- most models have one lane, in the device's executor thread, through Ultralytics' `model.predict`;
- a plain detection model on the CPU has several lanes at once, each running Ultralytics' own steps around the
  forward pass directly (`streamd.stages.lanes`: letterbox, NMS, box scaling), so that decode, preprocessing and the forward
  passes of several frames overlap and one frame never waits for another's. A single-threaded lane (the
  default up to 4 cores) passes one frame at a time: there a batch costs as much per frame as single frames or
  more (its activations outgrow the caches; with 4 streams on 2 cores, lanes of one frame gave 5-7 % more
  frames/s than batches of up to 8), and the lanes, not the batch, keep the cores busy. A lane with several
  intra-op threads (more than 4 cores) takes batches of up to `forward_batch`, which give its threads more work to
  share (one 2-thread ONNX Runtime session here: 9.3-9.6 frames/s at batch 1, 9.5-10.7 at batch 4). The
  forward pass itself runs in ONNX Runtime (`streamd.stages.onnx_runtime`: the same weights, exported once and
  cached, about 12-15 % less CPU per frame than PyTorch here) or in PyTorch (one replica of the fused model per
  lane).
"""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from streamd.errors import StageError
from streamd.log import get_logger, redact_text
from streamd.models.batcher import ModelBatcher
from streamd.models.executors import device_executor
from streamd.models.memory import clear_task_frames
from streamd.stages.lanes import Lane, OnnxLane, TorchLane
from streamd.stages.masks import frame_masks
from streamd.stages.open_vocab import (
    OpenVocabulary,
    VocabularyError,
    open_vocabulary_kind,
)

__all__ = ["Params", "Runtime", "SharedDetector"]

log = get_logger("streamd.stage.detect")

Runtime = Literal["auto", "torch", "onnx"]


@dataclass(frozen=True)
class Params:
    conf: float
    iou: float
    imgsz: int
    max_det: int
    half: bool
    classes: tuple[int, ...] | None
    vocabulary: tuple[str, ...] | None
    masks: bool


Forward = Callable[[list[np.ndarray], Params], list[tuple[np.ndarray, list[Any] | None]]]


def cpu_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX512-BF16 or AMX), as oneDNN sees it."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - an older torch, or none
        return False


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SharedDetector:
    """A loaded model plus its one batcher (`streamd.models.batcher.ModelBatcher`), shared by every stage of
    every pipeline that uses the model and by predict requests.

    Lanes each serve the next waiting frames (the same parameters, up to `forward_batch`, shared out evenly
    between idle lanes; a single-threaded CPU lane one frame at a time). `runtime` picks what runs a plain
    detection model's forward passes on the CPU: `onnx` (ONNX Runtime; the model is exported once and cached),
    `torch`, or `auto` (ONNX Runtime where it is installed and the export works, else PyTorch). `self.runtime`
    says, once the lanes are set up, what runs them: `onnxruntime`, `torch` (CPU lanes) or `ultralytics`
    (`model.predict`, one lane)."""

    def __init__(self, model: Any, name: str, device: str, forward_batch: int, runtime: Runtime = "auto",
                 lanes: int | None = None):
        self.model = model
        self.name = name
        self.device = device
        self.forward_batch = forward_batch
        self.wanted_runtime = runtime
        self.wanted_lanes = lanes  # CPU lanes; None: chosen from the cores
        self.runtime: str | None = None  # set by the first request
        self.precision: str | None = None  # fp32, fp16 (CUDA) or bf16 (CPU lanes); set by the first request
        self.names: dict[int, str] = dict(getattr(model, "names", {}) or {})
        self.batcher: ModelBatcher[np.ndarray, tuple[np.ndarray, list[Any] | None]] = ModelBatcher(
            lambda: StageError(f"model {self.name!r} was unloaded"))
        self._task: asyncio.Task[None] | None = None
        inner = getattr(model, "model", None)
        # YOLO-World / YOLOE: the vocabulary state (embedding caches, text encoder, counters); None otherwise
        self.open_vocab = OpenVocabulary(model, name, device) if open_vocabulary_kind(inner) else None
        self.lanes = 1
        self.half = False  # what requests ask for (Params.half): set by the model manager's loader

    @property
    def forward_passes(self) -> int:
        return self.batcher.batches

    async def detect(self, images: list[np.ndarray], params: Params, low: bool = False,
                     streams: Iterable[str] = ()) -> list[tuple[np.ndarray, list[Any] | None]]:
        """Per image: an (N, 6) array [x1, y1, x2, y2, conf, cls] in pixels, and N masks (RLE) or None. `low`: a
        job's images, the batcher's lower priority class; `streams`: the live streams they came from (the batcher
        learns when each one's next frame is due). Raises VocabularyError when `params.vocabulary` cannot be set
        (at once for a vocabulary that failed)."""
        if self.batcher.error is not None:
            raise self.batcher.error
        if params.vocabulary is not None:
            if self.open_vocab is None:
                raise VocabularyError(f"model {self.name!r} is not an open-vocabulary model (YOLO-World / YOLOE)")
            err = self.open_vocab.failed.get(params.vocabulary)
            if err is not None:
                raise err
        if not images:
            return []
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._worker(), name=f"detector:{self.name}")
        return await self.batcher.submit(images, params, low, streams)

    async def aclose(self, error: BaseException | None = None) -> None:
        """Stop the batcher; requests still waiting fail with `error` (the model was unloaded), and later ones too.
        A forward pass under way in a lane finishes on its own; its result is dropped."""
        self.batcher.fail_all(error or StageError(f"model {self.name!r} was unloaded"))
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            clear_task_frames(task)  # then nothing but the manager holds this object: freed when it lets go
        self.batcher.fail_all(self.batcher.error)  # anything queued while the lanes stopped

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "lanes": self.lanes, "precision": self.precision,
                "forward_batch": self.forward_batch}

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        await self.batcher.wait_for_items()  # the first request's parameters set Ultralytics' predictor up
        p0: Params = self.batcher.first_key()  # type: ignore[assignment]
        try:
            direct = await loop.run_in_executor(device_executor(self.device), self._cpu_lanes, p0)
        except StageError as e:  # the runtime asked for cannot run this model here
            self.batcher.fail_all(e)
            return
        except Exception as e:  # noqa: BLE001 - model.predict reports it again, to the requests
            log.warning("direct forward passes unavailable", model=self.name, error=redact_text(str(e)))
            direct = []
        if not direct:
            self.runtime = "ultralytics"
            self.precision = "fp16" if p0.half and self.device != "cpu" else "fp32"
            await self.batcher.lane(self._predict, device_executor(self.device), self.forward_batch)
            return
        self.lanes = len(direct)
        log.info("detection lanes", model=self.name, runtime=self.runtime, lanes=self.lanes)
        pool = ThreadPoolExecutor(len(direct), thread_name_prefix=f"detect-{self.device}")
        try:
            async with asyncio.TaskGroup() as tg:
                for lane in direct:
                    batch = 1 if lane.threads == 1 else self.forward_batch  # see the module's docstring
                    tg.create_task(self.batcher.lane(lane, pool, batch), name=f"detector:{self.name}:lane")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a forward pass under way ends on its own

    # -- executor threads ---------------------------------------------------------------------------------
    def _predict(self, images: list[np.ndarray], p: Params) -> list[tuple[np.ndarray, list[Any] | None]]:
        if self.open_vocab is not None:
            self.open_vocab.set(p.vocabulary)  # None: the model's own classes
        bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]
        results = self.model.predict(bgr, **self._predict_args(p))
        out: list[tuple[np.ndarray, list[Any] | None]] = []
        for r in results:
            boxes = r.boxes
            data = boxes.data.cpu().numpy()[:, [0, 1, 2, 3, -2, -1]] if boxes is not None and len(boxes) \
                else np.zeros((0, 6), np.float32)
            masks = None
            if p.masks and getattr(r, "masks", None) is not None and len(data):
                masks = frame_masks(r.masks.data, r.orig_shape)
            out.append((data, masks))
        return out

    def _predict_args(self, p: Params) -> dict[str, Any]:
        return dict(conf=p.conf, iou=p.iou, imgsz=p.imgsz, max_det=p.max_det,
                    device=None if self.device == "auto" else self.device,
                    classes=list(p.classes) if p.classes else None, verbose=False,
                    **_precision(p.half and self.device != "cpu"))

    def _cpu_lanes(self, p: Params) -> list[Lane]:
        """The CPU lanes for a plain detection model, or none (one lane through `model.predict`). Raises
        StageError when `runtime: onnx` was asked for and cannot be had. With `half` on the CPU, the lanes run
        PyTorch under bfloat16 autocast (ONNX Runtime lanes are float32)."""
        want = self.wanted_runtime
        bf16 = p.half and self.device == "cpu"
        if bf16 and want == "onnx":
            raise StageError(f"model {self.name!r}: half precision on the CPU runs in PyTorch (bfloat16); "
                             "ONNX Runtime lanes are float32: use runtime 'auto' or 'torch', or half: false")
        plain = self.device == "cpu" and self.open_vocab is None and getattr(self.model, "task", None) == "detect"
        if plain:
            self.model.predict(np.zeros((32, 32, 3), np.uint8), **self._predict_args(p))  # builds the predictor
            predictor = self.model.predictor
            backend = getattr(predictor, "model", None)
            fmt = getattr(backend, "format", None)
            plain = type(predictor).__name__ == "DetectionPredictor" and fmt == "pt" and \
                not getattr(backend, "end2end", True)
            if want == "onnx" and fmt == "onnx":
                return []  # an .onnx file: model.predict runs it in ONNX Runtime already
        if not plain:
            if bf16:
                log.warning("bfloat16 on the CPU runs plain detection models only; this one runs in fp32",
                            model=self.name)
            if want == "onnx":
                raise StageError(f"model {self.name!r}: runtime 'onnx' runs plain detection models (.pt) on the "
                                 "CPU; use runtime 'auto' or 'torch' for this one (on CUDA, a TensorRT .engine)")
            return []
        backend = self.model.predictor.model
        cores = cpu_cores()
        if want in ("auto", "onnx") and not bf16:
            from streamd.stages import onnx_runtime

            try:
                lanes = onnx_runtime.lanes(self.model, p.imgsz, cores, self.wanted_lanes)
                self.runtime, self.precision = "onnxruntime", "fp32"
                return _torch_threads([OnnxLane(s, backend.stride, s.get_session_options().intra_op_num_threads)
                                       for s in lanes])
            except StageError:
                if want == "onnx":
                    raise
            except Exception as e:  # noqa: BLE001 - auto: PyTorch runs it instead
                if want == "onnx":
                    raise StageError(f"model {self.name!r}: cannot run in ONNX Runtime: "
                                     f"{type(e).__name__}: {redact_text(str(e))}") from e
                log.warning("ONNX Runtime lanes unavailable; running in PyTorch", model=self.name,
                            error=redact_text(f"{type(e).__name__}: {e}"))
        import torch

        # as many lanes as the cores fit at the intra-op thread count Ultralytics sets (it leaves cores to data
        # loading; here they run another forward pass)
        n = self.wanted_lanes or max(1, cores // torch.get_num_threads())
        if n == 1 and not bf16:
            return []
        self.runtime, self.precision = "torch", "bf16" if bf16 else "fp32"
        threads = torch.get_num_threads()  # one intra-op pool, shared by the lanes
        return _torch_threads([TorchLane(backend if i == 0 else copy.deepcopy(backend), bf16, threads)
                               for i in range(n)])


def _torch_threads(lanes: list[Lane]) -> list[Lane]:
    """Each lane's thread runs torch at the count Ultralytics' predictor set-up just set here (on the device's
    executor, which goes back to its own count after this call): cores - 1 (one thread on 2 cores; the lanes'
    count was built on it)."""
    import torch

    for lane in lanes:
        lane.torch_threads = torch.get_num_threads()
    return lanes


def model_loader(spec: Any, device: str) -> tuple[Callable[[], Any], Callable[[Any], SharedDetector]]:
    """How the model manager loads a detector or segmenter of the catalog (`streamd.models.manager.LOADERS`):
    Ultralytics' model, on the device's executor; then its shared batcher, on the loop. `half` (fp16 / bf16
    precision) is what the stages' requests ask for: fp16 on CUDA, bfloat16 on CPUs that have it, else fp32."""
    from streamd.models.sources import load_yolo

    opts = spec.typed_options()
    half = spec.precision in ("fp16", "bf16")
    if half and not (device.startswith("cuda") or (device == "cpu" and cpu_bf16())):
        log.warning("half precision needs CUDA, or a CPU with bfloat16; running in fp32", model=spec.source,
                    device=device)
        half = False

    def wrap(model: Any) -> SharedDetector:
        det = SharedDetector(model, spec.source, device, opts.forward_batch, opts.runtime, opts.lanes)
        det.half = half
        return det

    return lambda: load_yolo(spec.source), wrap


def _precision(half: bool) -> dict[str, Any]:
    """fp16 as this Ultralytics spells it (`quantize=16` since 8.4, `half=True` before); nothing for fp32 (the
    shared model's key includes `half`, so a model is always asked with the same precision)."""
    if not half:
        return {}
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return {"quantize": 16} if "quantize" in DEFAULT_CFG_DICT else {"half": True}
