"""What every VLM backend takes and gives."""

from __future__ import annotations

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


@dataclass
class VlmAnswer:
    text: str
    endpoint: str
    tokens: dict[str, int] = field(default_factory=dict)


class VlmBackend(Protocol):
    async def answer(self, req: VlmRequest) -> VlmAnswer: ...

    async def aclose(self) -> None: ...
