"""Detection with any model Ultralytics loads (.pt, .yaml, .onnx, TensorRT .engine; YOLO v8/11+, and
open-vocabulary YOLO-World / YOLOE whose classes come from a vocabulary: `streamd.stages.open_vocab`).

The stage hands its frames to the model's `SharedDetector` (`streamd.stages.detector`), which batches requests from
every stage (every pipeline) that uses the model and runs the forward passes: in the device's executor thread, or,
for plain detection models on the CPU, in as many concurrent lanes as the cores fit, in ONNX Runtime or PyTorch
(`runtime`). Frames of many streams arrive in one stage batch (the pipeline's fan-in), so no stream waits for
another's frame. A vocabulary that cannot be set fails the streams that use it (`StageContext.fail_stream`), never
the pipeline's other streams.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from streamd.config import StageConfig
from streamd.errors import StageError
from streamd.frames import Work
from streamd.log import get_logger, redact_text
from streamd.stages import Stage, parse_options
from streamd.stages.detector import Params, Runtime, SharedDetector, mask_rle
from streamd.stages.open_vocab import VocabularyError, export_text_embeddings

__all__ = ["Detect", "DetectOptions", "Params", "SharedDetector", "VocabularyError", "export_text_embeddings",
           "mask_rle"]

log = get_logger("streamd.stage.detect")


class DetectOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["detect"] = "detect"
    name: str | None = None
    model: str = Field("person", description="a model declared in models.catalog (its name), an alias (person), "
                       "or an Ultralytics model file (.pt .yaml .onnx .engine)")
    conf: float = Field(0.25, ge=0, le=1, description="confidence threshold")
    iou: float = Field(0.7, ge=0, le=1, description="NMS IoU threshold")
    classes: list[str | int] | None = Field(None, description="keep only these classes (names or ids)")
    labels: dict[str, str] = Field(default_factory=dict, description="rename model classes in records")
    imgsz: int = Field(640, ge=32, description="inference image size")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto, cpu, cuda:N")
    half: bool = Field(False, description="half precision: fp16 on CUDA; bfloat16 on CPUs that have it (plain "
                       "detection models, PyTorch lanes)")
    runtime: Runtime = Field(
        "auto", description="plain detection models on the CPU: onnx (ONNX Runtime, exported once and cached), "
                            "torch, or auto (onnx where onnxruntime is installed, else torch)")
    lanes: int | None = Field(None, ge=1, le=64, description="plain detection models on the CPU: forward passes "
                              "at once (the cores are shared out between them); null: chosen from the cores")
    max_det: int = Field(300, ge=1, description="most detections per frame")
    max_batch: int = Field(8, ge=1, description="most frames in one forward pass")
    max_wait_ms: float = Field(5.0, ge=0, description="wait this long for a fuller batch")
    masks: bool = Field(True, description="segmentation models: publish masks (RLE)")
    vocabulary: list[str] | None = Field(None, description="open-vocabulary models: the class phrases")
    text_embeddings: str | None = Field(
        None, description="open-vocabulary models: a .pt file of {phrase: embedding} (export_text_embeddings), "
                          "used before the text encoder; what makes vocabularies work offline")


class Detect(Stage):
    kind = "detect"

    def __init__(self, cfg: StageConfig, opts: DetectOptions):
        super().__init__(cfg)
        self.opts = opts
        self.max_batch = opts.max_batch
        self.max_wait_ms = opts.max_wait_ms
        self.model: Any = None  # streamd.models.ModelRef: the shared model, lent per call by the model manager
        self.source = opts.model  # what the model was loaded from (a declared name's source)
        self._prepared: weakref.WeakSet[SharedDetector] = weakref.WeakSet()  # loaded models this stage set up
        self.params: Params | None = None
        self._open_vocab = False
        name = opts.model.lower()
        if opts.vocabulary is not None or opts.text_embeddings or "world" in name or "yoloe" in name:
            self.prompt_kinds = ("vocabulary",)  # the prompt store's vocabularies (stamped per frame)

    @classmethod
    def from_config(cls, cfg: StageConfig, where: str) -> "Detect":
        return cls(cfg, parse_options(DetectOptions, cfg, where))

    @property
    def detector(self) -> SharedDetector | None:
        """The loaded model now (None while the model manager has it unloaded)."""
        return None if self.model is None else self.model.entry.obj

    async def setup(self) -> None:
        """Take a handle on the model from the model manager and load it (the first stream of the pipeline is
        its first use): check `classes` and the vocabulary options against it and run one forward pass."""
        from streamd.models.sources import resolve_device
        from streamd.models.spec import ModelSpec

        o = self.opts
        models = self.ctx.models
        models.check_stage(self.cfg.model_dump(exclude_unset=True), self.where or f"stage {self.name}")
        device = resolve_device(o.device)
        precision = ("fp16" if device.startswith("cuda") else "bf16") if o.half else "auto"
        implicit = ModelSpec(source=o.model, kind="detector", device=device, precision=precision,
                             options={"runtime": o.runtime, "lanes": o.lanes, "max_batch": o.max_batch})
        self.model = models.ref(o.model, implicit, self.label(), self.ctx.fail_stream)
        async with self.model.use() as det:
            self.device = det.device
            self.source = det.name
            ov = det.open_vocab
            self._open_vocab = ov is not None
            if ov is None and (o.vocabulary or o.text_embeddings):
                raise StageError(f"model {o.model!r} is not an open-vocabulary model (YOLO-World / YOLOE): "
                                 "'vocabulary' and 'text_embeddings' need one")
            vocab = tuple(o.vocabulary) if o.vocabulary else None
            names = {i: n for i, n in enumerate(vocab)} if vocab else det.names
            self.params = Params(o.conf, o.iou, o.imgsz, o.max_det, det.half, self._classes(names), vocab, o.masks)
            self._names = names
            await self._prepare(det)

    def _classes(self, names: dict[int, str]) -> tuple[int, ...] | None:
        o = self.opts
        if not o.classes:
            return None
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
        return tuple(sorted(set(ids)))

    async def _prepare(self, det: SharedDetector) -> None:
        """What this stage adds to a loaded model, again after each reload: its text embeddings (open vocabulary);
        then one forward pass, so the first frames do not pay for lazy initialisation."""
        if det in self._prepared:
            return
        o = self.opts
        if det.open_vocab is not None and o.text_embeddings:
            n = await self.run_blocking(det.open_vocab.add_file, o.text_embeddings)
            log.info("text embeddings loaded", model=o.model, path=o.text_embeddings, phrases=n)
        assert self.params is not None
        await det.detect([np.zeros((o.imgsz, o.imgsz, 3), np.uint8)], self.params)
        self._prepared.add(det)

    async def teardown(self) -> None:
        if self.model is not None:
            self.model.close()

    def forget_stream(self, stream_id: str) -> None:
        if self.model is not None:
            self.model.drop_stream(stream_id)  # the model may be unloaded once no stream uses it

    async def process(self, batch: list[Work]) -> list[Work]:
        assert self.model is not None and self.params is not None
        todo = []
        for w in batch:  # a stream whose model was unloaded by force fails (its frames still in the queues too)
            why = self.model.revoked.get(w.frame.stream_id)
            if why is not None:
                w.error = why
            else:
                todo.append(w)
        if not todo:
            return batch
        async with self.model.use({w.frame.stream_id for w in todo}) as det:
            await self._prepare(det)
            await self._detect(det, todo)
        return batch

    async def _detect(self, det: SharedDetector, batch: list[Work]) -> None:
        assert self.params is not None
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
        outs = await asyncio.gather(*(det.detect([w.frame.image for w in ws], p) for p, ws in groups.items()),
                                    return_exceptions=True)
        for (p, ws), res in zip(groups.items(), outs):
            if isinstance(res, BaseException):
                self._failed(ws, res)
                continue
            names = {i: n for i, n in enumerate(p.vocabulary)} if p.vocabulary else self._names
            for w, (data, masks) in zip(ws, res):
                self._publish(w, data, masks, names, p.vocabulary is not None)

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
