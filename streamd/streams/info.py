"""What the API and /health say about streams: each stream's state and rates, here or (fleet mode) on the daemon
that runs it."""

from __future__ import annotations

import time
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

    def _live_others(self) -> list[tuple[str, dict[str, Any]]]:
        """Fleet mode: the other live members' records (heartbeat within three renew intervals; this daemon's own
        record is older than its runners, but while it stands aside the record of its id is the other daemon's)."""
        f = self.fleet.fleet
        now, stale = time.time(), max(3 * f.cfg.renew_s, 1.0)
        return [(m, rec) for m, rec in sorted(f.members.items())
                if (m != f.member_id or f.duplicate is not None) and now - float(rec.get("heartbeat") or 0) <= stale]

    def elsewhere(self, sid: str) -> dict[str, Any] | None:
        """Fleet mode: a stream this daemon neither runs nor knows the configuration of (another daemon's config
        file names it, this one's does not) while a live member runs it: what that member's heartbeat says of it
        (owner, owner_address, state, fps_out, heartbeat ...); else None."""
        if self.fleet is None or sid in self.runners or sid in self.fleet.cfgs:
            return None
        found = None
        for m, rec in self._live_others():
            st = ((rec.get("load") or {}).get("streams") or {}).get(sid)
            if st is not None and (found is None or not st.get("ended")):  # its owner's word first, if one runs it
                found = {"owner": None if st.get("ended") else m, "owner_address": rec.get("address"), **st,
                         "heartbeat": rec.get("heartbeat")}  # (one that ended for good, `ended`: no owner)
                if not st.get("ended"):
                    break
        return found

    def elsewhere_ids(self) -> list[str]:
        """The ids of every stream `elsewhere` answers for."""
        if self.fleet is None:
            return []
        ids = {sid for _, rec in self._live_others() for sid in ((rec.get("load") or {}).get("streams") or {})}
        return sorted(ids - set(self.runners) - set(self.fleet.cfgs))

    def _remote_info(self, sid: str) -> dict[str, Any]:
        """A fleet stream another daemon runs (or none yet): what its owner's heartbeat says."""
        assert self.fleet is not None
        if sid not in self.fleet.cfgs:  # one only other daemons' config files name
            return self._elsewhere_info(sid, self.elsewhere(sid) or {})
        s, origin = self.fleet.cfgs[sid]
        remote = self.fleet.remote(sid) or {}
        owner = remote.get("owner")
        full = self.fleet.full()
        waiting = "no daemon of the fleet has room for it (fleet.max_streams, load limits): it starts when one has" \
            if full else "waiting for a daemon of the fleet to take it"
        return {"id": sid, "url": redact_url(s.url), "pipeline": s.pipeline,
                "state": remote.get("state", "pending" if full else "connecting"),
                "reason": remote.get("reason") if remote.get("ended") else None if owner else waiting,
                "reason_code": remote.get("reason_code"), "last_error": None, "fps": s.fps, "fps_in": 0.0,
                "fps_out": remote.get("fps_out", 0.0), "frames_sampled": 0, "frames_decoded": 0, "dropped": 0,
                "queue_depth": 0, "last_frame_ts": None, "results": 0, "source": origin, "owner": owner}

    @staticmethod
    def _elsewhere_info(sid: str, remote: dict[str, Any]) -> dict[str, Any]:
        """A stream of another daemon's config file (this daemon's does not name it): what its owner's heartbeat
        says (its URL, redacted, and pipeline when the owner's version says them)."""
        return {"id": sid, "url": remote.get("url") or "", "pipeline": remote.get("pipeline") or "",
                "state": remote.get("state", "connecting"), "reason": remote.get("reason"),
                "reason_code": remote.get("reason_code"), "last_error": None,
                "fps": remote.get("fps"), "fps_in": 0.0, "fps_out": remote.get("fps_out", 0.0),
                "frames_sampled": 0, "frames_decoded": 0, "dropped": 0, "queue_depth": 0, "last_frame_ts": None,
                "results": 0, "source": "api" if remote.get("source") == "api" else "config",
                "owner": remote.get("owner"),
                "owner_address": remote.get("owner_address")}

    def status(self) -> dict[str, Any]:
        return {
            "redis": {"healthy": self.sink.healthy, "buffered": len(self.sink), "last_error": self.sink.last_error},
            "streams": {sid: self.stream_info(sid) for sid in self.runners},
        }
