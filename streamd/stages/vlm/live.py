"""A VLM stage's live switch (PATCH /api/v1/pipelines/{name}, streamd/streams/switch.py): its model (the
transformers backend: a declared model or an alias, loaded through the model manager while the old one answers)
and the options it can change while it runs (`LIVE_OPTIONS`).

A question is a branch that ends after its frame's batch: the serving state it was asked with (`Serving`: options,
the model's handle, the backend) is taken when the stage decides to ask, so a question decided before the switch
is answered by the old model and says so (`model`, `model_version` in its record), one decided after by the new;
the old handle is closed at the switch and the manager unloads the model once its last question ends and its
keep_alive_s passes (unless another stage uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamd.errors import ConfigError

__all__ = ["LIVE_OPTIONS", "Serving", "managed_model", "prepare", "switch", "discard"]

LIVE_OPTIONS = frozenset({"model", "max_tokens", "temperature", "every_s"})


@dataclass(frozen=True)
class Serving:
    opts: Any  # VlmOptions
    model: Any  # streamd.models.ModelRef (transformers), else None
    backend: Any

    @property
    def model_version(self) -> str | None:
        return None if self.model is None else self.model.entry.version


async def managed_model(stage: Any, cfg: Any, o: Any) -> tuple[Any, Any]:
    """The transformers backend's handle on `o.model` through the model manager, loaded (the first stream of the
    pipeline, or the switch, is its first use), and the backend over it. The handle is closed if the load fails."""
    from streamd.models.sources import resolve_device
    from streamd.models.spec import ModelSpec
    from streamd.stages.vlm.transformers import ManagedVlm

    models = stage.ctx.models
    models.check_stage(cfg.model_dump(exclude_unset=True), stage.where or f"stage {stage.name}")
    device = resolve_device(o.device)
    precision = o.quantization or {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(o.dtype, "auto")
    implicit = ModelSpec(source=o.model, kind="vlm", device=device, precision=precision,
                         options={k: v for k, v in (("generate_batch", o.generate_batch),
                                                    ("max_wait_ms", o.max_wait_ms)) if v is not None})
    ref = models.ref(o.model, implicit, stage.label(), stage.ctx.fail_stream)
    try:
        async with ref.use() as vlm:
            stage.device = vlm.device
    except BaseException:
        ref.close()
        raise
    return ref, ManagedVlm(ref)


async def prepare(stage: Any, cfg: Any) -> Serving:
    """What `cfg` needs, set up while the current model answers: a new model loaded (transformers) when it
    changes. Raises ConfigError (an option that cannot change live) or the load's error; nothing changed."""
    from streamd.models.spec import OWNED_BY_MODEL
    from streamd.stages import parse_options
    from streamd.stages.vlm.options import VlmOptions

    cur: Serving = stage.serving
    o = parse_options(VlmOptions, cfg, stage.where)
    changed = sorted(k for k in VlmOptions.model_fields if getattr(o, k) != getattr(cur.opts, k))
    declared = stage.ctx.models.cfg.catalog
    owned = OWNED_BY_MODEL["vlm"] if o.model in declared or cur.opts.model in declared else ()
    fixed = [k for k in changed if k not in LIVE_OPTIONS and k not in owned]
    if fixed:
        raise ConfigError(f"{stage.where}.{fixed[0]}", f"{', '.join(fixed)} cannot change while the pipeline runs "
                          f"(live: {', '.join(sorted(LIVE_OPTIONS))})")
    if "model" not in changed:
        return Serving(o, cur.model, cur.backend)
    if o.backend != "transformers":
        raise ConfigError(f"{stage.where}.model", f"the {o.backend} backend's model cannot change while the "
                          "pipeline runs (the transformers backend's can)")
    ref, backend = await managed_model(stage, cfg, o)
    if cur.model is not None:
        ref.hold(cur.model.streams)  # the manager keeps the new model for these streams until the switch
    return Serving(o, ref, backend)


def switch(stage: Any, cfg: Any, s: Serving) -> None:
    """Serve with `s` from now on (no await: between two batches). Questions decided before go on with the old
    backend; the old model's handle is closed."""
    old: Serving = stage.serving
    if s.model is not None and s.model is not old.model:
        s.model.streams.clear()  # the pipeline's streams now (some came or went during the load)
        if old.model is not None:
            s.model.hold(old.model.streams)
            s.model.revoked.update(old.model.revoked)
    stage.cfg = cfg
    stage.install(s)
    stage.reset_triggers()  # the next frame of each stream is asked about with the new model / options
    if old.model is not None and old.model is not s.model:
        old.model.close()


def discard(stage: Any, s: Serving) -> None:
    """A prepared switch that will not happen: a model it loaded is let go."""
    if s.model is not None and s.model is not stage.serving.model:
        s.model.close()
