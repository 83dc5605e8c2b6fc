"""What every VLM backend takes and gives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class VlmRequest:
    images: list[np.ndarray]  # HxWx3 uint8 RGB, already within the pixel budget; empty for a text-only question
    text: str
    schema: dict[str, Any] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    # wall-clock time (time.time()) after which the question is stale: a backend that queues it (an endpoint's
    # concurrency slot, a batch) checks this when its turn comes and raises VlmStale instead of asking
    not_after: float | None = None
    stream_id: str | None = None  # whose question it is (None: a text-only summary of several frames' captions)
    low: bool = False  # a job's question: the lower priority class of a shared model's batcher (live ones first)


class VlmStale(Exception):
    """The question's turn came after its `not_after`: it was not asked."""


def check_fresh(req: VlmRequest) -> None:
    """Raises VlmStale when `req` is past its `not_after`."""
    if req.not_after is not None and time.time() > req.not_after:
        raise VlmStale(f"stale: {time.time() - req.not_after:.1f} s past its deadline")


@dataclass
class VlmAnswer:
    text: str
    endpoint: str
    tokens: dict[str, int] = field(default_factory=dict)


class VlmBackend(Protocol):
    async def answer(self, req: VlmRequest) -> VlmAnswer: ...

    async def aclose(self) -> None: ...
