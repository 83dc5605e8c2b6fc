"""Detection with any model Ultralytics loads (.pt, .yaml, .onnx, TensorRT .engine; YOLO v8/11+, and
open-vocabulary YOLO-World / YOLOE whose classes come from a vocabulary: `streamd.stages.open_vocab`).

One `SharedDetector` per loaded model (and device and precision) batches requests from every stage (every
pipeline) that uses it: requests waiting while a forward pass runs go together into the next one. Forward passes
run in the device's single executor thread. Frames of many streams arrive in one stage batch (the pipeline's
fan-in), so no stream waits for another's frame. A vocabulary that cannot be set fails the streams that use it
(`StageContext.fail_stream`), never the pipeline's other streams.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, replace
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


class SharedDetector:
    """A loaded model plus its cross-pipeline batcher."""

    def __init__(self, model: Any, name: str, device: str, max_batch: int):
        self.model = model
        self.name = name
        self.device = device
        self.max_batch = max_batch
        self.names: dict[int, str] = dict(getattr(model, "names", {}) or {})
        self._queue: deque[_Request] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        inner = getattr(model, "model", None)
        # YOLO-World / YOLOE: the vocabulary state (embedding caches, text encoder, counters); None otherwise
        self.open_vocab = OpenVocabulary(model, name, device) if open_vocabulary_kind(inner) else None
        self.forward_passes = 0

    async def detect(self, images: list[np.ndarray], params: Params) -> list[tuple[np.ndarray, list[Any] | None]]:
        """Per image: an (N, 6) array [x1, y1, x2, y2, conf, cls] in pixels, and N masks (RLE) or None.
        Raises VocabularyError when `params.vocabulary` cannot be set (at once for a vocabulary that failed)."""
        if params.vocabulary is not None:
            if self.open_vocab is None:
                raise VocabularyError(f"model {self.name!r} is not an open-vocabulary model (YOLO-World / YOLOE)")
            err = self.open_vocab.failed.get(params.vocabulary)
            if err is not None:
                raise err
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._worker(), name=f"detector:{self.name}")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(images, params, fut))
        self._wake.set()
        return await fut

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self._queue.popleft()
            group = [first]
            n = len(first.images)
            while self._queue and self._queue[0].params == first.params and \
                    n + len(self._queue[0].images) <= self.max_batch:
                nxt = self._queue.popleft()
                group.append(nxt)
                n += len(nxt.images)
            images = [im for req in group for im in req.images]
            try:
                outs = await loop.run_in_executor(device_executor(self.device), self._forward, images, first.params)
            except Exception as e:  # noqa: BLE001 - handed to every waiting caller
                for req in group:
                    if not req.future.done():
                        req.future.set_exception(e)
                continue
            self.forward_passes += 1
            i = 0
            for req in group:
                if not req.future.done():
                    req.future.set_result(outs[i : i + len(req.images)])
                i += len(req.images)

    # -- executor thread ----------------------------------------------------------------------------------
    def _forward(self, images: list[np.ndarray], p: Params) -> list[tuple[np.ndarray, list[Any] | None]]:
        if self.open_vocab is not None:
            self.open_vocab.set(p.vocabulary)  # None: the model's own classes
        bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]
        dev = None if self.device == "auto" else self.device
        results = self.model.predict(bgr, conf=p.conf, iou=p.iou, imgsz=p.imgsz, max_det=p.max_det, device=dev,
                                     classes=list(p.classes) if p.classes else None, verbose=False,
                                     **_precision(p.half))
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
