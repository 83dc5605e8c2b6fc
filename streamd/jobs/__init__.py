"""Jobs: one-shot analyses of a recorded video (an HTTP(S) URL through the egress policy, or an uploaded file) or of
frames a stream already saw (re-scoring), through a configured pipeline, batched with the live streams' frames at a
lower priority. `options.py` the config and request models, `runner.py` one job, `manager.py` the queue and the
bounded number running, `store.py` the Redis keys (with a TTL), `summary.py` the summary document.

A job not ended is held under a lease (`streamd:{job:<id>}:lease`, `jobs.lease_ttl_s`) that its daemon renews; every
write of the job's document and records is fenced by it. When the daemon is gone (killed, cut off past the TTL),
any daemon taking jobs on the same Redis (another of the fleet, or the same one restarted) claims the job within a
third of the TTL after the lease expired and either runs it again from the start (`jobs.retries` times at most, a
URL source, or an uploaded file still on this host's `jobs.upload_dir`) or ends it `failed` with reason_code
`daemon_lost`. A retry empties the job's record stream first and every record carries its `attempt` (1, 2...): a
consumer reading the stream as it grows drops what it kept of an earlier attempt when it sees a later one; the
document's `attempt` and `lost` (each attempt lost: its daemon, progress) say what happened. A queued job that had
not started when its daemon was lost is run again without counting an attempt.

Nothing heavy is imported here: the config imports `streamd.jobs.options`.
"""
