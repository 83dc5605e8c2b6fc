"""/api/v1/pipelines/{pipeline}: live changes of a pipeline's stages (switch a stage's model), their history and
rollback. The handlers reach the pipelines' switches through the stream manager (STREAMS), never the daemon.

A change answers once the new models are loaded here and switched (200), or once it fails (the old models serve
on); when the load takes longer than the request's `timeout_s` the answer is 202 and the switch goes on (its
outcome: `last_switch` in GET /api/v1/pipelines, the events `model_switched` / `model_switch_failed`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from streamd import pipelines as pipeline_files
from streamd.api.body import json_body, offset_limit
from streamd.api.context import AUTH, PRINCIPAL
from streamd.api.context import streams as _streams
from streamd.api.errors import ApiError, json_response
from streamd.api.models import _error as model_error
from streamd.api.schemas import Body, _PatchBase
from streamd.errors import ConfigError, StageError
from streamd.models.errors import ModelError
from streamd.pipeline_versions import PipelineChanged, VersionNotFound
from streamd.streams.switch import Edit, ModelSwitches, SwitchRefused

DEFAULT_TIMEOUT_S = 60.0


# -- bodies -------------------------------------------------------------------------------------------------------
class StageChange(_PatchBase):
    """One stage and the options it gets; left out = unchanged. Only what a stage can change while it runs: a
    detect stage's model, conf, iou, classes, labels, imgsz, max_det; a vlm stage's model (transformers backend),
    max_tokens, temperature, every_s (anything else: 422)."""

    stage: str | int = Field(..., description="the stage: its name (its key in `outputs`) or its index, from 0")
    model: str = Field(None, min_length=1, max_length=1000, description="a model declared in models.catalog, or "
                       "an alias (person); never a file or URL (422)")
    conf: float = Field(None, ge=0, le=1, description="confidence threshold")
    iou: float = Field(None, ge=0, le=1, description="NMS IoU threshold")
    classes: list[str | int] | None = Field(None, max_length=1000, description="keep only these classes "
                                            "(names or ids); null: all")
    labels: dict[str, str] = Field(None, description="rename model classes in records")
    imgsz: int = Field(None, ge=32, le=2048, description="inference image size (through the API at most 2048: "
                       "each change runs a forward pass at this size)")
    max_det: int = Field(None, ge=1, le=100_000, description="most detections per frame")
    max_tokens: int = Field(None, ge=1, le=32_768, description="vlm: most tokens in an answer")
    temperature: float = Field(None, ge=0, le=2, description="vlm: sampling temperature (0: greedy)")
    every_s: float | None = Field(None, ge=0, description="vlm: ask at most this often per stream (0: every "
                                  "frame; null: never on a timer)")


class PipelinePatch(Body):
    stages: list[StageChange] = Field(..., min_length=1, max_length=64)
    note: str | None = Field(None, max_length=1000)
    author: str | None = Field(None, max_length=200, description="used when no tokens are configured")
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=600, description="answer within this long: once the "
                             "new models are loaded and switched, or 202 while they still load")


class PipelineRollback(Body):
    version: int = Field(..., ge=0, description="the version whose changes come back; 0: as configured")
    note: str | None = Field(None, max_length=1000)
    author: str | None = Field(None, max_length=200)
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=600)


# -- responses ----------------------------------------------------------------------------------------------------
class PipelineVersion(BaseModel):
    pipeline: str
    version: int = Field(..., ge=0, description="1, 2, 3 ... per pipeline; 0: as configured (never stored)")
    stages: dict[str, dict[str, Any]] = Field(..., description="stage name -> the options that differ from the "
                                              "configured pipeline")
    author: str | None = Field(..., description="the token's name (or the body's author when no tokens are "
                               "configured)")
    note: str | None
    created_ts: float | None = Field(..., description="Unix seconds")
    rolled_back_from: int | None = Field(None, description="the version whose changes a rollback copied")


class StageSwitch(BaseModel):
    stage: str
    model: Any = Field(None, description="the model it serves now")
    model_version: str | None = Field(None, description="sha256:<16 hex>: a content hash of the loaded weights")
    from_model: Any = None
    from_version: str | None = None


class SwitchOutcome(BaseModel):
    status: Literal["switched", "saved", "unchanged", "pending"] = Field(..., description="switched: on this "
                                          "daemon's streams; saved: the pipeline does not run here (the models "
                                          "were loaded once to check them); unchanged: nothing to do; pending "
                                          "(202): still loading")
    pipeline: str
    record: PipelineVersion | None = Field(None, description="the version now current (null while pending)")
    switched: list[StageSwitch] = Field(default_factory=list, description="the stages switched here")
    streams: list[str] = Field(default_factory=list, description="this daemon's streams of the pipeline")
    message: str | None = None


class PipelineHistory(BaseModel):
    total: int = Field(..., ge=1, description="versions in all, version 0 included")
    offset: int = Field(..., ge=0)
    limit: int = Field(..., ge=1)
    versions: list[PipelineVersion] = Field(..., description="newest first; version 0 (as configured) last")


# -- handlers -----------------------------------------------------------------------------------------------------
def _switches(request: web.Request) -> ModelSwitches:
    sw = _streams(request).pipelines.switches
    assert sw is not None
    return sw


def _pipeline(request: web.Request) -> str:
    name = request.match_info["pipeline"]
    if name not in pipeline_files.available(_streams(request).cfg):
        raise ApiError(404, "pipeline_not_found", f"no pipeline {name!r} (GET /api/v1/pipelines lists them)")
    return name


def _author(request: web.Request, given: str | None) -> str:
    return request[PRINCIPAL].name if request.app[AUTH].enabled else (given or "anonymous")


async def pipeline_patch(request: web.Request) -> web.Response:
    name = _pipeline(request)
    body = await json_body(request, PipelinePatch)
    edits: list[Edit] = [(c.stage, c.model_dump(include=c.model_fields_set - {"stage"})) for c in body.stages]
    return await _change(request, name, edits, body.author, body.note, body.timeout_s, None)


async def pipeline_rollback(request: web.Request) -> web.Response:
    name = _pipeline(request)
    body = await json_body(request, PipelineRollback)
    return await _change(request, name, [], body.author, body.note or f"rollback to version {body.version}",
                         body.timeout_s, body.version)


async def _change(request: web.Request, name: str, edits: list[Edit], author: str | None, note: str | None,
                  timeout_s: float, rollback_to: int | None) -> web.Response:
    task = _switches(request).start(name, edits, _author(request, author), note, rollback_to)
    try:
        out = await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except TimeoutError:
        return json_response({"status": "pending", "pipeline": name, "record": None, "switched": [], "streams": [],
                              "message": f"the new models are still loading after {timeout_s:g} s; the switch "
                              "happens when they are ready (GET /api/v1/pipelines: last_switch; events "
                              "model_switched, model_switch_failed)"}, status=202)
    except SwitchRefused as e:
        raise ApiError(422, "invalid_body", str(e), {"errors": [{"path": e.path, "message": str(e),
                                                                 "type": "value_error"}]}) from None
    except ConfigError as e:
        raise ApiError(422, "invalid_body", str(e), {"errors": [{"path": e.key, "message": e.message,
                                                                 "type": "value_error"}]}) from None
    except PipelineChanged as e:
        raise ApiError(409, "pipeline_changed", f"{e}: nothing was written; send the change again",
                       {"version": e.current}) from None
    except VersionNotFound:
        raise ApiError(404, "pipeline_not_found", f"pipeline {name!r} has no version {rollback_to}",
                       {"version": rollback_to}) from None
    except ModelError as e:
        raise model_error(e) from None
    except StageError as e:  # the model loaded, and the stage cannot use it (a class it does not have ...)
        raise ApiError(422, "model_load_failed", str(e), {"reason": str(e)}) from None
    return json_response({"pipeline": name, "message": None, **out})


async def pipeline_history(request: web.Request) -> web.Response:
    name = _pipeline(request)
    offset, limit = offset_limit(request)
    total, items = await _switches(request).store.history(name, offset, limit)
    return json_response({"total": total, "offset": offset, "limit": limit, "versions": items})
