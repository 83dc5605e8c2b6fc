"""Detection with any model Ultralytics loads (.pt, .yaml, .onnx, TensorRT .engine; YOLO v8/11+, and
open-vocabulary YOLO-World / YOLOE whose classes come from a vocabulary: `streamd.stages.open_vocab`).

One `SharedDetector` per loaded model (and device and precision) batches requests from every stage (every
pipeline) that uses it: requests waiting while a forward pass runs go together into the next one. Forward passes
run in the device's single executor thread, or, for plain PyTorch detection models on the CPU, in as many
concurrent lanes as the cores fit (`SharedDetector`). Frames of many streams arrive in one stage batch (the pipeline's
fan-in), so no stream waits for another's frame. A vocabulary that cannot be set fails the streams that use it
(`StageContext.fail_stream`), never the pipeline's other streams.
"""

from __future__ import annotations

import asyncio
import copy
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from streamd.config import StageConfig
from streamd.errors import StageError
from streamd.frames import Work
from streamd.log import get_logger, redact_text
from streamd.stages import Stage, device_executor, parse_options
from streamd.stages.open_vocab import (OpenVocabulary, VocabularyError, export_text_embeddings,
                                       open_vocabulary_kind)

__all__ = ["Detect", "DetectOptions", "SharedDetector", "VocabularyError", "export_text_embeddings", "mask_rle"]

log = get_logger("streamd.stage.detect")


class DetectOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["detect"] = "detect"
    name: str | None = None
    model: str = Field("person", description="Ultralytics model path/name, or an alias (person)")
    conf: float = Field(0.25, ge=0, le=1, description="confidence threshold")
    iou: float = Field(0.7, ge=0, le=1, description="NMS IoU threshold")
    classes: list[str | int] | None = Field(None, description="keep only these classes (names or ids)")
    labels: dict[str, str] = Field(default_factory=dict, description="rename model classes in records")
    imgsz: int = Field(640, ge=32, description="inference image size")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto, cpu, cuda:N")
    half: bool = Field(False, description="fp16 inference (CUDA only)")
    max_det: int = Field(300, ge=1, description="most detections per frame")
    max_batch: int = Field(8, ge=1, description="most frames in one forward pass")
    max_wait_ms: float = Field(5.0, ge=0, description="wait this long for a fuller batch")
    masks: bool = Field(True, description="segmentation models: publish masks (RLE)")
    vocabulary: list[str] | None = Field(None, description="open-vocabulary models: the class phrases")
    text_embeddings: str | None = Field(
        None, description="open-vocabulary models: a .pt file of {phrase: embedding} (export_text_embeddings), "
                          "used before the text encoder; what makes vocabularies work offline")


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO-style uncompressed RLE: column-major run lengths, the first run counting zeros."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    cuts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], cuts, [flat.size]))).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


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


@dataclass
class _Request:
    images: list[np.ndarray]
    params: Params
    future: asyncio.Future[list[tuple[np.ndarray, list[Any] | None]]]
    outs: list[Any] = field(init=False)  # per image, filled in as its forward pass ends
    left: int = field(init=False)  # images not yet through a forward pass

    def __post_init__(self) -> None:
        self.outs = [None] * len(self.images)
        self.left = len(self.images)


Forward = Callable[[list[np.ndarray], Params], list[tuple[np.ndarray, list[Any] | None]]]


