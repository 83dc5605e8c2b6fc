"""Every Prometheus metric, defined once. One registry per daemon (no process-global state), labels
`stream` / `stage`. Stream labels are stream ids, never URLs, so no credential can reach a metric."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True, slots=True)
class StreamMetrics:
    """One stream's per-frame metric children, looked up once (`labels()` locks and hashes on every call)."""

    sampled: Counter
    dropped: Counter
    processed: Counter
    e2e_latency: Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.frames_in = Counter("streamd_frames_decoded", "frames decoded from the source", ["stream"], registry=r)
        self.frames_sampled = Counter("streamd_frames_sampled", "frames kept by the sampler", ["stream"], registry=r)
        self.frames_dropped = Counter("streamd_frames_dropped", "frames dropped by a full queue", ["stream"], registry=r)
        self.frames_processed = Counter("streamd_frames_processed", "result records produced", ["stream"], registry=r)
        self.frames_failed = Counter("streamd_frames_failed", "frames a stage failed on", ["stream"], registry=r)
        self.dead_letters = Counter("streamd_dead_letters", "Redis input entries dead-lettered", ["stream"], registry=r)
        self.stage_latency = Histogram("streamd_stage_latency_seconds", "stage time per batch", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("streamd_batch_size", "frames per stage batch", ["stage"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("streamd_queue_depth", "frames waiting in a stream's queue", ["stream"], registry=r)
        self.publish_errors = Counter("streamd_redis_publish_errors", "failed Redis publish attempts", registry=r)
        self.buffer_overflow = Counter("streamd_redis_buffer_overflow", "records lost to a full outage buffer",
                                       registry=r)
        self.buffered = Gauge("streamd_redis_buffered_records", "records waiting to be published", registry=r)
        self.e2e_latency = Histogram("streamd_capture_to_publish_seconds", "capture to publish latency",
                                     ["stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.stream_state = Gauge("streamd_stream_state", "1 for the stream's current state", ["stream", "state"],
                                  registry=r)
        self.loop_lag = Histogram("streamd_event_loop_lag_seconds", "event loop scheduling lag",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.vlm_questions = Counter("streamd_vlm_questions", "VLM questions by outcome: answered, failed, "
                                     "skipped (too many in flight, stale)", ["stream", "stage", "outcome"], registry=r)
        self.vlm_latency = Histogram("streamd_vlm_latency_seconds", "VLM request latency (answered)", ["stage"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.vlm_tokens = Counter("streamd_vlm_tokens", "VLM tokens", ["stage", "kind"], registry=r)
        from streamd.sources.base import Abandoned

        self.abandoned_threads = Gauge("streamd_source_threads_abandoned", "decoder threads given up on while stuck "
                                       "in FFmpeg that have not returned yet (each returns within its timeout)",
                                       registry=r)
        self.abandoned_threads.set_function(Abandoned.alive)
        self.results_fenced = Counter("streamd_results_fenced", "results (and events, end records) not written "
                                      "because their stream's lease had moved on (fleet)", ["stream"], registry=r)
        self.ownership_changes = Counter("streamd_fleet_ownership_changes", "streams this daemon took over from "
                                         "another or lost to another", ["direction"], registry=r)
        self.lease_renew_failures = Counter("streamd_fleet_lease_renew_failures", "lease renewals that failed "
                                            "(Redis errors, or the lease was gone)", registry=r)
        # models (streamd/models/): labelled by catalog name
        self.model_memory = Gauge("streamd_model_memory_bytes", "memory a loaded model holds (CUDA allocator bytes "
                                  "on a GPU, parameter and buffer bytes on the CPU; 0 once unloaded)",
                                  ["model", "device"], registry=r)
        self.model_loads = Counter("streamd_model_loads", "model loads by outcome: ok, model_load_failed, "
                                   "insufficient_memory", ["model", "outcome"], registry=r)
        self.model_unloads = Counter("streamd_model_unloads", "model unloads by reason: idle (keep_alive_s), "
                                     "evicted (to fit another in the budget), manual, forced, shutdown",
                                     ["model", "reason"], registry=r)
        self.model_evictions = Counter("streamd_model_evictions", "idle models unloaded to fit another model in "
                                       "their device's budget", ["model"], registry=r)
        self.model_load_seconds = Histogram("streamd_model_load_seconds", "time to load a model (on its device's "
                                            "executor), measured to ready", ["model"],
                                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                            registry=r)
        # single-image predict requests (streamd/streams/predict.py): labelled by pipeline
        self.predict_requests = Counter("streamd_predict_requests", "predict requests by outcome: ok, overloaded, "
                                        "invalid_image, failed (a stage or the pipeline), timeout, unavailable",
                                        ["pipeline", "outcome"], registry=r)
        self.predict_latency = Histogram("streamd_predict_latency_seconds", "a predict image from accepted to "
                                         "answered (its queue and stages; decoding not included)", ["pipeline"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.predict_queue_depth = Gauge("streamd_predict_queue_depth", "predict images a pipeline holds now "
                                         "(queued or in its stages)", ["pipeline"], registry=r)
        self.predict_rejections = Counter("streamd_predict_rejections", "predict requests refused with 503 "
                                          "overloaded: the pipeline's predict queue was full", ["pipeline"],
                                          registry=r)
        # recent frames kept for snapshots and re-scoring (streamd/frame_store.py)
        self.frame_store_bytes = Gauge("streamd_frame_store_bytes", "memory the frame store holds (JPEG bytes, and "
                                       "the pixels of frames not encoded yet)", registry=r)
        self.frame_store_frames = Gauge("streamd_frame_store_frames", "frames the frame store holds", registry=r)
        self.frame_store_encoded = Counter("streamd_frame_store_encoded", "frames JPEG-encoded by the frame store "
                                           "(in its encoder thread)", registry=r)
        self.frame_store_evicted = Counter("streamd_frame_store_evicted", "frames the frame store dropped, by "
                                           "reason: frames, bytes, age (a stream's limits), total_bytes, "
                                           "encoder_busy", ["reason"], registry=r)
        self._streams: dict[str, StreamMetrics] = {}

    def forget_stream(self, stream_id: str) -> int:
        """Remove every series labelled with a removed stream's id; returns how many went."""
        self._streams.pop(stream_id, None)
        gone = 0
        for metric in (self.frames_in, self.frames_sampled, self.frames_dropped, self.frames_processed,
                       self.frames_failed, self.dead_letters, self.queue_depth, self.e2e_latency, self.stream_state,
                       self.vlm_questions, self.results_fenced):
            i = metric._labelnames.index("stream")  # prometheus_client has no public way to list children
            for values in [v for v in list(metric._metrics) if v[i] == stream_id]:
                metric.remove(*values)
                gone += 1
        return gone

    def stream(self, stream_id: str) -> StreamMetrics:
        m = self._streams.get(stream_id)
        if m is None:
            m = self._streams[stream_id] = StreamMetrics(
                self.frames_sampled.labels(stream_id), self.frames_dropped.labels(stream_id),
                self.frames_processed.labels(stream_id), self.e2e_latency.labels(stream_id))
        return m
