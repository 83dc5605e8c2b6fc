"""The source contract: an async iterator of frozen Frames plus `aclose()`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from streamd.frames import Frame

# publishes an event on the stream's events stream: (event type, fields)
EventFn = Callable[[str, dict[str, Any]], None]


class Source(Protocol):
    """Iterating yields sampled frames in order; it ends at a clean end of input (a file without `loop`) and
    raises SourceError when the source fails. `aclose()` stops it and releases what it holds."""

    def __aiter__(self) -> "Source": ...

    async def __anext__(self) -> Frame: ...

    async def aclose(self) -> None: ...
