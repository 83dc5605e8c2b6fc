"""Redis key formats and record constants: the Redis contract lives here and nowhere else.

Hash-tag braces keep every key of one stream in the same Redis Cluster slot.
"""

SCHEMA_VERSION = 1
RESULTS_KEY = "streamd:{{{stream}}}:results"
EVENTS_KEY = "streamd:{{{stream}}}:events"
DEAD_LETTER_KEY = "{key}:dead"  # beside the user's input stream


def results_key(stream_id: str) -> str:
    return RESULTS_KEY.format(stream=stream_id)


def events_key(stream_id: str) -> str:
    return EVENTS_KEY.format(stream=stream_id)


def dead_letter_key(input_key: str) -> str:
    return DEAD_LETTER_KEY.format(key=input_key)

API_STREAMS_KEY = "streamd:api:streams"  # hash: stream id -> stream config (JSON) of streams added through the API
VLM_KEY = "streamd:{{{stream}}}:vlm"  # answers of the VLM stage (they arrive later than the frame's result)


def vlm_key(stream_id: str) -> str:
    return VLM_KEY.format(stream=stream_id)
