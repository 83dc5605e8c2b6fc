"""What the API and /health say about streams: each stream's state and rates, here or (fleet mode) on the daemon
that runs it."""

from __future__ import annotations

from typing import Any

from streamd.log import redact_url
from streamd.streams.supervisor import StreamRunner


class StreamInfo:
    """Read-only views of the stream manager (mixed into it)."""

    runners: dict[str, StreamRunner]
    api_stream_ids: set[str]
    fleet: Any
    sink: Any
    metrics: Any

    def measure(self, dt: float, last: dict[str, tuple[int, int]]) -> None:
        """Every second or so: each stream's queue depth, and its decoded and published frames per second over the
        last `dt` seconds (`last` keeps the counts between calls)."""
        for sid, r in list(self.runners.items()):
            self.metrics.queue_depth.labels(sid).set(len(r.queue))
            dec, out = r.decoded, self.sink.results_by_stream.get(sid, 0)
            pdec, pout = last.get(sid, (0, 0))
            if dec >= pdec:
                self.metrics.frames_in.labels(sid).inc(dec - pdec)
            r.fps_in, r.fps_out = max(0, dec - pdec) / dt, max(0, out - pout) / dt
            last[sid] = (dec, out)

    def stream_info(self, sid: str) -> dict[str, Any]:
        if sid not in self.runners:
            return self._remote_info(sid)
        r = self.runners[sid]
        return {"id": sid, "url": r.url_redacted, "pipeline": r.cfg.pipeline, "state": r.state.value,
                "reason": r.reason, "reason_code": r.reason_code, "last_error": r.last_error, "fps": r.fps,
                "fps_in": round(r.fps_in, 2), "fps_out": round(r.fps_out, 2),
                "frames_sampled": r.frames, "frames_decoded": r.decoded, "dropped": r.drops.total,
                "queue_depth": len(r.queue), "last_frame_ts": r.last_frame_ts,
                "results": self.sink.results_by_stream.get(sid, 0),
                "source": "api" if sid in self.api_stream_ids else "config",
                "owner": self._owner_here(sid)}

    def _owner_here(self, sid: str) -> str | None:
        """The owner of a stream shown here: this daemon in fleet mode, unless it ended for good (nobody holds it)."""
        if self.fleet is None or sid in self.fleet.fleet.done:
            return None
        return self.fleet.member_id

    def _remote_info(self, sid: str) -> dict[str, Any]:
        """A fleet stream another daemon runs (or none yet): what its owner's heartbeat says."""
        assert self.fleet is not None
        s, origin = self.fleet.cfgs[sid]
        remote = self.fleet.remote(sid) or {}
        owner = remote.get("owner")
        full = self.fleet.full()
        waiting = "no daemon of the fleet has room for it (fleet.max_streams, load limits): it starts when one has" \
            if full else "waiting for a daemon of the fleet to take it"
        return {"id": sid, "url": redact_url(s.url), "pipeline": s.pipeline,
                "state": remote.get("state", "pending" if full else "connecting"),
                "reason": None if owner else waiting,
                "reason_code": None, "last_error": None, "fps": s.fps, "fps_in": 0.0,
                "fps_out": remote.get("fps_out", 0.0), "frames_sampled": 0, "frames_decoded": 0, "dropped": 0,
                "queue_depth": 0, "last_frame_ts": None, "results": 0, "source": origin, "owner": owner}

    def status(self) -> dict[str, Any]:
        return {
            "redis": {"healthy": self.sink.healthy, "buffered": len(self.sink), "last_error": self.sink.last_error},
            "streams": {sid: self.stream_info(sid) for sid in self.runners},
        }
