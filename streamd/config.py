"""Configuration: pydantic models (unknown keys are errors), loaded once from YAML, with STREAMD_* overrides.

Every field has a description; `config/streamd.yaml` mirrors them with comments.
"""

from __future__ import annotations

import enum
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streamd.errors import ConfigError
from streamd.jobs.options import JobsConfig, KeepFrames, SceneOptions
from streamd.models.spec import ModelsConfig, check_pipeline_models


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DropPolicy(str, enum.Enum):
    """What a full per-stream queue does with a new frame."""

    DROP_OLDEST = "drop_oldest"  # live sources: keep the newest frames, count the drop
    WAIT = "wait"  # replay sources (files, Redis): the producer waits, nothing is lost


class Playback(str, enum.Enum):
    REALTIME = "realtime"  # a file is played at its own pace, like a live camera
    FAST = "fast"  # as fast as the pipeline takes it


class DecodeMode(str, enum.Enum):
    """What a PyAV source decodes (streamd/sources/plan.py)."""

    AUTO = "auto"  # from the measured GOP and fps: keyframes, the GOP up to its last due frame, or everything
    ALL = "all"  # every frame
    KEYFRAMES = "keyframes"  # keyframes only: the one nearest each due time


class RedisConfig(Strict):
    url: str | None = Field(None, description="redis:// URL; null starts an embedded redis-server (data in data_dir)")
    cluster: bool = Field(False, description="url names one master of a Redis Cluster: every client is a cluster "
                          "client (needs a url; the embedded redis-server is a single server)")
    data_dir: str = Field(".streamd/redis", description="folder for the embedded redis-server's files")
    results_maxlen: int = Field(10_000, ge=1, description="approximate MAXLEN of each results stream")
    events_maxlen: int = Field(10_000, ge=1, description="approximate MAXLEN of each events stream")
    buffer_max_records: int = Field(10_000, ge=1, description="records kept in memory while Redis is unreachable")
    events_reserved: float = Field(0.1, ge=0, le=1, description="share of buffer_max_records kept for events "
                                   "(state changes, gaps, dead letters): results are dropped first")
    publish_batch: int = Field(64, ge=1, le=10_000, description="records sent in one round trip")
    publish_max_wait_ms: float = Field(5.0, ge=0, le=1000, description="under load, how long the oldest buffered "
                                       "record may wait for a fuller batch (0 = never waits)")
    retry_initial_s: float = Field(0.2, gt=0, description="first wait before retrying Redis")
    retry_max_s: float = Field(5.0, gt=0, description="longest wait between Redis retries")
    consumer: str | None = Field(None, description="consumer name for Redis frame inputs (default: host name)")

    @model_validator(mode="after")
    def _cluster_needs_url(self) -> "RedisConfig":
        if self.cluster and not self.url:
            raise ValueError("redis.cluster needs redis.url (the embedded redis-server is a single server)")
        return self


class LogConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    format: Literal["console", "json"] = Field("console", description="console for humans, json for collectors")


class TokenConfig(Strict):
    name: str = Field(..., min_length=1, description="who holds the token (shown in prompt authorship, never the "
                      "token)")
    token: str | None = Field(None, min_length=16, description="the bearer token (prefer token_env)")
    token_env: str | None = Field(None, description="environment variable holding the token")
    scopes: list[Literal["read", "operate", "admin"]] = Field(["read"], min_length=1,
                                                              description="read < operate < admin")

    @model_validator(mode="after")
    def _one_source(self) -> "TokenConfig":
        if not self.token and not self.token_env:
            raise ValueError(f"token {self.name!r}: give token_env (or token)")
        return self

    def value(self, environ: dict[str, str], where: str = "api.tokens") -> str:
        if self.token:
            return self.token
        v = environ.get(self.token_env or "", "")
        if len(v) < 16:
            raise ConfigError(where, f"token {self.name!r}: ${self.token_env} is unset or shorter than 16 characters")
        return v


LOOPBACK = ("127.0.0.1", "localhost", "::1")


