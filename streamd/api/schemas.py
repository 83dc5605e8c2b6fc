"""Request bodies of the control API (pydantic, unknown fields are errors)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from streamd.config import DropPolicy, Playback, ReconnectConfig, RedisInputConfig


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _no_null_defaults(schema: dict[str, Any]) -> None:
    """Drop `"default": null` from properties that cannot be null (it only marks "left out")."""
    for prop in schema.get("properties", {}).values():
        if prop.get("default", 0) is None and not any(x.get("type") == "null" for x in prop.get("anyOf", [])):
            del prop["default"]


class StreamPatch(Body):
    """Fields of a stream that can be changed; the stream restarts with them (its id stays). Left out = unchanged.
    Only `fps` and `drop_policy` may be null (every frame; the source's default policy)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_no_null_defaults)
    # not nullable: the None defaults only mark "left out" (defaults are not validated; an explicit null is)
    url: str = Field(None, min_length=1, max_length=4096)  # type: ignore[assignment]
    pipeline: str = Field(None, max_length=128)  # type: ignore[assignment]
    fps: float | None = Field(None, gt=0, le=240, description="null = every frame")
    queue_size: int = Field(None, ge=1, le=1024)  # type: ignore[assignment]
    drop_policy: DropPolicy | None = Field(None, description="null = drop_oldest for live sources, wait for replay")
    playback: Playback = None  # type: ignore[assignment]
    stall_timeout_s: float = Field(None, gt=0, le=3600)  # type: ignore[assignment]
    open_timeout_s: float = Field(None, gt=0, le=600)  # type: ignore[assignment]
    ffmpeg_options: dict[str, str] = None  # type: ignore[assignment]
    reconnect: ReconnectConfig = None  # type: ignore[assignment]
    redis_input: RedisInputConfig = None  # type: ignore[assignment]


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
