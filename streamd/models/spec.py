"""The `models:` section of the config: the declared models (name -> source, kind, device, precision, options,
keep-alive, preload) and a memory budget per device. Pipelines name a declared model by its name; a bare name that
is neither declared nor an alias is an error at start, naming the stage's key (`check_pipeline_models`).

Imported by `streamd.config`: no heavy import here (no torch), and nothing from streamd.config (it imports this).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streamd.errors import ConfigError
from streamd.models.sources import ALIASES, ALIAS_KINDS, is_bare_name

# model names go in URL paths (/api/v1/models/{id}) and metric labels: the stream id pattern
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"
BUDGET_DEVICE_PATTERN = r"^(cpu|cuda(:\d+)?|mps)$"
PINNED = -1.0  # keep_alive_s of a model that is never unloaded for being idle (nor evicted)

Kind = Literal["detector", "segmenter", "vlm", "sam2"]
Precision = Literal["auto", "fp32", "fp16", "bf16", "8bit", "4bit"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.I)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def parse_budget(value: Any) -> int | float:
    """A budget: bytes (an int, or "8GiB", "512 MB"), or a share of the device's memory (a float in (0, 1], or
    "70%"). Returns int bytes or a float fraction."""
    if isinstance(value, bool):
        raise ValueError("a budget is bytes (8GiB, 512MB, an integer) or a fraction (0.7, 70%)")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a budget in bytes must be positive")
        return value
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError("a fractional budget is in (0, 1]; give bytes with a unit (8GiB) for more")
        return value
    if isinstance(value, str):
        s = value.strip()
        if s.endswith("%") and re.fullmatch(r"\d+(\.\d+)?", s[:-1].strip()):
            return parse_budget(float(s[:-1]) / 100)
        m = _SIZE.match(s)
        if m is not None and m.group(2).lower() in _UNITS:
            return parse_budget(int(float(m.group(1)) * _UNITS[m.group(2).lower()]))
    raise _bad_budget(value)


def _bad_budget(value: Any) -> ValueError:
    return ValueError(f"{value!r} is not a budget: bytes with a unit (8GiB, 512MB, 1.5GB), an integer of bytes, "
                     "or a fraction of the device's memory (0.7, 70%)")


class DetectorOptions(_Strict):
    """`options` of a detector or segmenter (Ultralytics)."""

    runtime: Literal["auto", "torch", "onnx"] = Field("auto", description="plain detection models on the CPU: "
                                                      "onnx (ONNX Runtime), torch, or auto")
    lanes: int | None = Field(None, ge=1, le=64, description="CPU forward passes at once; null: from the cores")
    forward_batch: int = Field(8, ge=1, description="most frames in one forward pass (the model's batcher, shared "
                               "by every stage and predict request that uses it)")


class VlmModelOptions(_Strict):
    """`options` of a vlm (transformers, in process)."""

    generate_batch: int = Field(8, ge=1, description="questions in one generate call (the model's batcher, shared "
                                "by every stage that uses it)")
    max_wait_ms: float = Field(20.0, ge=0, description="wait this long for a fuller generate batch")


class Sam2ModelOptions(_Strict):
    """`options` of a sam2 model (the segment stage's SAM 2 mask tracker: streamd/stages/segment/)."""

    checkpoint: str = Field("hub", min_length=1, description="a local SAM 2 checkpoint file (.pt); hub: the "
                            "source's weights from the Hugging Face hub (needs internet once, then cached); "
                            "random: untrained weights (tests and benchmarks: the masks mean nothing)")
    forward_batch: int = Field(8, ge=1, description="most frames (of any streams, of every pipeline that uses the "
                               "model) in one pass of the image encoder (the model's batcher)")
    image_size: int | None = Field(None, ge=128, le=2048, multiple_of=32, description="the square input size; "
                                   "null: the model config's (1024)")


OPTIONS: dict[str, type[_Strict]] = {"detector": DetectorOptions, "segmenter": DetectorOptions,
                                     "vlm": VlmModelOptions, "sam2": Sam2ModelOptions}
# the options that set the shared batcher, not the loaded weights: not part of a model's identity
BATCHING_OPTIONS = frozenset({"forward_batch", "generate_batch", "max_wait_ms"})
# `max_batch` is a stage's own (frames a stage takes from its queue at once); a model's batch has its own name
RENAMED_OPTIONS = {"detector": {"max_batch": "forward_batch"}, "segmenter": {"max_batch": "forward_batch"},
                   "vlm": {"max_batch": "generate_batch"}}


class ModelSpec(_Strict):
    """One model of the catalog."""

    source: str = Field(..., min_length=1, description="a file or folder (.pt .yaml .onnx .engine, a transformers "
                        "folder), an alias (person), or a Hugging Face hub id (org/name)")
    kind: Kind = Field("detector", description="detector (Ultralytics, also YOLO-World/YOLOE), segmenter "
                       "(Ultralytics -seg models), vlm (transformers, in process) or sam2 (SAM 2 mask "
                       "tracking, the segment stage)")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto (cuda:0 where there is a GPU, else cpu), "
                        "cpu, cuda:N, mps")
    precision: Precision = Field("auto", description="auto (the model's own; fp32 for detectors), fp32, fp16, bf16; "
                                 "8bit / 4bit: vlm on CUDA (bitsandbytes)")
    options: dict[str, Any] = Field(default_factory=dict, description="per kind: detector/segmenter: runtime, "
                                    "lanes, forward_batch; vlm: generate_batch, max_wait_ms; sam2: checkpoint, image_size, "
                                    "forward_batch")
    keep_alive_s: float | None = Field(None, description="seconds without a user before the model is unloaded; "
                                       "-1: pinned (never unloaded for being idle, never evicted); null: "
                                       "models.keep_alive_s")
    preload: bool = Field(False, description="load when the daemon starts instead of on first use")

    @field_validator("keep_alive_s")
    @classmethod
    def _keep_alive(cls, v: float | None) -> float | None:
        if v is not None and v != PINNED and v < 0:
            raise ValueError("keep_alive_s is -1 (pinned) or at least 0")
        return v

    @model_validator(mode="after")
    def _by_kind(self) -> "ModelSpec":
        if self.kind != "vlm" and self.precision in ("8bit", "4bit"):
            raise ValueError(f"precision {self.precision} is for vlm models (bitsandbytes); a {self.kind} takes "
                             "auto, fp32, fp16 or bf16")
        for old, new in RENAMED_OPTIONS.get(self.kind, {}).items():
            if old in self.options:
                raise ValueError(f"options.{old}: a {self.kind}'s batch is options.{new} ({old} is a stage's own "
                                 "option: the frames the stage takes from its queue at once)")
        try:
            OPTIONS[self.kind].model_validate(self.options)
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"options.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return self

    def typed_options(self) -> Any:
        return OPTIONS[self.kind].model_validate(self.options)