class PredictConfig(Strict):
    """POST /api/v1/predict/{pipeline}: single images through a running pipeline (streamd/streams/predict.py)."""

    queue_size: int = Field(16, ge=1, le=10_000, description="images one pipeline holds for predict requests at "
                            "once (queued or in its stages); past it: 503 overloaded with Retry-After")
    timeout_s: float = Field(30.0, gt=0, le=600, description="longest wait for an answer, a model's first load "
                             "included; then 503 predict_timeout")
    max_image_bytes: int = Field(16 << 20, ge=1024, le=1 << 30, description="largest image body (or multipart "
                                 "file part); larger: 413 image_too_large")
    max_pixels: int = Field(3840 * 2160, ge=1, le=1 << 30, description="largest image (width x height), checked "
                            "from its header before it is decoded; larger: 413 image_too_large")
    max_requests: int = Field(32, ge=1, le=10_000, description="predict requests this daemon takes at once, from "
                              "the first byte of the body to the answer (bounds the memory their bodies hold: at "
                              "most max_requests x max_image_bytes); past it: 503 overloaded with Retry-After")


class ApiConfig(Strict):
    enabled: bool = Field(False, description="serve the HTTP control API")
    bind: str = Field("127.0.0.1", description="address the control API binds")
    port: int = Field(8080, ge=0, le=65535, description="port of the control API (0 = any free port)")
    tokens: list[TokenConfig] = Field(default_factory=list, description="bearer tokens; required beyond loopback")
    max_body_bytes: int = Field(65_536, ge=1024, description="larger request bodies get 413")
    rate_limit_per_s: float = Field(50.0, gt=0, description="requests per second per token (or client address)")
    rate_limit_burst: int = Field(100, ge=1, description="burst allowance of the rate limit")
    auth_failure_limit: int = Field(20, ge=1, description="refused tokens from one client address within "
                                    "auth_failure_window_s; then 429 too_many_auth_failures, the token unchecked")
    auth_failure_window_s: float = Field(60.0, gt=0, le=86_400, description="the window of auth_failure_limit")
    redis_pool: int = Field(64, ge=1, le=10_000, description="Redis connections of the API (and prompt store); a "
                            "request waits up to 2 s for a free one, then 503 busy")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS (none = CORS off)")
    allowed_schemes: list[str] = Field(["rtsp", "rtsps", "http", "https", "rtmp", "rtmps", "srt", "redis", "rediss"],
                                       description="stream URL schemes accepted from the API")
    deny_private_addresses: bool = Field(True, description="check API-added URLs against the egress policy when "
                                                           "they are added (422 instead of a failed stream)")
    redis_key_prefix: str = Field("frames:", min_length=1, description="redis: inputs added through the API must "
                                  "name a key starting with this (never a streamd: key)")
    public_health: bool = Field(True, description="/health/live and /health/ready answer without a token")
    ui: bool = Field(True, description="serve the web page at / (its files need no token; what it shows does)")
    predict: PredictConfig = Field(default_factory=PredictConfig, description="single-image predict requests")


class EgressConfig(Strict):
    """The one policy for every connection a stream makes (streamd/egress.py)."""

    deny_non_global: bool = Field(True, description="refuse loopback, private, link-local, CGNAT, documentation, "
                                  "benchmarking, 6to4 ... addresses unless `allow` names them")
    allow: list[str] = Field(default_factory=list, description="CIDRs (10.0.0.0/8) or host names (cam.lan, "
                             "*.lan) that may be reached although not global")
    max_redirects: int = Field(5, ge=0, le=20, description="HTTP redirects followed per fetch, each hop checked")
    connect_timeout_s: float = Field(10.0, gt=0, le=600, description="TCP connect timeout of one fetch")
    requests_per_s: float = Field(20.0, gt=0, description="HTTP requests per second per stream (a token bucket)")
    request_burst: int = Field(40, ge=1, description="burst allowance of requests_per_s")
    rtsp_transports: list[Literal["tcp", "udp", "udp_multicast", "http", "https"]] = Field(
        ["tcp"], min_length=1, description="rtsp_transport values config-file streams may set (API streams: tcp "
        "only). tcp (interleaved) goes through streamd's RTSP relay, which refuses redirects; with udp/udp_multicast "
        "FFmpeg sends to whatever address the server's SETUP reply names, with http/https its HTTP client follows "
        "redirects anywhere: neither is checked by the egress policy, list them only for cameras you trust")


