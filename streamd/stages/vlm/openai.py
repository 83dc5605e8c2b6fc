"""The `openai` backend: any OpenAI-compatible chat-completions server (SGLang, vLLM, `transformers serve`,
LM Studio, hosted APIs) through the `openai` client.

Endpoints have weights; fallback endpoints are used only when no primary is available; an endpoint that keeps
failing is taken out for `eject_s`. Retries back off exponentially with jitter on 429/5xx/timeouts and honour
Retry-After. Each endpoint has its own concurrency limit; a request whose `not_after` has passed when it gets an
endpoint's slot is not sent (VlmStale).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from streamd.log import get_logger, redact_url
from streamd.stages.vlm.base import VlmStale

if TYPE_CHECKING:
    from streamd.stages.vlm.base import VlmAnswer, VlmRequest

log = get_logger("streamd.vlm.openai")


class EndpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(..., description="base URL, e.g. http://127.0.0.1:30000/v1")
    weight: float = Field(1.0, gt=0, description="share of requests among primaries")
    fallback: bool = Field(False, description="used only when no primary endpoint is available")
    api_key_env: str | None = Field(None, description="environment variable with the API key")
    max_concurrency: int = Field(4, ge=1, description="requests in flight to this endpoint")
    model: str | None = Field(None, description="model id at this endpoint (default: the stage's model)")


class RetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attempts: int = Field(3, ge=1, description="tries per request, across endpoints")
    initial_s: float = Field(0.2, gt=0, description="first backoff")
    max_s: float = Field(5.0, gt=0, description="longest backoff (and longest Retry-After honoured)")
    eject_after: int = Field(3, ge=1, description="consecutive failures that take an endpoint out")
    eject_s: float = Field(30.0, gt=0, description="how long an endpoint stays out")


@dataclass
class _Endpoint:
    cfg: EndpointConfig
    client: Any
    sem: asyncio.Semaphore
    failures: int = 0
    out_until: float = 0.0
    requests: int = field(default=0)
    structured: bool = True  # False once the server refused `response_format`

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.out_until


class VlmRequestError(Exception):
    pass


def _retry_after(exc: Any) -> float | None:
    resp = getattr(exc, "response", None)
    if resp is None:
        return None
    raw = resp.headers.get("retry-after")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


class OpenAIBackend:
    def __init__(self, model: str, endpoints: list[EndpointConfig], retry: RetryConfig, timeout_s: float,
                 jpeg_quality: int = 85):
        import openai

        self._openai = openai
        self.model = model
        self.jpeg_quality = jpeg_quality
        self.retry = retry
        self.endpoints = [
            _Endpoint(e, openai.AsyncOpenAI(base_url=e.url, api_key=os.environ.get(e.api_key_env or "", "") or "none",
                                            max_retries=0, timeout=timeout_s), asyncio.Semaphore(e.max_concurrency))
            for e in endpoints
        ]

    def _pick(self, tried: set[int]) -> _Endpoint | None:
        for fallback in (False, True):
            pool = [e for i, e in enumerate(self.endpoints)
                    if e.cfg.fallback is fallback and e.available and i not in tried]
            if pool:
                return random.choices(pool, weights=[e.cfg.weight for e in pool])[0]
        return None

    def _retryable(self, exc: BaseException) -> bool:
        o = self._openai
        if isinstance(exc, (o.APITimeoutError, o.APIConnectionError, o.RateLimitError, o.InternalServerError)):
            return True
        return isinstance(exc, o.APIStatusError) and exc.status_code >= 500

    async def chat(self, model: str, messages: list[dict[str, Any]], response_format: dict[str, Any] | None = None,
                   not_after: float | None = None, **kw: Any) -> tuple[Any, str]:
        """One completion. Returns (response, endpoint URL). Raises VlmRequestError after the retries.
        `response_format` (structured output) is sent where the server supports it: an endpoint that answers
        400/422 to it is asked again at once without it, and from then on never with it. When an endpoint's
        concurrency slot is granted (also for a retry) after `not_after` (time.time()), raises VlmStale unsent."""
        delay = self.retry.initial_s
        tried: set[int] = set()
        last: BaseException | None = None
        attempt = 0
        while attempt < self.retry.attempts:
            attempt += 1
            ep = self._pick(tried) or self._pick(set())
            if ep is None:
                raise VlmRequestError(f"no endpoint available (last error: {last})")
            tried.add(self.endpoints.index(ep))
            extra = {"response_format": response_format} if response_format and ep.structured else {}
            try:
                async with ep.sem:
                    if not_after is not None and time.time() > not_after:
                        raise VlmStale(f"stale when the endpoint's slot came: {time.time() - not_after:.1f} s late")
                    ep.requests += 1
                    resp = await ep.client.chat.completions.create(model=ep.cfg.model or model, messages=messages,
                                                                   **kw, **extra)
                ep.failures = 0
                return resp, ep.cfg.url
            except VlmStale:
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                last = e
                if extra and getattr(e, "status_code", None) in (400, 422):
                    ep.structured = False
                    log.warning("VLM endpoint refused structured output; asking without it",
                                endpoint=redact_url(ep.cfg.url))
                    attempt -= 1
                    tried.discard(self.endpoints.index(ep))
                    continue
                ep.failures += 1
                if ep.failures >= self.retry.eject_after:
                    ep.out_until = time.monotonic() + self.retry.eject_s
                    log.warning("VLM endpoint taken out", endpoint=redact_url(ep.cfg.url), for_s=self.retry.eject_s,
                                error=type(e).__name__)
                if not self._retryable(e) or attempt >= self.retry.attempts:
                    break
                wait = _retry_after(e)
                wait = min(wait, self.retry.max_s) if wait is not None else delay * random.uniform(0.8, 1.2)
                delay = min(delay * 2, self.retry.max_s)
                await asyncio.sleep(wait)
        raise VlmRequestError(f"{type(last).__name__}: {last}")

    async def answer(self, req: "VlmRequest") -> "VlmAnswer":
        from streamd.stages.vlm.base import VlmAnswer

        uris = await asyncio.to_thread(lambda: [jpeg_data_uri(im, self.jpeg_quality) for im in req.images])
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": req.text}]}]
        kw: dict[str, Any] = {"max_tokens": req.max_tokens, "temperature": req.temperature}
        if req.schema is not None:
            kw["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "answer", "schema": req.schema, "strict": True}}
        resp, endpoint = await self.chat(self.model, messages, not_after=req.not_after, **kw)
        usage = getattr(resp, "usage", None)
        tokens = {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens} if usage is not None else {}
        return VlmAnswer(resp.choices[0].message.content or "", endpoint, tokens)

    async def aclose(self) -> None:
        for e in self.endpoints:
            await e.client.close()


def jpeg_data_uri(image: Any, quality: int) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
