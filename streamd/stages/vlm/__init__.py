"""The VLM stage: asks a vision-language model about frames, beside detection and tracking.

It is a branch: `process()` only decides which frames to ask about and returns at once, so the model's latency
never holds back the pipeline. Answers are published, as they arrive, to ``streamd:{<stream>}:vlm`` with the
frame's seq, the prompt version used, the model, the endpoint, the latency and token counts. A frame's own result
record says whether it was asked about (``outputs.vlm.asked``) and carries the prompt version current for it.

When to ask: every `every_s` seconds of stream time per stream, and at once when the stream's prompt changes.
Requests in flight are bounded; a frame whose request would start later than `staleness_s` after capture is
skipped (counted, published as a ``vlm_skipped`` event) instead of queued.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from streamd import keys
from streamd.config import StageConfig
from streamd.frames import Work
from streamd.log import get_logger
from streamd.stages import Stage, parse_options
from streamd.errors import StageError
from streamd.stages.vlm.base import VlmRequest
from streamd.stages.vlm.openai import EndpointConfig, RetryConfig

log = get_logger("streamd.stage.vlm")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class VlmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["vlm"] = "vlm"
    name: str | None = None
    backend: Literal["openai", "transformers", "sglang"] = Field(
        "openai", description="openai (any OpenAI-compatible server), transformers (in process), sglang (in process)")
    model: str = Field(..., description="model id (openai) or a local path / hub id (transformers, sglang)")
    endpoints: list[EndpointConfig] = Field(default_factory=list, description="openai: the servers")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="transformers: device")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="transformers: dtype")
    quantization: Literal["4bit", "8bit"] | None = Field(None, description="transformers: bitsandbytes (CUDA)")
    max_batch: int = Field(8, ge=1, description="transformers: questions in one generate call")
    max_wait_ms: float = Field(20.0, ge=0, description="transformers: wait this long for a fuller batch")
    retry: RetryConfig = Field(default_factory=RetryConfig)
    prompt: str = Field("Describe what is happening in this image in one sentence.",
                        description="used when the prompt store has no vlm prompt for the stream")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="JSON schema of the answer")
    every_s: float = Field(5.0, ge=0, description="ask at most this often per stream (stream time); 0 = every frame")
    max_in_flight: int = Field(4, ge=1, description="requests in flight for this stage")
    staleness_s: float = Field(10.0, gt=0, description="skip a frame older than this when its turn comes")
    max_pixels: int = Field(448 * 448, ge=64 * 64, description="frames are resized to at most this many pixels")
    jpeg_quality: int = Field(85, ge=30, le=100)
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    timeout_s: float = Field(30.0, gt=0)
    max_text_chars: int = Field(4000, ge=1, description="answers are cut to this length")
    maxlen: int = Field(10_000, ge=1, description="approximate MAXLEN of the vlm stream")


def fit_pixels(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """Resize to at most `max_pixels` pixels, keeping the aspect ratio."""
    h, w = image.shape[:2]
    if w * h <= max_pixels:
        return image
    from PIL import Image

    scale = (max_pixels / (w * h)) ** 0.5
    im = Image.fromarray(image).resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BILINEAR)
    return np.asarray(im)


def clean_text(text: str, limit: int) -> str:
    return _CONTROL.sub("", text or "")[:limit]


class Vlm(Stage):
    kind = "vlm"
    max_batch = 64
    prompt_kinds = ("vlm",)

    def __init__(self, cfg: StageConfig, opts: VlmOptions):
        super().__init__(cfg)
        self.opts = opts
        self.backend: Any = None
        self._owns_backend = False  # shared in-process models are closed by the registry
        self._last_ask: dict[str, tuple[float, Any]] = {}  # stream -> (pts, prompt version)
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(opts.max_in_flight)
        self.asked = 0
        self.answered = 0
        self.skipped = 0
        self.failed = 0

    @classmethod
    def from_config(cls, cfg: StageConfig, where: str) -> "Vlm":
        return cls(cfg, parse_options(VlmOptions, cfg, where))

    async def setup(self) -> None:
        o = self.opts
        if o.backend == "openai":
            from streamd.stages.vlm.openai import OpenAIBackend

            if not o.endpoints:
                raise StageError("the openai backend needs endpoints")
            self.backend = OpenAIBackend(o.model, o.endpoints, o.retry, o.timeout_s, o.jpeg_quality)
            self._owns_backend = True
        elif o.backend == "transformers":
            from streamd.models import resolve_device
            from streamd.stages.vlm.transformers import SharedVlm, load_transformers_vlm

            device = resolve_device(o.device)
            self.device = device
            key = ("vlm", o.model, device, o.dtype, o.quantization)
            self.backend = await self.ctx.models.get(
                key, device, lambda: load_transformers_vlm(o.model, device, o.dtype, o.quantization),
                lambda loaded: SharedVlm(loaded, o.model, device, o.max_batch, o.max_wait_ms))
        else:
            from streamd.stages.vlm.sglang import SglangBackend

            self.backend = SglangBackend(o.model)
            self._owns_backend = True

    async def teardown(self) -> None:
        if self._inflight:  # let answers in flight finish (the daemon's grace period bounds this)
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self.backend is not None and self._owns_backend:
            await self.backend.aclose()

    def reset_stream(self, stream_id: str) -> None:
        self._last_ask.pop(stream_id, None)

    async def process(self, batch: list[Work]) -> list[Work]:
        for w in batch:
            ask = self._due(w)
            w.outputs[self.name] = {"asked": ask}
            if ask:
                task = asyncio.create_task(self._ask(w), name=f"vlm:{w.frame.stream_id}:{w.frame.seq}")
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
        return batch

    def _prompt(self, w: Work) -> tuple[str, dict[str, Any] | None, Any]:
        rec = w.prompts.get("vlm")
        if rec is None:
            return self.opts.prompt, self.opts.schema_, {"scope": "config", "version": 0}
        return rec.get("text") or self.opts.prompt, rec.get("schema"), w.prompt_versions["vlm"]

    def _due(self, w: Work) -> bool:
        f = w.frame
        _, _, version = self._prompt(w)
        last = self._last_ask.get(f.stream_id)
        if last is not None and last[1] == version and f.pts_s - last[0] < self.opts.every_s:
            return False
        if len(self._inflight) >= self.opts.max_in_flight:
            self._skip(w, "too many requests in flight")
            return False
        self._last_ask[f.stream_id] = (f.pts_s, version)
        return True

    def _skip(self, w: Work, reason: str) -> None:
        self.skipped += 1
        self.ctx.events(w.frame.stream_id, "vlm_skipped", {"seq": w.frame.seq, "reason": reason})

    async def _ask(self, w: Work) -> None:
        f = w.frame
        text, schema, version = self._prompt(w)
        async with self._slots:
            age = time.time() - f.capture_ts
            if age > self.opts.staleness_s:
                self._skip(w, f"stale: {age:.1f} s old")
                return
            self.asked += 1
            image = await asyncio.to_thread(fit_pixels, f.image, self.opts.max_pixels)
            req = VlmRequest(image, text, schema, self.opts.max_tokens, self.opts.temperature)
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"schema_version": keys.SCHEMA_VERSION, "stream_id": f.stream_id, "seq": f.seq,
                                   "pts_s": round(f.pts_s, 6), "capture_ts": round(f.capture_ts, 6),
                                   "stage": self.name, "prompt": version, "model": self.opts.model}
            try:
                ans = await self.backend.answer(req)
            except Exception as e:  # noqa: BLE001 - a failed question is recorded, never fatal
                self.failed += 1
                rec.update(error=clean_text(str(e), 500), latency_ms=round((time.perf_counter() - t0) * 1000, 1))
                self.ctx.events(f.stream_id, "vlm_failed", {"seq": f.seq, "reason": rec["error"]})
            else:
                self.answered += 1
                answer = clean_text(ans.text, self.opts.max_text_chars)
                rec.update(endpoint=ans.endpoint, text=answer, latency_ms=round((time.perf_counter() - t0) * 1000, 1))
                if ans.tokens:
                    rec["tokens"] = ans.tokens
                if schema is not None:
                    try:
                        rec["parsed"] = json.loads(answer)
                    except ValueError as e:
                        rec["parse_error"] = str(e)
            rec["publish_ts"] = round(time.time(), 6)
            self.ctx.publish(keys.vlm_key(f.stream_id), self.opts.maxlen, rec)