class HlsConfig(Strict):
    """HLS followed by streamd itself (streamd/sources/hls.py)."""

    start: Literal["live_edge", "first"] = Field("live_edge", description="live playlists: start at the newest "
                                                 "segments or at the first one listed")
    live_edge_segments: int = Field(1, ge=1, le=100, description="live_edge: how many segments back to start")
    variant: Literal["lowest", "highest"] = Field("highest", description="master playlists: the variant by "
                                                  "bandwidth (within max_bandwidth)")
    max_bandwidth: int | None = Field(None, ge=1, description="master playlists: the highest bandwidth to pick")
    max_playlist_bytes: int = Field(2 << 20, ge=1024, description="a playlist larger than this fails the stream "
                                    "(10,000 entries of 200-byte URIs fit)")
    max_playlist_entries: int = Field(10_000, ge=1, description="segments a playlist may list")
    max_segment_bytes: int = Field(64 << 20, ge=1024, description="a segment larger than this fails the stream "
                                   "(held whole in memory: up to 4 per stream at once)")
    segment_timeout_s: float = Field(30.0, gt=0, le=3600, description="time to fetch one segment")
    max_nesting: int = Field(3, ge=1, le=10, description="master -> variant playlist hops")


class ReconnectConfig(Strict):
    initial_s: float = Field(0.5, gt=0, description="first backoff after a failure")
    max_s: float = Field(30.0, gt=0, description="longest backoff")
    multiplier: float = Field(2.0, ge=1, description="backoff growth per failure")
    jitter: float = Field(0.2, ge=0, le=1, description="random +/- fraction applied to each backoff")
    max_attempts: int | None = Field(
        10, ge=0, description="consecutive failures before the stream is marked failed (null = retry forever)"
    )
    reset_after_s: float = Field(30.0, ge=0, description="live this long before the failure count starts again "
                                 "(a flapping source still reaches failed)")


class RedisInputConfig(Strict):
    group: str = Field("streamd", description="consumer group that reads the frame stream")
    image_field: str = Field("image", description="field holding JPEG/PNG bytes or raw pixels")
    max_deliveries: int = Field(3, ge=1, description="deliveries before an entry goes to the dead-letter stream")
    claim_idle_ms: int = Field(30_000, ge=1, description="pending entries idle this long are claimed and retried")
    read_count: int = Field(16, ge=1, description="entries read per XREADGROUP")
    block_ms: int = Field(1000, ge=1, le=5000, description="how long one XREADGROUP blocks (below the Redis "
                          "connection's socket timeout)")
    max_pixels: int = Field(3840 * 2160, ge=1, le=1 << 30, description="largest frame (width x height) an entry may "
                            "carry, checked from the image header or `shape` before decoding (default: a 4K frame)")
    start_id: str = Field("0", pattern=r"^(\$|0|\d+(-\d+)?)$",
                          description="where a new consumer group starts: 0 = whole stream, $ = new entries, "
                                      "or an entry id")


# a letter or digit, then up to 127 letters, digits, `_ . : -` (so never `.` or `..`, never a leading `-`)
STREAM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