class SharedDetector:
    """A loaded model plus its cross-pipeline batcher.

    Forward passes run in lanes, each serving the next waiting frames (the same parameters, up to `max_batch`,
    shared out evenly between idle lanes). Most models have one lane, in the device's executor thread, through
    `model.predict`. A plain PyTorch detection model on the CPU has as many lanes as the cores fit at the
    intra-op thread count Ultralytics sets (it leaves cores to data loading; here they run another forward
    pass), each with its own replica of the model (`_Direct`): decode, preprocessing and the forward passes of
    several frames overlap, and one frame's inference never waits for another's."""

    def __init__(self, model: Any, name: str, device: str, max_batch: int):
        self.model = model
        self.name = name
        self.device = device
        self.max_batch = max_batch
        self.names: dict[int, str] = dict(getattr(model, "names", {}) or {})
        self._pending: deque[tuple[_Request, int]] = deque()  # (request, image index), in arrival order
        self._wake = asyncio.Event()
        self._idle = 0  # lanes waiting for frames
        self._task: asyncio.Task[None] | None = None
        inner = getattr(model, "model", None)
        # YOLO-World / YOLOE: the vocabulary state (embedding caches, text encoder, counters); None otherwise
        self.open_vocab = OpenVocabulary(model, name, device) if open_vocabulary_kind(inner) else None
        self.forward_passes = 0
        self.lanes = 1

    async def detect(self, images: list[np.ndarray], params: Params) -> list[tuple[np.ndarray, list[Any] | None]]:
        """Per image: an (N, 6) array [x1, y1, x2, y2, conf, cls] in pixels, and N masks (RLE) or None.
        Raises VocabularyError when `params.vocabulary` cannot be set (at once for a vocabulary that failed)."""
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
        req = _Request(images, params, asyncio.get_running_loop().create_future())
        self._pending.extend((req, i) for i in range(len(images)))
        self._wake.set()
        return await req.future

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._pending:  # the first request's parameters set Ultralytics' predictor up
            self._wake.clear()
            await self._wake.wait()
        try:
            direct = await loop.run_in_executor(device_executor(self.device), self._direct_replicas,
                                                self._pending[0][0].params)
        except Exception as e:  # noqa: BLE001 - model.predict reports it again, to the requests
            log.warning("direct forward passes unavailable", model=self.name, error=redact_text(str(e)))
            direct = []
        if not direct:
            await self._lane(self._predict, device_executor(self.device))
            return
        self.lanes = len(direct)
        pool = ThreadPoolExecutor(len(direct), thread_name_prefix=f"detect-{self.device}")
        try:
            async with asyncio.TaskGroup() as tg:
                for replica in direct:
                    tg.create_task(self._lane(replica, pool), name=f"detector:{self.name}:lane")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a forward pass under way ends on its own

    async def _lane(self, forward: Forward, executor: Executor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._idle += 1
                try:
                    self._wake.clear()
                    await self._wake.wait()
                finally:
                    self._idle -= 1
                continue
            items = self._take()
            if not items:
                continue
            try:
                outs = await loop.run_in_executor(executor, forward, [r.images[i] for r, i in items],
                                                  items[0][0].params)
            except Exception as e:  # noqa: BLE001 - handed to every waiting caller
                for req in {id(r): r for r, _ in items}.values():
                    if not req.future.done():
                        req.future.set_exception(e)
                continue
            self.forward_passes += 1
            for (req, i), out in zip(items, outs):
                req.outs[i] = out
                req.left -= 1
                if req.left == 0 and not req.future.done():
                    req.future.set_result(req.outs)

    def _take(self) -> list[tuple[_Request, int]]:
        """The next waiting frames with the first one's parameters: this lane's even share of them between
        the idle lanes (itself included), at most `max_batch`."""
        params = self._pending[0][0].params
        run = 0
        for req, _ in self._pending:
            if req.params != params or run == self.max_batch * (self._idle + 1):
                break
            run += 1
        share = min(self.max_batch, -(-run // (self._idle + 1)))
        items = []
        while self._pending and len(items) < share:
            req, i = self._pending.popleft()
            if not req.future.done():  # a failed or cancelled request's other frames are skipped
                items.append((req, i))
        return items

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
                masks = _frame_masks(r.masks.data, r.orig_shape)
            out.append((data, masks))
        return out

    def _predict_args(self, p: Params) -> dict[str, Any]:
        return dict(conf=p.conf, iou=p.iou, imgsz=p.imgsz, max_det=p.max_det,
                    device=None if self.device == "auto" else self.device,
                    classes=list(p.classes) if p.classes else None, verbose=False, **_precision(p.half))

    def _direct_replicas(self, p: Params) -> list["_Direct"]:
        """Replicas of the model for CPU lanes, or none (one lane through `model.predict`): for plain PyTorch
        detection models on the CPU, where more than one forward pass fits the cores."""
        if self.device != "cpu" or self.open_vocab is not None or getattr(self.model, "task", None) != "detect":
            return []
        import torch

        self.model.predict(np.zeros((32, 32, 3), np.uint8), **self._predict_args(p))  # builds the predictor
        predictor = self.model.predictor
        backend = getattr(predictor, "model", None)
        if type(predictor).__name__ != "DetectionPredictor" or getattr(backend, "format", None) != "pt" or \
                getattr(backend, "end2end", True):
            return []
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        lanes = max(1, cores // torch.get_num_threads())
        if lanes == 1:
            return []
        return [_Direct(backend if i == 0 else copy.deepcopy(backend)) for i in range(lanes)]


class _Direct:
    """One replica of a plain PyTorch detection model (Ultralytics' fused AutoBackend) and Ultralytics' own
    steps around its forward pass, called directly, so that replicas run at once (`model.predict` holds a lock):
    the letterbox, the to-tensor of `BasePredictor.preprocess`, NMS and box scaling of `DetectionPredictor`.
    The frames' RGB goes into the letterbox as it is (the predictor flips its BGR input to RGB after it: the
    same tensor, without the copy), and NMS gets the request's parameters, not the shared predictor's. Each
    frame is letterboxed as Ultralytics letterboxes a frame of its own (the smallest stride-aligned rectangle);
    frames whose rectangles differ go in separate passes, so a frame's detections never depend on the frames
    it shares a batch with."""

    def __init__(self, backend: Any):
        self.backend = backend
        self._imgsz: dict[int, Any] = {}

    def __call__(self, images: list[np.ndarray], p: Params) -> list[tuple[np.ndarray, list[Any] | None]]:
        from ultralytics.data.augment import LetterBox
        from ultralytics.utils.checks import check_imgsz

        imgsz = self._imgsz.get(p.imgsz)
        if imgsz is None:
            imgsz = self._imgsz[p.imgsz] = check_imgsz(p.imgsz, stride=self.backend.stride, min_dim=2)
        letterbox = LetterBox(imgsz, auto=True, stride=self.backend.stride)
        boxed = [letterbox(image=im) for im in images]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(boxed):
            by_shape.setdefault(x.shape, []).append(i)
        out: list[Any] = [None] * len(images)
        for idx in by_shape.values():
            dets = self._detect(np.stack([boxed[i] for i in idx]), [images[i].shape for i in idx], p)
            for i, d in zip(idx, dets):
                out[i] = (d, None)
        return out

    def _detect(self, x: np.ndarray, shapes: list[tuple[int, ...]], p: Params) -> list[np.ndarray]:
        import torch
        from ultralytics.utils import nms, ops

        b = self.backend
        with torch.inference_mode():
            im = torch.from_numpy(x).to(b.device).permute(0, 3, 1, 2).contiguous()
            im = (im.half() if b.fp16 else im.float()).div_(255)
            preds = nms.non_max_suppression(b(im), p.conf, p.iou, list(p.classes) if p.classes else None,
                                            max_det=p.max_det)
            dets = []
            for pred, shape in zip(preds, shapes):
                pred[:, :4] = ops.scale_boxes(im.shape[2:], pred[:, :4], shape)
                dets.append(pred[:, :6].cpu().numpy())
        return dets


def _precision(half: bool) -> dict[str, Any]:
    """fp16 as this Ultralytics spells it (`quantize=16` since 8.4, `half=True` before); nothing for fp32 (the
    shared model's key includes `half`, so a model is always asked with the same precision)."""
    if not half:
        return {}
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return {"quantize": 16} if "quantize" in DEFAULT_CFG_DICT else {"half": True}


def _frame_masks(masks: Any, frame_shape: tuple[int, int], chunk: int = 16) -> list[dict[str, Any]]:
    """Masks in the letterboxed input's coordinates -> RLE in the frame's, aligned with the boxes: the letterbox
    padding is cut off before scaling (`ops.scale_masks`). A few masks at a time, so many detections on a large
    frame never hold N full-size masks at once."""
    from ultralytics.utils import ops

    out = []
    for i in range(0, len(masks), chunk):
        m = ops.scale_masks(masks[i : i + chunk, None].float(), frame_shape)[:, 0] > 0.5
        out.extend(mask_rle(x) for x in m.cpu().numpy())
    return out


class Detect(Stage):
    kind = "detect"

    def __init__(self, cfg: StageConfig, opts: DetectOptions):
        super().__init__(cfg)
        self.opts = opts
        self.max_batch = opts.max_batch
        self.max_wait_ms = opts.max_wait_ms
        self.detector: SharedDetector | None = None
        self.params: Params | None = None
        self._open_vocab = False
        name = opts.model.lower()
        if opts.vocabulary is not None or opts.text_embeddings or "world" in name or "yoloe" in name:
            self.prompt_kinds = ("vocabulary",)  # the prompt store's vocabularies (stamped per frame)

    @classmethod
    def from_config(cls, cfg: StageConfig, where: str) -> "Detect":
        return cls(cfg, parse_options(DetectOptions, cfg, where))

    async def setup(self) -> None:
        from streamd.models import load_yolo, resolve_device

        o = self.opts
        self.device = resolve_device(o.device)
        half = o.half and self.device.startswith("cuda")
        if o.half and not half:
            log.warning("half precision needs CUDA; running in fp32", device=self.device)
        key = ("yolo", o.model, self.device, half)  # the predictor keeps the precision it was built with
        self.detector = await self.ctx.models.get(
            key, self.device, lambda: load_yolo(o.model),
            lambda m: SharedDetector(m, o.model, self.device, max(o.max_batch, 1)))
        ov = self.detector.open_vocab
        self._open_vocab = ov is not None
        if ov is None and (o.vocabulary or o.text_embeddings):
            raise StageError(f"model {o.model!r} is not an open-vocabulary model (YOLO-World / YOLOE): "
                             "'vocabulary' and 'text_embeddings' need one")
        if ov is not None and o.text_embeddings:
            n = await self.run_blocking(ov.add_file, o.text_embeddings)
            log.info("text embeddings loaded", model=o.model, path=o.text_embeddings, phrases=n)
        vocab = tuple(o.vocabulary) if o.vocabulary else None
        names = {i: n for i, n in enumerate(vocab)} if vocab else self.detector.names
        classes = None
        if o.classes:
            by_name = {n: i for i, n in names.items()}
            by_name.update({o.labels.get(n, n): i for i, n in names.items()})
            ids = []
            for c in o.classes:
                if isinstance(c, int) or (isinstance(c, str) and c.isdigit()):
                    ids.append(int(c))
                elif c in by_name:
                    ids.append(by_name[c])
                else:
                    raise StageError(f"class {c!r} is not one of the model's classes: {sorted(by_name)}")
            classes = tuple(sorted(set(ids)))
        self.params = Params(o.conf, o.iou, o.imgsz, o.max_det, half, classes, vocab, o.masks)
        self._names = names
        # one forward pass now, so the first frames do not pay for lazy initialisation
        await self.detector.detect([np.zeros((o.imgsz, o.imgsz, 3), np.uint8)], self.params)

    async def process(self, batch: list[Work]) -> list[Work]:
        assert self.detector is not None and self.params is not None
        # a vocabulary from the prompt store (open-vocabulary models) overrides the configured one per frame
        groups: dict[Params, list[Work]] = {}
        for w in batch:
            p = self.params
            rec = w.prompts.get("vocabulary") if self._open_vocab else None
            if rec is not None and rec.get("phrases"):
                p = replace(p, vocabulary=tuple(rec["phrases"]), classes=None)
                w.prompt_versions["vocabulary"] = {"scope": rec["scope"], "version": rec["version"]}
            elif p.vocabulary is not None:
                w.prompt_versions["vocabulary"] = {"scope": "config", "version": 0}
            groups.setdefault(p, []).append(w)
        outs = await asyncio.gather(*(self.detector.detect([w.frame.image for w in ws], p)
                                      for p, ws in groups.items()), return_exceptions=True)
        for (p, ws), res in zip(groups.items(), outs):
            if isinstance(res, BaseException):
                self._failed(ws, res)
                continue
            names = {i: n for i, n in enumerate(p.vocabulary)} if p.vocabulary else self._names
            for w, (data, masks) in zip(ws, res):
                self._publish(w, data, masks, names, p.vocabulary is not None)
        return batch

    def _failed(self, ws: list[Work], e: BaseException) -> None:
        """Frames whose forward pass failed are marked failed; a vocabulary that cannot be set also fails the
        streams that use it (retrying it every frame would only fail every frame)."""
        if isinstance(e, asyncio.CancelledError):
            raise e
        reason = redact_text(f"stage {self.name}: {type(e).__name__}: {e}")
        sids = sorted({w.frame.stream_id for w in ws})
        log.error("detection failed", stage=self.name, streams=sids, frames=len(ws), error=reason)
        for w in ws:
            w.error = reason
        if isinstance(e, VocabularyError):
            for sid in sids:
                self.ctx.fail_stream(sid, reason)

    def _publish(self, w: Work, data: np.ndarray, masks: list[Any] | None, names: dict[int, str],
                 vocab: bool) -> None:
        labels = self.opts.labels
        h, w_px = w.frame.height, w.frame.width
        dets = []
        for i, row in enumerate(data):
            x1, y1, x2, y2, conf, cls = (float(v) for v in row)
            cid = int(cls)
            name = names.get(cid, str(cid))
            d: dict[str, Any] = {
                "label": labels.get(name, name),
                "class_id": cid,
                "confidence": round(conf, 4),
                "box": [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)],
                "box_norm": [round(x1 / w_px, 5), round(y1 / h, 5), round(x2 / w_px, 5), round(y2 / h, 5)],
            }
            if masks is not None:
                d["mask"] = masks[i]
            dets.append(d)
        out: dict[str, Any] = {"model": self.opts.model, "detections": dets}
        version = w.prompt_versions.get("vocabulary") if vocab else None
        if version is not None:  # the vocabulary these classes came from: the store's, or the config's (version 0)
            out["vocabulary_version"] = version["version"]
            out["vocabulary_scope"] = version["scope"]
        w.outputs[self.name] = out
        w.carry[self.name] = data
