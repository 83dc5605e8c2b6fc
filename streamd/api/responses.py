"""Response bodies of the control API, as pydantic models: they give the OpenAPI document its response schemas
(checked by the schemathesis fuzz test). Handlers build plain dicts; these models describe them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

StreamState = Literal["connecting", "live", "stalled", "backoff", "failed", "stopped", "pending"]


class StreamInfo(BaseModel):
    id: str = Field(..., description="stream id")
    url: str = Field(..., description="the stream reference, credentials redacted (user:***@host)")
    pipeline: str = Field(..., description="name of the pipeline the stream runs through")
    state: StreamState = Field(..., description="supervisor state; `pending` (fleet mode): no daemon runs it yet "
                               "(one takes it when it has room)")
    reason: str | None = Field(..., description="why the stream is in this state (failed, backoff, stalled ...)")
    reason_code: str | None = Field(..., description="the failure class of `reason` (timeout, egress_refused, "
                                    "http_status, not_media, playlist_loop, too_large, ended ...)")
    last_error: str | None = Field(..., description="the last error, kept after the stream recovered")
    fps: float | None = Field(..., description="sampling rate in effect (null = every frame: the default for "
                                               "Redis inputs)")
    fps_in: float = Field(..., ge=0, description="frames decoded per second (over the last second)")
    fps_out: float = Field(..., ge=0, description="results published per second (over the last second)")
    frames_sampled: int = Field(..., ge=0, description="sampled frames queued for the pipeline")
    frames_decoded: int = Field(..., ge=0, description="frames decoded (sampled or not)")
    dropped: int = Field(..., ge=0, description="sampled frames dropped because the stream's queue was full")
    queue_depth: int = Field(..., ge=0, description="frames waiting in the stream's queue")
    last_frame_ts: float | None = Field(..., description="capture time (Unix seconds) of the last sampled frame")
    results: int = Field(..., ge=0, description="result records published by this daemon")
    source: Literal["api", "config"] = Field(..., description="added through the API (kept in Redis) or the config")
    owner: str | None = Field(None, description="fleet mode: the daemon (fleet.member_id) running the stream")
    owner_address: str | None = Field(None, description="fleet mode, a stream only other daemons' config files "
                                      "name: its owner's API address")


class StreamList(BaseModel):
    streams: list[StreamInfo]


class PromptRecord(BaseModel):
    version: int = Field(..., ge=1, description="1, 2, 3 ... per kind and scope")
    kind: Literal["vlm", "vocabulary"]
    scope: str = Field(..., description="global, pipeline:<name> or stream:<id>")
    text: str | None = Field(None, description="vlm: the prompt text")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="vlm: JSON schema of the answer")
    phrases: list[str] | None = Field(None, description="vocabulary: class phrases")
    author: str = Field(..., description="the token's name (or the body's author when no tokens are configured)")
    note: str | None = Field(..., description="free text given with the update")
    created_ts: float = Field(..., description="Unix seconds")
    rolled_back_from: int | None = Field(None, description="the version whose content a rollback copied")
    deleted: bool | None = Field(None, description="a tombstone: the prompt was deleted at this version (no text, "
                                                   "schema or phrases)")


class PromptList(BaseModel):
    prompts: list[PromptRecord]


class PromptHistory(BaseModel):
    total: int = Field(..., ge=1, description="versions in all")
    offset: int = Field(..., ge=0)
    limit: int = Field(..., ge=1)
    versions: list[PromptRecord] = Field(..., description="newest first")


class StageServing(BaseModel):
    model: Any = Field(None, description="the model the running stage serves with now")
    model_version: str | None = Field(None, description="sha256:<16 hex>: a content hash of its loaded weights "
                                      "(null while the manager has it unloaded)")


class StageInfo(BaseModel):
    type: str
    name: str
    model: Any = Field(None, description="the model the stage names, if any (its current version's)")
    serving: StageServing | None = Field(None, description="running on this daemon: what it serves with now")


class LastSwitch(BaseModel):
    state: Literal["loading", "switched", "failed"]
    version: int | None = Field(None, description="the pipeline version it was for")
    stage: str | None = Field(None, description="the stage it was for (null: a pipeline not running here)")
    model: Any = None
    ts: float = Field(..., description="Unix seconds")
    reason: str | None = Field(None, description="failed: why (the old model serves on)")


class PipelineInfo(BaseModel):
    name: str
    description: str | None = None
    stages: list[StageInfo] | None = None
    running: bool | None = Field(None, description="started in this daemon (a stream uses it)")
    streams: list[str] | None = Field(None, description="streams that run through it")
    error: str | None = Field(None, description="why the pipeline file cannot be used (then nothing else is given)")
    version: int | None = Field(None, description="its current version (0: as configured; PATCH "
                                "/api/v1/pipelines/{name} makes a new one)")
    changes: dict[str, dict[str, Any]] | None = Field(None, description="stage name -> options that differ from "
                                                      "the configuration")
    changed_by: str | None = None
    changed_ts: float | None = None
    last_switch: LastSwitch | None = Field(None, description="the last switch on this daemon")


class PipelineList(BaseModel):
    pipelines: list[PipelineInfo]


class LoadedModel(BaseModel):
    model: Any
    device: str
    kind: str
    runtime: str | None = Field(None, description="detectors: what runs the forward passes (onnxruntime, torch, "
                                                  "ultralytics = model.predict); null until the first frame")
    lanes: int | None = Field(None, description="detectors: forward passes that can run at once")
    precision: str | None = Field(None, description="detectors: fp32, fp16 (CUDA) or bf16 (CPU lanes)")


class ModelList(BaseModel):
    loaded: list[LoadedModel]


class Live(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    redis: Literal[True]
    models_loaded: Literal[True]
    failed_pipelines: dict[str, str] = Field(..., description="pipelines whose setup failed (their streams are "
                                                               "failed; the daemon stays ready)")


class StreamHealth(BaseModel):
    state: StreamState
    reason: str | None
    fps_in: float
    fps_out: float
    last_frame_ts: float | None


class PipelineHealth(BaseModel):
    ready: bool = Field(..., description="models loaded, frames flow")
    error: str | None = Field(None, description="why its setup failed")


class RedisHealth(BaseModel):
    healthy: bool = Field(..., description="the result sink's last publish worked")
    reachable: bool = Field(..., description="PING answered now")
    buffered: int = Field(..., ge=0, description="records waiting for Redis")
    catching_up: bool = Field(..., description="an outage's backlog is still being published")
    last_error: str | None


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(..., description="degraded: Redis unreachable, or the records "
                                              "buffered during an outage are still being published")
    redis: RedisHealth
    states: dict[str, int] = Field(..., description="number of streams per state")
    streams: dict[str, StreamHealth]
    pipelines: dict[str, PipelineHealth]


class ClusterMember(BaseModel):
    id: str = Field(..., description="fleet.member_id")
    address: str | None = Field(None, description="its API's address")
    version: str | None
    max_streams: int | None = Field(None, description="its capacity (null: no limit)")
    streams: list[str] = Field(..., description="the streams it holds the lease of")
    load: dict[str, Any] = Field(..., description="owned and running stream counts")
    last_heartbeat: float | None = Field(None, description="epoch seconds")
    heartbeat_age_s: float


class Cluster(BaseModel):
    fleet: bool = Field(..., description="fleet mode on (fleet.enabled)")
    self: str | None = Field(..., description="this daemon's member id")
    instance: str | None = Field(None, description="this daemon's process (two daemons given one member id differ)")
    standing_aside: bool = Field(False, description="another running daemon has this daemon's member id: this one "
                                 "takes no stream while it runs (members: the fleet as Redis has it)")
    standing_aside_reason: str | None = Field(None, description="why it stands aside")
    members: list[ClusterMember]
    streams: int = Field(..., description="streams the fleet runs (leased: not Redis inputs)")
    capacity: float | None = Field(..., description="streams the live members may own in all (null: no limit)")


class Entry(BaseModel):
    id: str = Field(..., description="the Redis stream entry id (<ms>-<seq>): pass it as `after` for the next page")
    record: dict[str, Any] | None = Field(..., description="the record as published (results: the result record; "
                                          "events: the event; vlm: the VLM answer); null if it is not JSON")


class EntryPage(BaseModel):
    stream_id: str
    kind: Literal["results", "events", "vlm"]
    entries: list[Entry] = Field(..., description="oldest first: after `after`, or the newest `limit` without it")
    next_after: str | None = Field(..., description="`after` for the next page (the last entry's id; `after` "
                                   "itself when nothing came)")
    more: bool = Field(..., description="the page is full: there may be more")
