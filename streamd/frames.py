"""Plain data carried through a pipeline. No logic beyond trivial accessors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


# the stream ids of single images sent to POST /api/v1/predict (`_predict:<n>`): never a valid stream id (those start
# with a letter or digit)
PREDICT_PREFIX = "_predict:"
# the stream ids of jobs' frames (`_job:<job id>`, streamd/jobs/): never a valid stream id either
JOB_PREFIX = "_job:"
# Work.carry key: tasks that must end before a predict image is answered (a VLM question about it)
AWAITING = "_awaiting"


@dataclass(frozen=True, slots=True)
class InputRef:
    """Where a frame came from, when that place must be told it was handled (a Redis entry to acknowledge).
    `handle` is the input's settlement handle (`streamd.sources.base.Settlement`): the sink calls
    `handle.settled(ref)` once the entry is acknowledged (or will be delivered again), the pipeline
    `await handle.fail(ref, reason)` when a stage failed on it. `server`: the client of the Redis server the entry
    is on when that is not the daemon's own (acknowledged there after its result is written); None: the daemon's
    own Redis (acknowledged in the MULTI/EXEC of its result)."""

    key: str
    group: str
    entry_id: str
    deliveries: int = 1
    handle: Any = field(default=None, compare=False, repr=False)
    server: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Frame:
    """One sampled frame. `image` is HxWx3 uint8 RGB; `pts_s` is the source presentation time in seconds;
    `capture_ts` is the wall-clock time (epoch seconds) the frame was captured or received.
    `discontinuity` marks the first frame after a reconnect or a timestamp jump (trackers reset on it).
    `capture_source` says where `capture_ts` came from: "source" (the input's own clock: an HLS
    EXT-X-PROGRAM-DATE-TIME) or "receive" (when streamd decoded or received it)."""

    stream_id: str
    seq: int
    pts_s: float
    capture_ts: float
    image: np.ndarray
    ref: InputRef | None = None
    discontinuity: bool = False
    meta: dict[str, str] | None = None
    capture_source: str = "receive"  # where capture_ts came from: "source" (e.g. HLS PROGRAM-DATE-TIME) or "receive"

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def predict(self) -> bool:
        """A single image of a predict request: answered to its request through `ref.handle`, never published;
        stateful stages treat it as a stream of its own that ends with it."""
        return self.stream_id.startswith(PREDICT_PREFIX)

    @property
    def job(self) -> bool:
        """A frame of a job (a recorded file, or a stream's stored frames, analysed once): its result goes to the
        job (`ref.handle.answer`), never to a stream's results; it is never skipped as stale."""
        return self.stream_id.startswith(JOB_PREFIX)


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """Follows a stream's last frame through a pipeline: once it reaches the end, nothing of the stream is left in
    any stage (its per-stream state can go)."""

    stream_id: str
    queue: Any = field(default=None, compare=False, repr=False)  # the stream queue it closes (one stream id can
    # have a new queue attached while the old one's last frames are still on their way)


@dataclass(slots=True)
class Work:
    """A frame on its way through the stages: each stage adds its output under its name and its timing."""

    frame: Frame
    outputs: dict[str, Any] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    prompt_versions: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> {scope, version}
    prompts: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> the prompt record used
    error: str | None = None
    carry: dict[str, Any] = field(default_factory=dict)  # stage-to-stage data that is not published
