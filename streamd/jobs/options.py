"""The `jobs:` config section and the body of POST /api/v1/jobs (pydantic; unknown keys are errors)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)


class JobsConfig(_Strict):
    """One-shot jobs (streamd/jobs/): a recorded file or a stream's stored frames through a pipeline."""

    enabled: bool = Field(True, description="take jobs (POST /api/v1/jobs, streamd analyze)")
    max_running: int = Field(2, ge=1, le=64, description="jobs running at once; more wait as `queued`")
    max_queued: int = Field(16, ge=0, le=10_000, description="jobs waiting to run; past it POST /api/v1/jobs answers "
                            "503 jobs_full with Retry-After")
    ttl_s: float = Field(86_400.0, gt=0, le=30 * 86_400, description="a job, its records and its upload expire this "
                         "long after it ends (Redis keys with a TTL)")
    share: float = Field(0.25, gt=0, le=1, description="jobs' share of a shared model's batches while live streams "
                         "run: at most this share of a batch's slots, and at least this share of the frames taken "
                         "while jobs' frames wait (live frames first, jobs in the gaps between them; with no live "
                         "stream, jobs take whole batches and every lane)")
    max_upload_bytes: int = Field(512 << 20, ge=1024, description="largest uploaded video; larger: 413 "
                                  "upload_too_large")
    upload_dir: str = Field(".streamd/jobs", description="folder for uploaded videos while their job runs")
    max_uploads: int = Field(2, ge=1, le=256, description="uploads received at once; past it POST /api/v1/jobs with a "
                             "file answers 503 jobs_full (Retry-After) before reading a byte")
    upload_timeout_s: float = Field(600.0, gt=0, le=86_400, description="an upload must arrive whole within this "
                                    "long; else 408 upload_timeout and nothing is kept")
    queue_size: int = Field(8, ge=1, le=1000, description="frames a job holds between its decoder and the pipeline")
    max_vlm_in_flight: int = Field(4, ge=1, le=256, description="a job's VLM questions in flight: its decoder waits "
                                   "beyond (a job's questions are never skipped)")
    open_timeout_s: float = Field(10.0, gt=0, le=600, description="time to open a job's source and read from it")
    unknown_length_cap_s: float = Field(14_400.0, gt=0, le=7 * 86_400, description="HTTP media of unknown length "
                                        "(chunked, no Content-Length) is read to its end, as a file, but at most "
                                        "this much media time from its first frame: a source that had not ended "
                                        "by then stops the job, `done` with reason_code unknown_length_cap (a "
                                        "job's max_duration_s below it bounds it first)")
    attempts: int = Field(2, ge=1, le=10, description="connections tried before a job's source fails the job")
    records_maxlen: int = Field(1_000_000, ge=1, description="records a job keeps (its Redis stream's MAXLEN)")
    lease_ttl_s: float = Field(15.0, ge=1, le=600, description="a queued or running job is held under a lease its "
                               "daemon renews; a job whose daemon stops renewing it (killed, cut off) this long is "
                               "taken by another daemon on the same Redis (or the same one restarted)")
    retries: int = Field(1, ge=0, le=10, description="a job whose daemon was lost runs again from the start at most "
                         "this many times (its records of the lost attempt removed); then, or when its source "
                         "cannot be read again (a stream's kept frames, an upload on another host), it fails with "
                         "reason_code daemon_lost")


class KeepFrames(_Strict):
    """A stream's sampled frames kept (JPEG, in streamd/frame_store.py) for re-scoring: jobs over {stream, from, to}.
    The stream config's `keep_frames`."""

    max_frames: int = Field(1200, ge=1, le=1_000_000, description="frames kept (the oldest go first)")
    max_bytes: int = Field(256 << 20, ge=1 << 20, description="memory the stream's kept frames may hold")
    max_age_s: float = Field(600.0, gt=0, le=86_400, description="a frame older than this is dropped")


