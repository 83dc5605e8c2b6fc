"""Detection with any model Ultralytics loads (.pt, .yaml, .onnx, TensorRT .engine; YOLO v8/11+, and
open-vocabulary YOLO-World / YOLOE whose classes come from a vocabulary: `streamd.stages.open_vocab`).

The stage hands its frames to the model's `SharedDetector` (`streamd.stages.detector`), which batches requests from
every stage (every pipeline) that uses the model and runs the forward passes: in the device's executor thread, or,
for plain detection models on the CPU, in as many concurrent lanes as the cores fit, in ONNX Runtime or PyTorch
(`runtime`). Frames of many streams arrive in one stage batch (the pipeline's fan-in), so no stream waits for
another's frame. A vocabulary that cannot be set fails the streams that use it (`StageContext.fail_stream`), never
the pipeline's other streams.

A batch runs with what the stage serves when it starts (`_Serving`: the model's handle, the parameters, the class
names), taken once: a live switch (`prepare_switch` while the old model keeps serving, then `switch`) replaces it
between two batches, so no frame is processed by a mix of two models. Every output names its model and the loaded
weights' version (`model`, `model_version`: a content hash, streamd.models.version).
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from streamd.config import StageConfig
from streamd.errors import ConfigError, StageError
from streamd.frames import Work
from streamd.log import get_logger, redact_text
from streamd.stages import Stage, parse_options
from streamd.stages.detector import Params, Runtime, SharedDetector
from streamd.stages.masks import mask_rle
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
    max_batch: int = Field(8, ge=1, description="most frames the stage takes from its queue at once (frames of "
                           "several streams); the model's batcher runs them in forward passes of forward_batch")
    max_wait_ms: float = Field(5.0, ge=0, description="wait this long for a fuller stage batch")
    forward_batch: int | None = Field(None, ge=1, description="the model's forward batch (most frames in one "
                                      "forward pass), for a model named by alias or source; null: the model's "
                                      "default (8). One model has one batcher: stages that name the same model "
                                      "with different values are a configuration error. A declared model sets it "
                                      "in models.catalog.<name>.options")
    masks: bool = Field(True, description="segmentation models: publish masks (RLE)")
    vocabulary: list[str] | None = Field(None, description="open-vocabulary models: the class phrases")
    text_embeddings: str | None = Field(
        None, description="open-vocabulary models: a .pt file of {phrase: embedding} (export_text_embeddings), "
                          "used before the text encoder; what makes vocabularies work offline")


@dataclass(frozen=True)
class _Serving:
    """What a batch runs with: options, the model's handle, the parameters and class names they give."""

    opts: DetectOptions
    model: Any  # streamd.models.ModelRef
    params: Params
    names: dict[int, str]
    open_vocab: bool
    device: str
    source: str


