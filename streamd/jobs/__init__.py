"""Jobs: one-shot analyses of a recorded video (an HTTP(S) URL through the egress policy, or an uploaded file) or of
frames a stream already saw (re-scoring), through a configured pipeline, batched with the live streams' frames at a
lower priority. `options.py` the config and request models, `runner.py` one job, `manager.py` the queue and the
bounded number running, `store.py` the Redis keys (with a TTL), `summary.py` the summary document.

Nothing heavy is imported here: the config imports `streamd.jobs.options`.
"""
