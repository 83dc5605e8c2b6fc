"""POST /api/v1/predict/{pipeline}: one image through a running pipeline, answered with the outputs a result record
of that frame would carry (streamd/streams/predict.py does the queueing). The body is the image (image/jpeg,
image/png; WEBP, BMP and TIFF decode too) or multipart/form-data with a file part; it is read within
api.predict.max_image_bytes and decoded within api.predict.max_pixels (checked from the header, before decoding)
by the decoder of Redis frame inputs, in a worker thread."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import BodyPartReader, web
from pydantic import BaseModel, Field

from streamd import keys
from streamd import pipelines as pipeline_files
from streamd.api.context import CFG, METRICS
from streamd.api.context import streams as _streams
from streamd.api.errors import ApiError, json_response
from streamd.errors import ConfigError, FrameDecodeError, ImageTooLarge
from streamd.frames import Work
from streamd.sources.redis import decode_image
from streamd.streams.predict import Overloaded, PipelineFailed, PredictError, PredictTimeout, PredictUnavailable

MULTIPART = "multipart/form-data"
RAW_TYPES = ("application/octet-stream",)  # besides image/*: the decoder tells what it is
CHUNK = 1 << 16


class PredictAnswer(BaseModel):
    schema_version: int = Field(..., description="the result record's schema version")
    pipeline: str
    width: int
    height: int
    outputs: dict[str, Any] = Field(..., description="one entry per stage, by stage name: what a result record of "
                                    "this frame carries in `outputs` (detections, tracks ...)")
    prompt_versions: dict[str, Any] = Field(..., description="prompt version used per stage, as in result records")
    models: dict[str, Any] = Field(..., description="per stage with a model: `model` (and `model_version` where "
                                   "the stage gives one), as in its outputs")
    timings_ms: dict[str, float] = Field(..., description="`decode` (the body to pixels), `queue` (accepted to "
                                         "the first stage), each stage's batch time, `total` (accepted to answered)")


async def _read_limited(read: Any, limit: int) -> bytes:
    """The body through `read(n)` (b"" at its end), refused past `limit` bytes without reading further."""
    buf = bytearray()
    while True:
        chunk = await read(CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, "image_too_large", f"the image is over api.predict.max_image_bytes ({limit})",
                           {"max_image_bytes": limit})


async def _image_bytes(request: web.Request, limit: int) -> bytes:
    ctype = request.content_type
    if ctype == MULTIPART:
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue  # a nested multipart: not ours
                ptype = part.headers.get("Content-Type", "")
                if part.filename is not None or ptype.startswith("image/") or part.name in ("image", "file"):
                    return await _read_limited(part.read_chunk, limit)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed multipart body: aiohttp's parser raises ValueError,
            # AssertionError, InvalidHeader ... (hostile bytes must not reach the 500 handler)
            raise ApiError(422, "invalid_image", f"the multipart body cannot be read: {type(e).__name__}",
                           {"reason": "malformed multipart body"}) from None
        raise ApiError(422, "invalid_image", "the multipart body has no file part (a part with a filename, an "
                       "image/* type, or the name image or file)", {"reason": "no file part"})
    if ctype.startswith("image/") or ctype in RAW_TYPES:
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "image_too_large", f"the image is over api.predict.max_image_bytes ({limit})",
                           {"max_image_bytes": limit})
        return await _read_limited(request.content.read, limit)
    raise ApiError(415, "unsupported_media_type", f"Content-Type {ctype!r}: send image/jpeg, image/png or "
                   f"{MULTIPART} with a file part", {"content_type": ctype})


def _decode(data: bytes, max_pixels: int) -> Any:
    try:
        return decode_image({b"image": data}, "image", max_pixels)
    except ImageTooLarge as e:
        raise ApiError(413, "image_too_large", f"the image is {e.width}x{e.height}, over api.predict.max_pixels "
                       f"({e.max_pixels})", {"width": e.width, "height": e.height, "max_pixels": e.max_pixels}) \
            from None
    except FrameDecodeError as e:
        raise ApiError(422, "invalid_image", str(e), {"reason": str(e)}) from None


def _error(name: str, e: PredictError) -> ApiError:
    if isinstance(e, Overloaded):
        return ApiError(503, "overloaded", str(e), {"in_flight": e.in_flight, "queue_size": e.bound,
                                                     "retry_after_s": e.retry_after_s},
                        headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, PredictTimeout):
        return ApiError(503, "predict_timeout", str(e), {"retry_after_s": e.retry_after_s},
                        headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, PipelineFailed):
        return ApiError(422, "pipeline_failed", f"pipeline {name!r} cannot start: {e.reason}", {"reason": e.reason})
    assert isinstance(e, PredictUnavailable), e
    return ApiError(503, "pipeline_unavailable", str(e), headers={"Retry-After": "1"})


OUTCOMES = {"overloaded": "overloaded", "predict_timeout": "timeout", "pipeline_failed": "failed",
            "predict_failed": "failed", "pipeline_unavailable": "unavailable", "image_too_large": "invalid_image",
            "invalid_image": "invalid_image", "unsupported_media_type": "invalid_image"}


def answer(name: str, w: Work, decode_ms: float, total_ms: float) -> dict[str, Any]:
    f = w.frame
    models = {stage: {k: out[k] for k in ("model", "model_version") if k in out}
              for stage, out in w.outputs.items() if isinstance(out, dict) and "model" in out}
    return {"schema_version": keys.SCHEMA_VERSION, "pipeline": name, "width": f.width, "height": f.height,
            "outputs": w.outputs, "prompt_versions": w.prompt_versions, "models": models,
            "timings_ms": {"decode": round(decode_ms, 3), **w.timings_ms, "total": round(total_ms, 3)}}


async def predict(request: web.Request) -> web.Response:
    """One image through pipeline {pipeline} (started if it is not running), batched with its live frames."""
    d = _streams(request)
    name = request.match_info["pipeline"]
    known = pipeline_files.available(d.cfg)
    if name not in known:  # only names of pipelines: never a path to some other YAML file
        raise ApiError(404, "pipeline_not_found", f"no pipeline {name!r}", {"available": known})
    outcome = request.app[METRICS].predict_requests
    try:
        resp = await _predict(request, name)
    except ApiError as e:
        outcome.labels(name, OUTCOMES[e.code] if e.code in OUTCOMES else "failed").inc()  # a metric label
        raise
    outcome.labels(name, "ok").inc()
    return resp


async def _predict(request: web.Request, name: str) -> web.Response:
    cfg = request.app[CFG].predict
    predictor = _streams(request).predict
    try:
        with predictor.request(name):  # the daemon's bound on bodies held at once (api.predict.max_requests)
            predictor.refuse_if_full(name)  # before the body is read: shedding costs nothing
            try:
                async with asyncio.timeout(cfg.timeout_s):  # a body sent slowly holds its place this long at most
                    data = await _image_bytes(request, cfg.max_image_bytes)
            except TimeoutError:
                raise PredictTimeout(name, cfg.timeout_s, 1) from None
            t0 = time.perf_counter()
            image = await asyncio.to_thread(_decode, data, cfg.max_pixels)
            t1 = time.perf_counter()
            w = await predictor.predict(name, image)
    except PredictError as e:
        raise _error(name, e) from None
    except ConfigError as e:  # a pipeline file that does not parse, stages that cannot be built
        raise ApiError(422, "invalid_pipeline", str(e), {"path": "pipeline", "key": e.key}) from None
    if w.error is not None:
        raise ApiError(500, "predict_failed", f"a stage failed on the image: {w.error}", {"reason": w.error})
    t2 = time.perf_counter()
    return json_response(answer(name, w, (t1 - t0) * 1000.0, (t2 - t1) * 1000.0))