class Detect(Stage):
    kind = "detect"
    # options a live switch may change (PATCH /api/v1/pipelines/{name}); the others shape the model's batcher, its
    # device or runtime, or the pipeline (prompt kinds), and need the pipeline restarted
    live_options = frozenset({"model", "conf", "iou", "classes", "labels", "imgsz", "max_det"})

    def __init__(self, cfg: StageConfig, opts: DetectOptions):
        super().__init__(cfg)
        self.opts = opts
        self.max_batch = opts.max_batch
        self.max_wait_ms = opts.max_wait_ms
        self.serving: _Serving | None = None  # set by setup(), replaced by a switch
        self.source = opts.model  # what the model was loaded from (a declared name's source)
        self._prepared: weakref.WeakSet[SharedDetector] = weakref.WeakSet()  # loaded models this stage set up
        name = opts.model.lower()
        if opts.vocabulary is not None or opts.text_embeddings or "world" in name or "yoloe" in name:
            self.prompt_kinds = ("vocabulary",)  # the prompt store's vocabularies (stamped per frame)

    @classmethod
    def from_config(cls, cfg: StageConfig, where: str) -> "Detect":
        return cls(cfg, parse_options(DetectOptions, cfg, where))

    @property
    def model(self) -> Any:
        """The handle on the model serving now (streamd.models.ModelRef), None before setup."""
        return None if self.serving is None else self.serving.model

    @property
    def params(self) -> Params | None:
        return None if self.serving is None else self.serving.params

    @property
    def detector(self) -> SharedDetector | None:
        """The loaded model now (None while the model manager has it unloaded)."""
        return None if self.model is None else self.model.entry.obj

    async def setup(self) -> None:
        """Take a handle on the model from the model manager and load it (the first stream of the pipeline is
        its first use): check `classes` and the vocabulary options against it and run one forward pass."""
        self._install(await self._take(self.cfg, self.opts))

    async def _take(self, cfg: StageConfig, o: DetectOptions) -> _Serving:
        """A handle on the model `o` names, loaded and set up for `o` (the handle is closed again if that fails)."""
        from streamd.models.sources import resolve_device
        from streamd.models.spec import ModelSpec

        models = self.ctx.models
        models.check_stage(cfg.model_dump(exclude_unset=True), self.where or f"stage {self.name}")
        device = resolve_device(o.device)
        precision = ("fp16" if device.startswith("cuda") else "bf16") if o.half else "auto"
        implicit = ModelSpec(source=o.model, kind="detector", device=device, precision=precision,
                             options={"runtime": o.runtime, "lanes": o.lanes,
                                      **({} if o.forward_batch is None else {"forward_batch": o.forward_batch})})
        ref = models.ref(o.model, implicit, self.label(), self.ctx.fail_stream)
        try:
            async with ref.use() as det:
                ov = det.open_vocab
                if ov is None and (o.vocabulary or o.text_embeddings):
                    raise StageError(f"model {o.model!r} is not an open-vocabulary model (YOLO-World / YOLOE): "
                                     "'vocabulary' and 'text_embeddings' need one")
                vocab = tuple(o.vocabulary) if o.vocabulary else None
                names = {i: n for i, n in enumerate(vocab)} if vocab else det.names
                params = Params(o.conf, o.iou, o.imgsz, o.max_det, det.half, self._classes(o, names), vocab,
                                o.masks)
                await self._prepare(det, o, params)
                return _Serving(o, ref, params, names, ov is not None, det.device, det.name)
        except BaseException:
            ref.close()
            raise

    def _install(self, s: _Serving) -> None:
        self.serving = s
        self.opts = s.opts
        self.device = s.device
        self.source = s.source

    # -- a live switch (streamd.streams.switch) ------------------------------------------------------------------
    async def prepare_switch(self, cfg: StageConfig) -> _Serving:
        """Load and set up what `cfg` (this stage's options, some live options changed) needs while the current
        model keeps serving: its model through the manager, `classes` checked against it, one forward pass. The
        new handle holds this stage's streams, so the manager keeps the model until the switch. Raises
        (ConfigError, StageError, ModelError) leaving the stage as it was."""
        from streamd.models.spec import OWNED_BY_MODEL

        assert self.serving is not None, "setup() first"
        o = parse_options(DetectOptions, cfg, self.where)
        changed = sorted(k for k in DetectOptions.model_fields if getattr(o, k) != getattr(self.opts, k))
        declared = self.ctx.models.cfg.catalog
        owned = OWNED_BY_MODEL["detect"] if o.model in declared or self.opts.model in declared else ()
        fixed = [k for k in changed if k not in self.live_options and k not in owned]  # a declared model's own
        if fixed:
            raise ConfigError(f"{self.where}.{fixed[0]}", f"{', '.join(fixed)} cannot change while the pipeline "
                              f"runs (live: {', '.join(sorted(self.live_options))})")
        s = await self._take(cfg, o)
        s.model.hold(self.serving.model.streams)
        return s

    def switch(self, cfg: StageConfig, s: _Serving) -> None:
        """Serve with `s` from the next batch on (a batch under way ends with what it started with). The old
        handle is closed: once its last call ends the old model is idle, and the manager unloads it after its
        keep_alive_s (unless another stage uses it)."""
        assert self.serving is not None
        old = self.serving.model
        s.model.streams.clear()  # the streams of the pipeline now (some may have come or gone during the load)
        s.model.hold(old.streams)
        s.model.revoked.update(old.revoked)
        self.cfg = cfg
        self._install(s)
        if old is not s.model:
            old.close()

    @staticmethod
    def discard(s: _Serving) -> None:
        """A prepared switch that will not happen: its handle goes."""
        s.model.close()

    def _classes(self, o: DetectOptions, names: dict[int, str]) -> tuple[int, ...] | None:
        if not o.classes:
            return None
        by_name = {n: i for i, n in names.items()}
        by_name.update({o.labels.get(n, n): i for i, n in names.items()})
        ids = []
        for c in o.classes:
            if isinstance(c, int) or (isinstance(c, str) and c.isascii() and c.isdigit()):
                ids.append(int(c))
            elif c in by_name:
                ids.append(by_name[c])
            else:
                raise StageError(f"class {c!r} is not one of the model's classes: {sorted(by_name)}")
        return tuple(sorted(set(ids)))

    async def _prepare(self, det: SharedDetector, o: DetectOptions, params: Params) -> None:
        """What this stage adds to a loaded model, again after each reload: its text embeddings (open vocabulary);
        then one forward pass, so the first frames do not pay for lazy initialisation."""
        if det in self._prepared:
            return
        if det.open_vocab is not None and o.text_embeddings:
            n = await self.run_blocking(det.open_vocab.add_file, o.text_embeddings)
            log.info("text embeddings loaded", model=o.model, path=o.text_embeddings, phrases=n)
        det.batcher.low_share = self.ctx.jobs_share
        # the lower class: a warm-up is nobody's frame (live items would keep jobs' batches small for a while)
        await det.detect([np.zeros((o.imgsz, o.imgsz, 3), np.uint8)], params, low=True)
        self._prepared.add(det)

    async def teardown(self) -> None:
        if self.model is not None:
            self.model.close()

    def forget_stream(self, stream_id: str) -> None:
        if self.model is not None:
            self.model.drop_stream(stream_id)  # the model may be unloaded once no stream uses it

    async def process(self, batch: list[Work]) -> list[Work]:
        s = self.serving  # the whole batch runs with this: a switch takes effect between two batches
        assert s is not None
        todo = s.model.serviceable(batch)
        if not todo:
            return batch
        async with s.model.use({w.frame.stream_id for w in todo}) as det:
            await self._prepare(det, s.opts, s.params)
            await self._detect(det, todo, s, s.model.entry.version)
        return batch

    async def _detect(self, det: SharedDetector, batch: list[Work], s: _Serving, version: str | None) -> None:
        # a vocabulary from the prompt store (open-vocabulary models) overrides the configured one per frame
        groups: dict[Params, list[Work]] = {}
        for w in batch:
            p = s.params
            rec = w.prompts.get("vocabulary") if s.open_vocab else None
            if rec is not None and rec.get("phrases"):
                p = replace(p, vocabulary=tuple(rec["phrases"]), classes=None)
                w.prompt_versions["vocabulary"] = {"scope": rec["scope"], "version": rec["version"]}
            elif p.vocabulary is not None:
                w.prompt_versions["vocabulary"] = {"scope": "config", "version": 0}
            groups.setdefault((p, w.frame.job), []).append(w)  # a job's frames: the batcher's lower class
        outs = await asyncio.gather(*(det.detect([w.frame.image for w in ws], p, low,
                                                 () if low else {w.frame.stream_id for w in ws if not w.frame.predict})
                                      for (p, low), ws in groups.items()), return_exceptions=True)
        for ((p, _), ws), res in zip(groups.items(), outs):
            if isinstance(res, BaseException):
                self._failed(ws, res)
                continue
            names = {i: n for i, n in enumerate(p.vocabulary)} if p.vocabulary else s.names
            for w, (data, masks) in zip(ws, res):
                self._publish(w, data, masks, names, p.vocabulary is not None, s.opts, version)

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
                 vocab: bool, o: DetectOptions, version: str | None) -> None:
        labels = o.labels
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
        out: dict[str, Any] = {"model": o.model, "model_version": version, "detections": dets}
        version = w.prompt_versions.get("vocabulary") if vocab else None
        if version is not None:  # the vocabulary these classes came from: the store's, or the config's (version 0)
            out["vocabulary_version"] = version["version"]
            out["vocabulary_scope"] = version["scope"]
        w.outputs[self.name] = out
        w.carry[self.name] = data