class ModelsConfig(_Strict):
    """Declared models and memory budgets (streamd/models/)."""

    budget: dict[str, int | float] = Field(default_factory=dict, description="device (cpu, cuda:0 ...) -> most "
                                           "memory its models may hold: bytes (8GiB, 512MB) or a fraction of the "
                                           "device's memory (0.7, 70%); a device not named has no budget")
    keep_alive_s: float = Field(300.0, description="default idle time before a model is unloaded (seconds; -1 "
                                "pinned), also for models a pipeline names by their source")
    catalog: dict[str, ModelSpec] = Field(default_factory=dict, description="name -> model; pipelines name "
                                          "these (`model: <name>`)")

    @field_validator("budget", mode="before")
    @classmethod
    def _budgets(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for dev, b in v.items():
            dev = "cuda:0" if dev == "cuda" else dev
            if not isinstance(dev, str) or not re.fullmatch(BUDGET_DEVICE_PATTERN, dev):
                raise ValueError(f"{dev!r} is not a device (cpu, cuda, cuda:N, mps)")
            out[dev] = parse_budget(b)
        return out

    @field_validator("keep_alive_s")
    @classmethod
    def _keep_alive(cls, v: float) -> float:
        if v != PINNED and v < 0:
            raise ValueError("keep_alive_s is -1 (pinned) or at least 0")
        return v

    @field_validator("catalog")
    @classmethod
    def _names(cls, v: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        for name in v:
            if not re.fullmatch(MODEL_NAME_PATTERN, name):
                raise ValueError(f"model name {name!r}: a letter or digit, then up to 127 letters, digits, _ . : -")
        return v


# stage keys that belong to a declared model: set on `models.catalog.<name>`, not on the stage
OWNED_BY_MODEL = {"detect": ("device", "half", "runtime", "lanes", "forward_batch"),
                  "vlm": ("device", "dtype", "quantization", "generate_batch", "max_wait_ms"),
                  "segment": ("device", "precision", "checkpoint", "image_size")}
STAGE_KINDS = {"detect": ("detector", "segmenter"), "vlm": ("vlm",), "segment": ("sam2",)}


def stage_model(stage: dict[str, Any]) -> str | None:
    """The model a stage's options name through the model manager, or None (no model, or a remote VLM)."""
    t = stage.get("type")
    if t == "detect":
        m = stage.get("model", "person")
    elif t == "vlm" and stage.get("backend") == "transformers":
        m = stage.get("model")
    elif t == "segment":
        m = stage.get("model", "sam2.1-hiera-tiny")
    else:
        return None
    return m if isinstance(m, str) else None


def check_stage_model(models: ModelsConfig, stage: dict[str, Any], where: str) -> None:
    """A stage's `model`: a declared name (of a kind the stage runs, without stage keys the declaration owns), an
    alias, or a source (a path with a dot or slash, a hub id). Raises ConfigError naming `<where>.<key>`."""
    model = stage_model(stage)
    if model is None:
        return
    t = stage["type"]
    spec = models.catalog.get(model)
    if spec is not None:
        if spec.kind not in STAGE_KINDS[t]:
            raise ConfigError(f"{where}.model", f"model {model!r} is a {spec.kind} (models.catalog.{model}.kind); "
                              f"a {t} stage runs a {' or '.join(STAGE_KINDS[t])}")
        for key in OWNED_BY_MODEL[t]:
            if key in stage:
                raise ConfigError(f"{where}.{key}", f"model {model!r} is declared: set its {key} on "
                                  f"models.catalog.{model} (device, precision, options), not on the stage")
        return
    if model in ALIASES:
        if ALIAS_KINDS.get(model) not in STAGE_KINDS[t]:
            raise ConfigError(f"{where}.model", f"alias {model!r} is a {ALIAS_KINDS.get(model)}")
        return
    if is_bare_name(model):
        declared = ", ".join(sorted(models.catalog)) or "none"
        raise ConfigError(f"{where}.model", f"unknown model {model!r}: not declared in models.catalog (declared: "
                          f"{declared}) and not an alias ({', '.join(sorted(ALIASES))}); a file needs its "
                          "extension or a path (./name), a hub id its org (org/name)")


def check_pipeline_models(cfg: Any) -> None:
    """Every model named by the config's pipelines (inline, and the files its streams name) is declared, an alias
    or a source. A pipeline that cannot be found or read is left to the pipeline checks (they name it better)."""
    from streamd import pipelines as pipeline_files  # it imports streamd.config, which imports this module

    models: ModelsConfig = cfg.models
    batching = BatchingSettings()
    for name, pcfg in cfg.pipelines.items():
        for j, st in enumerate(pcfg.stages):
            stage = st.model_dump(exclude_unset=True)
            check_stage_model(models, stage, f"pipelines.{name}.stages.{j}")
            batching.check(stage, f"pipelines.{name}.stages.{j}")
    for i, s in enumerate(cfg.streams):
        if s.pipeline in cfg.pipelines:
            continue
        try:
            pcfg = pipeline_files.resolve(cfg, s.pipeline, f"streams.{i}.pipeline")
        except ConfigError:
            continue
        for j, st in enumerate(pcfg.stages):
            stage = st.model_dump(exclude_unset=True)
            where = f"streams.{i}.pipeline[{s.pipeline}].stages.{j}"
            check_stage_model(models, stage, where)
            batching.check(stage, where)


# a stage's options that set its model's batcher (a model named by alias or source), by stage type
STAGE_BATCHING = {"detect": ("forward_batch",), "vlm": ("generate_batch", "max_wait_ms")}


class BatchingSettings:
    """The batching options stages set on the models they name: a model has one batcher, so two stages that set
    one of its options to different values are a configuration error (not "the first pipeline to load it wins")."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str, str], tuple[Any, str]] = {}  # (type, model, device, key) -> value, where

    def check(self, stage: dict[str, Any], where: str) -> None:
        model = stage_model(stage)
        if model is None:
            return
        t = stage["type"]
        for key in STAGE_BATCHING.get(t, ()):
            if key not in stage:
                continue
            ident = (t, model, str(stage.get("device", "auto")), key)
            first = self._seen.setdefault(ident, (stage[key], where))
            if first[0] != stage[key]:
                raise ConfigError(f"{where}.{key}", f"model {model!r} has one batcher, shared by every stage that "
                                  f"names it: {key} {stage[key]!r} here, {first[0]!r} at {first[1]}.{key} (set "
                                  "the same value, or declare the model once in models.catalog with its options)")
