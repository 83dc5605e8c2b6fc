"""Request bodies of the control API (pydantic, unknown fields are errors)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from streamd.config import DropPolicy, Playback, ReconnectConfig, RedisInputConfig


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamPatch(Body):
    """Fields of a stream that can be changed; the stream restarts with them (its id stays)."""

    url: str | None = Field(None, min_length=1, max_length=4096)
    pipeline: str | None = Field(None, max_length=128)
    fps: float | None = Field(None, gt=0, le=240)
    queue_size: int | None = Field(None, ge=1, le=1024)
    drop_policy: DropPolicy | None = None
    playback: Playback | None = None
    stall_timeout_s: float | None = Field(None, gt=0, le=3600)
    open_timeout_s: float | None = Field(None, gt=0, le=600)
    ffmpeg_options: dict[str, str] | None = None
    reconnect: ReconnectConfig | None = None
    redis_input: RedisInputConfig | None = None


class PromptUpdate(Body):
    text: str | None = Field(None, max_length=20_000, description="vlm: the prompt text (a template)")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="vlm: JSON schema of the answer")
    phrases: list[str] | None = Field(None, min_length=1, max_length=1000,
                                      description="vocabulary: class phrases for open-vocabulary detection")
    note: str | None = Field(None, max_length=1000)
    author: str | None = Field(None, max_length=200, description="used when no tokens are configured")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Rollback(Body):
    version: int = Field(..., ge=1)
    note: str | None = Field(None, max_length=1000)
    author: str | None = Field(None, max_length=200)


PromptKind = Literal["vlm", "vocabulary"]