class StreamConfig(Strict):
    id: str = Field(..., pattern=STREAM_ID_PATTERN, description="stream id, used in Redis keys and URLs: a letter "
                    "or digit, then up to 127 letters, digits, _ . : -")
    url: str = Field(..., min_length=1, description="rtsp://, http(s)://...m3u8, a file path, redis://host/db#key")
    pipeline: str = Field("default", description="name of the pipeline (pipelines/ or this file's pipelines:)")
    fps: float | None = Field(2.0, gt=0, description="sampling rate by presentation time; null = every frame")
    paused: bool = Field(False, description="kept but not run (no connection, no frames; state stopped, reason "
                         "paused); PATCH paused: false starts it")
    queue_size: int = Field(8, ge=1, le=10_000, description="bounded per-stream queue")
    drop_policy: DropPolicy | None = Field(None, description="null = drop_oldest for live sources, wait for replay")
    playback: Playback = Field(Playback.FAST, description="files: realtime (like a camera) or fast")
    loop: bool = Field(False, description="files: start again at the end")
    stall_timeout_s: float = Field(10.0, gt=0, description="no frame for this long: the stream is stalled")
    open_timeout_s: float = Field(10.0, gt=0, le=3600, description="timeout to open the source and read from it")
    decode: DecodeMode = Field(DecodeMode.AUTO, description="PyAV sources: what is decoded. auto: keyframes only "
                               "when 1/fps is at least the keyframe interval, else each GOP up to its last due "
                               "frame (the frames `all` uses), everything while the last three intervals disagree "
                               "and for good where keys do not decode alone (intra refresh); all: every frame; "
                               "keyframes: the keyframe nearest each due time (off by at most one GOP; one record "
                               "per keyframe at most)")
    decode_threads: int = Field(0, ge=0, le=64, description="decoder threads (0 = one for decode: keyframes and "
                                "for auto at fps <= 2, else FFmpeg decides)")
    hwaccel: Literal["cuda", "vaapi", "qsv", "videotoolbox", "d3d11va", "drm"] | None = Field(
        None, description="PyAV sources (not HLS): decode on this FFmpeg hardware device (cuda = NVDEC); frames are "
        "copied to host memory; a device that cannot be used fails the stream")
    ffmpeg_options: dict[str, str] = Field(default_factory=dict, description="extra FFmpeg demuxer options")
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    redis_input: RedisInputConfig = Field(default_factory=RedisInputConfig, description="for redis:// sources")
    hls: HlsConfig = Field(default_factory=HlsConfig, description="for HLS playlists")
    sampling: Literal["fps", "scene"] = Field("fps", description="fps: a frame every 1/`fps` s of presentation "
                                              "time; scene: a frame when the scene changes (`scene`), `fps` unused")
    scene: SceneOptions = Field(default_factory=SceneOptions, description="sampling: scene: threshold, floor "
                                "(min_fps) and ceiling (max_fps)")
    keep_frames: KeepFrames | None = Field(None, description="re-scoring: keep this stream's sampled frames (JPEG) "
                                           "within these bounds, for jobs over {stream, from, to}; null = only the "
                                           "few snapshot frames (frames.per_stream)")

    @field_validator("ffmpeg_options")
    @classmethod
    def _plain_options(cls, opts: dict[str, str]) -> dict[str, str]:
        """Option names are FFmpeg identifiers; values carry no control character (a CR/LF in `user_agent` would
        inject headers). `headers` alone may hold several "Name: value" lines separated by CRLF."""
        for name, value in opts.items():
            if not re.fullmatch(r"[a-z0-9_]{1,64}", name):
                raise ValueError(f"{name!r} is not an FFmpeg option name")
            lines = value.split("\r\n") if name == "headers" else [value]
            for line in lines:
                if any(ord(c) < 0x20 or ord(c) == 0x7F for c in line):
                    raise ValueError(f"{name}: control characters are not allowed in a value")
            if name == "headers" and any(ln and not re.fullmatch(r"[!#-'*+.0-9A-Z^-z|~-]+:[^\r\n]*", ln)
                                         for ln in lines):
                raise ValueError("headers: each line is 'Name: value', lines separated by CRLF")
        return opts


class StageConfig(Strict):
    """A stage entry of a pipeline; `type` picks the implementation, other keys are its options."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str = Field(..., description="stage kind (frame_info, detect, track, vlm ...)")
    name: str | None = Field(None, description="name of this stage's output in result records")


class PipelineConfig(Strict):
    description: str = ""
    stages: list[StageConfig] = Field(..., min_length=1)
    queue_size: int = Field(16, ge=1, le=10_000, description="bounded queue between two stages")


class FleetConfig(Strict):
    """Several daemons on one Redis (streamd/fleet.py): each stream runs on exactly one of them."""

    enabled: bool = Field(False, description="share the streams with the other daemons on this Redis (leases)")
    member_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$",
                                  description="this daemon's name in the fleet (default: <hostname>-<pid>)")
    max_streams: int | None = Field(None, ge=1, description="streams this daemon may own (its capacity; "
                                    "placement is weighted by it); null = no limit")
    lease_ttl_s: float = Field(10.0, ge=1, le=300, description="a stream whose owner stops renewing moves to "
                               "another daemon after this long")
    renew_s: float = Field(1.0, gt=0, le=60, description="how often leases are renewed and streams placed")
    settle_s: float = Field(10.0, ge=0, description="a new daemon gets streams handed over once it has been "
                            "alive this long")
    max_moves: int = Field(2, ge=0, le=1000, description="streams handed over per renew interval when rebalancing")
    max_busy: float = Field(0.9, gt=0, le=1, description="measured load limit: a daemon whose busiest stage works "
                            "more than this share of the time (smoothed over a few renew intervals) takes no new "
                            "stream, and the fleet counts no room on it; 1 = no limit")
    max_drop_fraction: float = Field(0.05, gt=0, le=1, description="measured load limit: a daemon whose live "
                                     "streams' queues drop more than this share of their sampled frames takes no "
                                     "new stream; 1 = no limit")

    @model_validator(mode="after")
    def _renew_within_ttl(self) -> "FleetConfig":
        if self.renew_s * 2 > self.lease_ttl_s:
            raise ValueError("renew_s must be at most half of lease_ttl_s")
        return self


class ShutdownConfig(Strict):
    grace_s: float = Field(10.0, ge=0, description="time to drain in-flight frames on SIGTERM/SIGINT")


class EventsConfig(Strict):
    drop_event_interval_s: float = Field(1.0, gt=0, description="drop events are aggregated over this interval")


class FramesConfig(Strict):
    """Recent frames kept per stream (streamd/frame_store.py): the API's snapshots, the web page."""

    per_stream: int = Field(2, ge=1, le=100, description="newest frames kept per stream (held decoded, JPEG-encoded "
                            "only when a snapshot asks for one)")
    max_age_s: float = Field(60.0, gt=0, le=86_400, description="a frame older than this is dropped")
    max_bytes_per_stream: int = Field(32 << 20, ge=1 << 20, description="memory one stream's frames may hold (the "
                                      "newest is kept whatever its size)")
    max_total_bytes: int = Field(512 << 20, ge=1 << 20, description="memory every stream's frames may hold")
    jpeg_quality: int = Field(80, ge=10, le=95, description="JPEG quality of snapshots")