class SceneOptions(_Strict):
    """A stream's `sampling: scene` (its config's `scene`): decoded frames looked at up to `max_fps`; one is kept
    when the mean absolute difference of its 64x36 grey thumbnail against the last kept frame's (0-1) is at least
    `threshold`, or when none was kept for 1/`min_fps` s; near-duplicates are skipped (streamd.sampling)."""

    threshold: float = Field(0.08, gt=0, le=1, description="the change that keeps a frame (a hard cut: about "
                             "0.1-0.4; noise and compression: 0.002-0.01)")
    min_fps: float = Field(0.2, ge=0, le=240, description="the floor: a frame at least this often (0: none)")
    max_fps: float = Field(5.0, gt=0, le=240, description="the ceiling: frames looked at per second")

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> "SceneOptions":
        if self.min_fps > self.max_fps:
            raise ValueError(f"min_fps ({self.min_fps:g}) is above max_fps ({self.max_fps:g})")
        return self


class Sampling(_Strict):
    """Which frames of the video are analysed."""

    mode: Literal["fps", "every_frame", "scene"] = Field("fps", description="fps: by presentation time at `fps`; "
                                                         "every_frame; scene: when the scene changes (below)")
    fps: float = Field(2.0, gt=0, le=240, description="fps mode: frames per second of media time")
    scene_threshold: float = Field(0.08, gt=0, le=1, description="scene mode: keep a frame when the mean absolute "
                                   "difference of its 64x36 grey thumbnail against the last kept frame's (0-1) is "
                                   "at least this")
    min_fps: float = Field(0.2, ge=0, le=240, description="scene mode: the floor: a frame at least this often (0: "
                           "none)")
    max_fps: float = Field(5.0, gt=0, le=240, description="scene mode: the ceiling: frames looked at per second")


class Source(_Strict):
    """Exactly one of `url` (http/https, through the egress policy) or `stream` with `from`/`to` (re-score its
    stored frames). An upload (multipart) sets none of them."""

    url: str | None = Field(None, min_length=1, max_length=4096, description="http(s) URL of a recorded video")
    stream: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$",
                               description="re-score: a stream whose stored frames are analysed")
    from_: float | None = Field(None, alias="from", description="re-score: window start, epoch seconds (negative: "
                                "seconds before now)")
    to: float | None = Field(None, description="re-score: window end, epoch seconds (negative: before now; null: now)")

    @model_validator(mode="after")
    def _one(self) -> "Source":
        if (self.url is None) == (self.stream is None):
            raise ValueError("give exactly one of url or stream")
        if self.url is not None and (self.from_ is not None or self.to is not None):
            raise ValueError("from/to go with stream")
        return self


class PromptChoice(_Strict):
    """A stored prompt version (`scope` and `version`, as GET /api/v1/prompts/{kind}/{scope}/history lists them),
    or an inline prompt (`text`, optional `schema`) used by this job only."""

    scope: str | None = Field(None, max_length=200)
    version: int | None = Field(None, ge=1)
    text: str | None = Field(None, min_length=1, max_length=20_000)
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    @model_validator(mode="after")
    def _one(self) -> "PromptChoice":
        stored, inline = self.version is not None, self.text is not None
        if stored == inline:
            raise ValueError("give a stored version (scope, version) or an inline text")
        if stored and not self.scope:
            raise ValueError("a stored version names its scope")
        return self


class JobSpec(_Strict):
    """The body of POST /api/v1/jobs (multipart: the part named `job`)."""

    source: Source | None = Field(None, description="the video (null with an uploaded file)")
    pipeline: str = Field("default", min_length=1, max_length=200, description="a configured pipeline")
    prompts: dict[Literal["vlm", "vocabulary"], PromptChoice] = Field(default_factory=dict, description="prompt "
                                                                      "versions or inline prompts by kind")
    sampling: Sampling = Field(default_factory=Sampling)
    max_duration_s: float | None = Field(None, gt=0, le=7 * 86_400, description="analyse at most this much media "
                                         "time from the first frame (the job ends `done` with reason_code "
                                         "max_duration when it stops there). A live source (a live HLS playlist, "
                                         "RTSP/RTMP/SRT) needs it: without it the job is refused (422 live_source) "
                                         "or fails with reason_code live_source. HTTP media of unknown length is "
                                         "read to its end, at most jobs.unknown_length_cap_s")
