"""Redis key formats and record constants: the Redis contract lives here and nowhere else.

Redis Cluster: a command or script that touches several keys must find them all in one hash slot. Keys that go
together share a hash tag (the part in braces, the only part Redis hashes):
- a stream's results, events, VLM answers and lease: `{<stream_id>}` (the fenced result write is one Lua call
  over the lease and the results stream);
- the fleet's member records and their index: `{fleet}` (one MGET reads every member);
- a prompt's version counter, versions and current pointer: `{<kind>|<scope>}` (one Lua write);
- a pipeline's version counter, versions and current pointer: `{<pipeline>}` (one Lua write).
A Redis frame input is a key the user names: its dead-letter stream `<key>:dead` and its acknowledgement share its
slot only when that key carries a hash tag, and the result stream only when that tag is the stream id
(`frames:{<stream_id>}`); otherwise the writes that go together in one MULTI/EXEC on a single Redis are made one
after the other on a cluster (at least once: see streamd.sinks.redis and streamd.sources.redis).
"""

from redis.crc import key_slot

SCHEMA_VERSION = 1  # of the records; key formats are versioned by the README's Redis contract section
RESULTS_KEY = "streamd:{{{stream}}}:results"
EVENTS_KEY = "streamd:{{{stream}}}:events"
# a Redis input on another server: its entries whose results are written and that are not acknowledged there yet
# (hash: acking_field -> "1"; set in the MULTI/EXEC of the result, deleted once acknowledged; streamd.sinks.redis)
ACKING_KEY = "streamd:{{{stream}}}:acking"
ACKING_TTL_MS = 7 * 86_400_000  # the hash expires a week after its last mark (refreshed with each; deleted with
# its stream): a mark left behind (its removal failed) cannot stay for good
VLM_KEY = "streamd:{{{stream}}}:vlm"  # answers of the VLM stage (they arrive later than the frame's result)
DEAD_LETTER_KEY = "{key}:dead"  # beside the user's input stream
API_STREAMS_KEY = "streamd:api:streams"  # hash: stream id -> stream config (JSON) of streams added through the API

# fleet (streamd.fleet): a stream's lease `<member>|<token>` and its last owner's id, beside its results
LEASE_KEY = "streamd:{{{stream}}}:lease"
LEASE_LAST_KEY = "streamd:{{{stream}}}:lease:last"
STREAM_ENDED_KEY = "streamd:{{{stream}}}:ended"  # fleet: how a stream ended for good (JSON), so no new owner plays it
# a member's record (JSON, with a TTL) and the set of member ids: one slot, so one MGET reads them all
FLEET_MEMBER_KEY = "streamd:{{fleet}}:member:{member}"
FLEET_MEMBERS_KEY = "streamd:{fleet}:members"

# prompts (streamd.prompts): the index of prompt ids, the change channel, a prompt's keys (one slot per prompt)
PROMPTS_INDEX_KEY = "streamd:prompts:index"
PROMPTS_CHANNEL = "streamd:prompts:changed"
PROMPT_KEY = "streamd:prompt:{{{pid}}}:{part}"  # part: seq, versions, current

# pipeline versions (streamd.pipeline_versions): live changes of a pipeline's stages (a switched model), versioned
PIPELINES_INDEX_KEY = "streamd:pipelines:index"
PIPELINES_CHANNEL = "streamd:pipelines:changed"
PIPELINE_KEY = "streamd:pipeline:{{{name}}}:{part}"  # part: seq, versions, current (one slot per pipeline)

# jobs (streamd.jobs): a job's document (JSON) and its records (a stream), one slot per job, both with a TTL; the
# index of job ids by creation time (a sorted set, pruned of expired jobs as it is listed)
JOB_KEY = "streamd:{{job:{job}}}:job"
JOB_RECORDS_KEY = "streamd:{{job:{job}}}:records"
JOB_CANCEL_KEY = "streamd:{{job:{job}}}:cancel"  # set by a daemon asked to cancel a job another daemon runs
JOB_LEASE_KEY = "streamd:{{job:{job}}}:lease"  # `<member>|<token>` of the daemon that runs (or queues) the job
JOB_SPEC_KEY = "streamd:{{job:{job}}}:spec"  # what a daemon needs to run the job again (its owner lost)
JOBS_INDEX_KEY = "streamd:jobs:index"
JOBS_ACTIVE_KEY = "streamd:jobs:active"  # ids of jobs not ended (queued, running): watched for a lost owner


def results_key(stream_id: str) -> str:
    return RESULTS_KEY.format(stream=stream_id)


def acking_key(stream_id: str) -> str:
    return ACKING_KEY.format(stream=stream_id)


def acking_field(key: str, group: str, entry_id: str) -> str:
    """An input entry's field in ACKING_KEY: its key, group and id, one a line."""
    return f"{key}\n{group}\n{entry_id}"


def events_key(stream_id: str) -> str:
    return EVENTS_KEY.format(stream=stream_id)


def vlm_key(stream_id: str) -> str:
    return VLM_KEY.format(stream=stream_id)


def dead_letter_key(input_key: str) -> str:
    return DEAD_LETTER_KEY.format(key=input_key)


def lease_key(stream_id: str) -> str:
    return LEASE_KEY.format(stream=stream_id)


def lease_last_key(stream_id: str) -> str:
    return LEASE_LAST_KEY.format(stream=stream_id)


def stream_ended_key(stream_id: str) -> str:
    return STREAM_ENDED_KEY.format(stream=stream_id)


def fleet_member_key(member_id: str) -> str:
    return FLEET_MEMBER_KEY.format(member=member_id)


def prompt_keys(pid: str) -> tuple[str, str, str]:
    """A prompt's (seq, versions, current) keys."""
    return PROMPT_KEY.format(pid=pid, part="seq"), PROMPT_KEY.format(pid=pid, part="versions"), \
        PROMPT_KEY.format(pid=pid, part="current")


def pipeline_keys(name: str) -> tuple[str, str, str]:
    """A pipeline's (seq, versions, current) keys."""
    seq, versions, current = (PIPELINE_KEY.format(name=name, part=p) for p in ("seq", "versions", "current"))
    return seq, versions, current


def job_key(job_id: str) -> str:
    return JOB_KEY.format(job=job_id)


def job_records_key(job_id: str) -> str:
    return JOB_RECORDS_KEY.format(job=job_id)


def job_cancel_key(job_id: str) -> str:
    return JOB_CANCEL_KEY.format(job=job_id)


def job_lease_key(job_id: str) -> str:
    return JOB_LEASE_KEY.format(job=job_id)


def job_spec_key(job_id: str) -> str:
    return JOB_SPEC_KEY.format(job=job_id)


def slot(key: str | bytes) -> int:
    """The Redis Cluster hash slot of a key (its hash tag's, when it has one)."""
    return key_slot(key.encode() if isinstance(key, str) else key)


def same_slot(*keys: str | bytes) -> bool:
    return len({slot(k) for k in keys}) <= 1