class Config(Strict):
    redis: RedisConfig = Field(default_factory=RedisConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    egress: EgressConfig = Field(default_factory=EgressConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    frames: FramesConfig = Field(default_factory=FramesConfig, description="recent frames kept for snapshots")
    pipelines_dir: str | None = Field(None, description="folder of pipeline YAML files (default: ./pipelines)")
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict, description="pipelines defined inline")
    streams: list[StreamConfig] = Field(default_factory=list)
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="declared models, memory budgets "
                                 "per device, idle unload (streamd/models/)")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="one-shot jobs over recorded videos or stored "
                             "frames (streamd/jobs/)")

    @field_validator("streams")
    @classmethod
    def _unique_ids(cls, streams: list[StreamConfig]) -> list[StreamConfig]:
        seen: set[str] = set()
        for s in streams:
            if s.id in seen:
                raise ValueError(f"duplicate stream id {s.id!r}")
            seen.add(s.id)
        return streams

    @model_validator(mode="after")
    def _rtsp_transports(self) -> "Config":
        allowed = set(self.egress.rtsp_transports)
        for i, s in enumerate(self.streams):
            value = s.ffmpeg_options.get("rtsp_transport")
            if value is None:
                continue
            asked = {p.strip().lower() for p in value.split("+")}
            if not asked <= allowed:
                raise ValueError(f"streams[{i}] ({s.id}): ffmpeg_options.rtsp_transport {value!r} is not allowed: "
                                 f"only {', '.join(sorted(allowed))} (egress.rtsp_transports); udp, udp_multicast, "
                                 "http and https let the RTSP server send FFmpeg past the egress policy")
        return self


ENV_SECTIONS = ("redis", "log", "api", "shutdown", "events", "egress", "fleet", "jobs")


def _env_overrides(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    """STREAMD_<SECTION>_<KEY>=value sets section.key (value parsed as a YAML scalar), e.g. STREAMD_REDIS_URL."""
    for name, raw in environ.items():
        if not name.startswith("STREAMD_"):
            continue
        rest = name[len("STREAMD_") :].lower()
        section, _, key = rest.partition("_")
        if section not in ENV_SECTIONS or not key:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)):
            value = raw
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(section, "must be a mapping")
        data[section][key] = value
    return data


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def parse_config(data: dict[str, Any] | None, environ: dict[str, str] | None = None) -> Config:
    data = dict(data or {})
    data = _env_overrides(data, dict(os.environ if environ is None else environ))
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(_loc(err["loc"]), err["msg"]) from None
    if cfg.api.enabled and cfg.api.bind not in LOOPBACK and not cfg.api.tokens:
        raise ConfigError("api.tokens", f"the control API binds {cfg.api.bind} (beyond loopback): tokens are required")
    check_pipeline_models(cfg)  # a model a pipeline names is declared, an alias or a source
    return cfg


def check_tokens(cfg: Config, environ: dict[str, str]) -> list[str]:
    """Every API token has its value (else ConfigError naming `api.tokens.<i>.token_env`); returns the names of the
    tokens written in plain text in the config (`token:`), to warn about."""
    for i, t in enumerate(cfg.api.tokens):
        t.value(environ, f"api.tokens.{i}.token_env")
    return [t.name for t in cfg.api.tokens if t.token]


def load_config(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> Config:
    """Load and validate a config file once. Raises ConfigError naming the bad key."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError("<file>", f"cannot read {p}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError("<file>", f"invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("<root>", "the config must be a mapping")
        if "pipelines_dir" not in data and (p.parent / "pipelines").is_dir():
            data["pipelines_dir"] = str(p.parent / "pipelines")
    return parse_config(data, environ)

