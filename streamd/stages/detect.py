"""Detection with any model Ultralytics loads (.pt, .yaml, .onnx, TensorRT .engine; YOLO v8/11+, and
open-vocabulary YOLO-World / YOLOE whose classes come from a vocabulary).

One `SharedDetector` per loaded model batches requests from every stage (every pipeline) that uses it: requests
waiting while a forward pass runs go together into the next one. Forward passes run in the device's single
executor thread. Frames of many streams arrive in one stage batch (the pipeline's fan-in), so no stream waits for
another's frame.
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
from streamd.log import get_logger
from streamd.stages import Stage, device_executor, parse_options

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
        self._vocab: tuple[str, ...] | None = None
        self._vocab_cache: dict[tuple[str, ...], Any] = {}
        self.forward_passes = 0

    async def detect(self, images: list[np.ndarray], params: Params) -> list[tuple[np.ndarray, list[Any] | None]]:
        """Per image: an (N, 6) array [x1, y1, x2, y2, conf, cls] in pixels, and N masks (RLE) or None."""
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
    def _set_vocabulary(self, vocab: tuple[str, ...]) -> None:
        if vocab == self._vocab:
            return
        inner = getattr(self.model, "model", None)
        cached = self._vocab_cache.get(vocab)
        if cached is not None and inner is not None:  # switch without re-encoding the text
            inner.txt_feats = cached
            inner.names = list(vocab)
        else:
            if not hasattr(self.model, "set_classes"):
                raise StageError(f"model {self.name!r} is not an open-vocabulary model (no set_classes)")
            try:
                self.model.set_classes(list(vocab))
            except (ConnectionError, OSError, RuntimeError, AttributeError, ImportError) as e:
                raise StageError(
                    f"cannot set the vocabulary of {self.name!r}: its text encoder could not be loaded ({e}); "
                    "the text encoder's weights are downloaded on first use and this machine may be offline"
                ) from None
            if inner is not None and getattr(inner, "txt_feats", None) is not None:
                self._vocab_cache[vocab] = inner.txt_feats
        self.names = {i: n for i, n in enumerate(vocab)}
        self._vocab = vocab

    def _forward(self, images: list[np.ndarray], p: Params) -> list[tuple[np.ndarray, list[Any] | None]]:
        if p.vocabulary is not None:
            self._set_vocabulary(p.vocabulary)
        bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]
        dev = None if self.device == "auto" else self.device
        results = self.model.predict(bgr, conf=p.conf, iou=p.iou, imgsz=p.imgsz, max_det=p.max_det,
                                     half=p.half, device=dev, classes=list(p.classes) if p.classes else None,
                                     verbose=False)
        out: list[tuple[np.ndarray, list[Any] | None]] = []
        for r in results:
            boxes = r.boxes
            data = boxes.data.cpu().numpy()[:, [0, 1, 2, 3, -2, -1]] if boxes is not None and len(boxes) \
                else np.zeros((0, 6), np.float32)
            masks = None
            if p.masks and getattr(r, "masks", None) is not None and len(data):
                import torch.nn.functional as F

                m = r.masks.data[None].float()
                h, w = r.orig_shape
                m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0] > 0.5
                masks = [mask_rle(x) for x in m.cpu().numpy()]
            out.append((data, masks))
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
        if opts.vocabulary is not None:
            self.prompt_kinds = ("vocabulary",)

    @classmethod
    def from_config(cls, cfg: StageConfig, where: str) -> "Detect":
        return cls(cfg, parse_options(DetectOptions, cfg, where))

    async def setup(self) -> None:
        from streamd.models import load_yolo, resolve_device

        o = self.opts
        self.device = resolve_device(o.device)
        key = ("yolo", o.model, self.device)
        self.detector = await self.ctx.models.get(
            key, self.device, lambda: load_yolo(o.model),
            lambda m: SharedDetector(m, o.model, self.device, max(o.max_batch, 1)))
        half = o.half and self.device.startswith("cuda")
        if o.half and not half:
            log.warning("half precision needs CUDA; running in fp32", device=self.device)
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
            rec = w.prompts.get("vocabulary")
            p = self.params
            if rec is not None and rec.get("phrases"):
                p = replace(p, vocabulary=tuple(rec["phrases"]), classes=None)
            groups.setdefault(p, []).append(w)
        outs = await asyncio.gather(*(self.detector.detect([w.frame.image for w in ws], p)
                                      for p, ws in groups.items()))
        for (p, ws), res in zip(groups.items(), outs):
            names = {i: n for i, n in enumerate(p.vocabulary)} if p.vocabulary else self._names
            for w, (data, masks) in zip(ws, res):
                self._publish(w, data, masks, names)
        return batch

    def _publish(self, w: Work, data: np.ndarray, masks: list[Any] | None, names: dict[int, str]) -> None:
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
        rec = w.prompts.get("vocabulary")
        if rec is not None:
            out["vocabulary_version"] = rec["version"]
        elif self.opts.vocabulary:
            out["vocabulary_version"] = 1
            w.prompt_versions.setdefault("vocabulary", {"scope": "config", "version": 1})
        w.outputs[self.name] = out
        w.carry[self.name] = data
