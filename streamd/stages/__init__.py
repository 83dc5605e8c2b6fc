"""Stages: batch in, batch out. Implementations are imported only when a pipeline names them, so the CLI and
the control API never import torch.

A stage implements `setup()` / `process(batch)` / `teardown()`; blocking model calls go through `run_blocking`,
which uses one executor thread per device. `reset_stream(stream_id)` drops per-stream state (trackers).
"""

from __future__ import annotations

import asyncio
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from streamd.config import StageConfig
from streamd.errors import ConfigError
from streamd.frames import Work
from streamd.models.executors import device_executor

REGISTRY: dict[str, str] = {
    "frame_info": "streamd.stages.frame_info:FrameInfo",
    "detect": "streamd.stages.detect:Detect",
    "track": "streamd.stages.track:Track",
    "segment": "streamd.stages.segment:Segment",
    "vlm": "streamd.stages.vlm:Vlm",
}



def _no_events(stream_id: str, kind: str, fields: dict[str, Any] | None = None) -> None:
    pass


def _no_fail(stream_id: str, reason: str) -> None:
    pass


@dataclass
class StageContext:
    """What the daemon lends every stage: the shared model registry and the events publisher."""

    models: Any = None  # streamd.models.ModelManager: stages take a ModelRef in setup(), `use()` it per call
    events: Any = field(default=_no_events)  # (stream_id, type, fields) -> None
    prompts: Any = None  # streamd.prompts.PromptCache
    publish: Any = None  # (key, maxlen, record) -> None: records beside the results (VLM answers)
    fail_stream: Any = field(default=_no_fail)  # (stream_id, reason) -> None: fail one stream for good
    metrics: Any = None  # streamd.metrics.Metrics
    jobs_share: float = 0.25  # jobs.share: the least share of a model's batches jobs get under load


class Stage:
    kind: ClassVar[str] = ""
    max_batch: int = 1
    max_wait_ms: float = 0.0
    device: str = "cpu"
    prompt_kinds: tuple[str, ...] = ()  # prompt kinds this stage reads (stamped on each frame at pipeline entry)

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.name = cfg.name or cfg.type
        self.ctx = StageContext()
        self.where = ""  # its config key (streams.0.pipeline[p].stages.1), set by build_stage

    def label(self) -> str:
        """`<pipeline>.<stage>`, as the model catalog lists the stages using a model."""
        m = re.search(r"\[([^\]]+)\]\.stages\.\d+$", self.where) or \
            re.match(r"pipelines\.([^.]+)\.stages\.\d+$", self.where)
        return f"{m.group(1)}.{self.name}" if m else self.name

    def bind(self, ctx: StageContext) -> None:
        self.ctx = ctx

    async def setup(self) -> None:
        """Load what the stage needs (models). Called once before the first batch."""

    async def process(self, batch: list[Work]) -> list[Work]:
        raise NotImplementedError

    async def teardown(self) -> None:
        """Release what setup acquired."""

    def reset_stream(self, stream_id: str) -> None:
        """Reset per-stream state (called on a discontinuity: reconnect, timestamp jump)."""

    def forget_stream(self, stream_id: str) -> None:
        """Drop per-stream state (the stream was removed)."""
        self.reset_stream(stream_id)

    async def settle(self, stream_id: str) -> None:
        """Wait for work still in flight for a stream whose frames have all passed (a VLM's answers)."""

    async def room(self, stream_id: str, limit: int) -> None:
        """Wait until the stream has fewer than `limit` pieces of work in flight beyond its frames (a VLM's
        questions), counting the frames let in by room() that have not reached this stage yet (each may become
        one), then count the frame about to be fed among those; most stages have none."""

    def passed(self, works: list[Work]) -> None:
        """`works` went through this stage (processed, or skipped as failed earlier): see room()."""

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(device_executor(self.device), fn, *args)


def parse_options(model: type[Any], cfg: StageConfig, where: str) -> Any:
    """Validate a stage's options with its own pydantic model; a bad key exits naming its path."""
    from pydantic import ValidationError

    try:
        data = cfg.model_dump()
        if data.get("name") is None:
            data.pop("name", None)
        return model.model_validate(data)  # an explicit null in a stage's own option stays null
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(".".join([where, *map(str, err["loc"])]), err["msg"]) from None


def _import(path: str) -> type[Stage]:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_stage(cfg: StageConfig, where: str) -> Stage:
    path = REGISTRY.get(cfg.type)
    if path is None:
        raise ConfigError(f"{where}.type", f"unknown stage type {cfg.type!r} (known: {', '.join(sorted(REGISTRY))})")
    cls = _import(path)
    stage = cls.from_config(cfg, where) if hasattr(cls, "from_config") else cls(cfg)
    stage.where = where
    return stage
