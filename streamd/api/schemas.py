"""Request bodies of the control API (pydantic, strict types, unknown fields are errors)."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from streamd.config import StreamConfig


class Body(BaseModel):
    """API request bodies are validated in strict mode (app._json_body): no "2" for 2, no "yes" for true."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _no_null_defaults(schema: dict[str, Any]) -> None:
    """Drop `"default": null` from properties that cannot be null (it only marks "left out")."""
    for prop in schema.get("properties", {}).values():
        if prop.get("default", 0) is None and not any(x.get("type") == "null" for x in prop.get("anyOf", [])):
            del prop["default"]


def _patch_fields() -> dict[str, Any]:
    """StreamConfig's fields but `id`, with its types, bounds and descriptions, each optional: left out =
    unchanged. The None default only marks "left out" (defaults are not validated); an explicit null is validated
    like any value, so only fields StreamConfig lets be null (`fps`, `drop_policy`) may be null."""
    fields: dict[str, Any] = {}
    for name, f in StreamConfig.model_fields.items():
        if name == "id":
            continue
        patch = copy.copy(f)
        patch.default, patch.default_factory = None, None
        fields[name] = (f.annotation, patch)
    return fields


class _PatchBase(Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=_no_null_defaults)


# PATCH: the fields of POST (StreamConfig) but `id`, with the same bounds and checks (one definition)
StreamPatch = create_model("StreamPatch", __base__=_PatchBase, __module__=__name__,
                           __validators__={"_plain_options": field_validator("ffmpeg_options")(
                               classmethod(StreamConfig._plain_options.__func__))},  # type: ignore[attr-defined]
                           **_patch_fields())
StreamPatch.__doc__ = ("Fields of a stream to change (its id stays); left out = unchanged. `fps` and "
                       "`stall_timeout_s` apply to the running stream, other fields restart it; a change that "
                       "changes nothing does nothing. Only `fps` and `drop_policy` may be null.")
StreamPatch.model_rebuild(force=True)


Phrase = Annotated[str, Field(min_length=1, max_length=500, pattern=r"\S", description="a class phrase (not blank)")]


class PromptUpdate(Body):
    text: str | None = Field(None, max_length=20_000, description="vlm: the prompt text (a template)")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="vlm: JSON schema of the answer")
    phrases: list[Phrase] | None = Field(None, min_length=1, max_length=1000,
                                      description="vocabulary: class phrases for open-vocabulary detection")
    note: str | None = Field(None, max_length=1000)
    author: str | None = Field(None, max_length=200, description="used when no tokens are configured")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Rollback(Body):
    version: int = Field(..., ge=1)
    note: str | None = Field(None, max_length=1000)
    author: str | None = Field(None, max_length=200)


PromptKind = Literal["vlm", "vocabulary"]
