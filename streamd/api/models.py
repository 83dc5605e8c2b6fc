"""/api/v1/models: the model catalog (state, device, precision, memory, load time, last use, users), loading and
unloading by hand. The handlers reach the model manager through the MODELS key, never the daemon."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from streamd.api.context import models as _models
from streamd.api.errors import ApiError, json_response
from streamd.models.errors import InsufficientMemory, ModelConflict, ModelError, ModelInUse, UnknownModel


class ModelUsers(BaseModel):
    stages: list[str] = Field(..., description="<pipeline>.<stage> of every stage holding the model")
    streams: list[str] = Field(..., description="streams whose frames use it now (it is in use while any does)")


class ModelInfo(BaseModel):
    name: str = Field(..., description="its catalog name: declared (models.catalog), an alias, or named after the "
                                       "source a pipeline gave")
    source: str
    kind: str = Field(..., description="detector, segmenter or vlm")
    origin: str = Field(..., description="declared, alias or pipeline")
    state: str = Field(..., description="unloaded, loading, ready, unloading or failed")
    reason: str | None = Field(None, description="failed: why; unloaded: why it was last unloaded (idle, evicted, "
                                                 "by hand)")
    device: str
    precision: str
    memory_bytes: int = Field(..., description="held now: CUDA allocator bytes on a GPU, parameter and buffer "
                                               "bytes on the CPU (memory_method)")
    memory_method: str | None = Field(None, description="cuda_allocator or tensor_bytes; null before a load")
    host_rss_delta_bytes: int | None = Field(None, description="the process's RSS after the load minus before "
                                                               "(for comparison; other threads move it too)")
    load_seconds: float | None
    loaded_at: float | None = Field(None, description="unix time of the last load")
    last_used: float | None = Field(None, description="unix time its last call ended or its last stream left")
    keep_alive_s: float = Field(..., description="idle time before it is unloaded; -1 pinned")
    pinned: bool
    preload: bool
    loads: int
    users: ModelUsers
    version: str | None = Field(None, description="while loaded: sha256:<16 hex>, a content hash of the weights "
                                "(of the file, a folder's weight files, or the loaded tensors: version_method)")
    version_method: str | None = Field(None, description="file, folder, weights or none")


class DeviceBudget(BaseModel):
    device: str
    budget: int | float = Field(..., description="as configured: bytes, or a fraction of the device's memory")
    budget_bytes: int | None = Field(None, description="in bytes (null: the device's memory is unknown here)")
    used_bytes: int = Field(..., description="held by the models on it, and set aside for loads under way")


class ModelCatalog(BaseModel):
    models: list[ModelInfo]
    budgets: list[DeviceBudget]
    loaded: list[dict[str, Any]] = Field(..., description="the ready models as earlier versions listed them: "
                                         "model (source), device, kind, runtime, lanes, precision")


def _name(request: web.Request) -> str:
    name = request.match_info["id"]
    try:
        _models(request).get_entry(name)
    except UnknownModel:
        raise ApiError(404, "model_not_found", f"no model {name!r} in the catalog (GET /api/v1/models lists "
                       "them)") from None
    return name


def _force(request: web.Request) -> bool:
    raw = request.query.get("force", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ApiError(422, "invalid_query", "force is true or false", {"path": "force"})
    return raw in ("true", "1")


def _error(e: ModelError) -> ApiError:
    if isinstance(e, InsufficientMemory):
        return ApiError(409, "insufficient_memory", str(e), e.details())
    if isinstance(e, ModelInUse):
        return ApiError(409, "model_in_use", str(e), {"users": e.users})
    if isinstance(e, ModelConflict):
        return ApiError(409, "model_conflict", str(e), {"reason": str(e)})
    return ApiError(422, "model_load_failed", str(e), {"reason": str(e)})


def _shielded(coro: Any) -> asyncio.Future[Any]:
    """A state change that goes on when the client goes away (its outcome is then only logged by the manager)."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def models_list(request: web.Request) -> web.Response:
    m = _models(request)
    return json_response({"models": m.catalog(), "budgets": m.budgets(), "loaded": m.loaded()})


async def model_load(request: web.Request) -> web.Response:
    """Loads now (evicting idle models if the budget needs it) and answers once it is ready. The load goes on if
    the client goes away."""
    name = _name(request)
    task = _shielded(_models(request).load(name))
    try:
        e = await asyncio.shield(task)
    except ModelError as err:
        raise _error(err) from None
    return json_response(e.info())


async def model_delete(request: web.Request) -> web.Response:
    """Unloads now; 409 model_in_use while streams use it, unless ?force=true (those streams fail, with the
    reason)."""
    name = _name(request)
    task = _shielded(_models(request).unload(name, force=_force(request)))
    try:
        e = await asyncio.shield(task)
    except ModelError as err:
        raise _error(err) from None
    return json_response(e.info())
