"""The command line as a user runs it: real processes, real signals."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamd.config import load_config
from streamd.errors import ConfigError

STREAMD = [sys.executable, "-m", "streamd"]


def run(args, **kw):
    return subprocess.run(STREAMD + args, capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("body,key", [
    ("streams:\n  - id: a\n    url: x.mp4\n    fsp: 2\n", "streams.0.fsp"),
    ("streams:\n  - id: a\n    url: x.mp4\n    fps: -1\n", "streams.0.fps"),
    ("redis:\n  urll: redis://x\n", "redis.urll"),
    ("streams:\n  - id: a\n    url: x.mp4\n    pipeline: nope\n", "streams.0.pipeline"),
    ("streams:\n  - id: 'bad id'\n    url: x.mp4\n", "streams.0.id"),
    ("pipelines:\n  p:\n    stages:\n      - type: frame_info\n        strid: 2\n", "pipelines.p.stages.0.strid"),
    ("pipelines:\n  p:\n    stages:\n      - type: warp_drive\n", "pipelines.p.stages.0.type"),
    ('streams:\n  - id: a\n    url: x.mp4\n    ffmpeg_options:\n      user_agent: "a\\r\\nX-Injected: 1"\n',
     "streams.0.ffmpeg_options"),
])
def test_validate_names_the_bad_key(tmp_path, body, key):
    f = tmp_path / "c.yaml"
    f.write_text(body)
    p = run(["validate", str(f)])
    assert p.returncode == 2, p.stderr
    assert key in p.stderr, p.stderr


def test_validate_accepts_the_shipped_configs():
    root = os.path.dirname(os.path.dirname(__file__))
    for name in ("config/streamd.yaml", "config/examples/cameras.yaml"):
        p = run(["validate", os.path.join(root, name)])
        assert p.returncode == 0, p.stderr


def test_env_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("redis:\n  url: redis://a:1/0\n")
    cfg = load_config(f, environ={"STREAMD_REDIS_URL": "redis://b:2/0", "STREAMD_LOG_FORMAT": "json",
                                  "STREAMD_API_PORT": "9999"})
    assert cfg.redis.url == "redis://b:2/0" and cfg.log.format == "json" and cfg.api.port == 9999
    with pytest.raises(ConfigError) as e:
        load_config(f, environ={"STREAMD_LOG_LEVEL": "loud"})
    assert e.value.key == "log.level"


def test_run_and_sigterm_exit_cleanly(tmp_path, clip, redis_server):
    f = tmp_path / "c.yaml"
    f.write_text(f"redis:\n  url: {redis_server.url}\nstreams:\n  - id: sig\n    url: {clip}\n"
                 "    playback: realtime\n    loop: true\n")
    proc = subprocess.Popen(STREAMD + ["run", "-c", str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        tail = subprocess.run(STREAMD + ["tail", "sig", "--redis", redis_server.url, "--json", "-n", "2"],
                              capture_output=True, text=True, timeout=60)
        lines = [json.loads(x) for x in tail.stdout.splitlines()]
        assert len(lines) == 2 and lines[0]["stream_id"] == "sig" and lines[0]["kind"] == "results"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == 0, err
    assert "draining" in err


def test_demo_runs_offline_with_embedded_redis(tmp_path):
    env = {**os.environ, "STREAMD_HOME": str(tmp_path / "home"), "STREAMD_REDIS_URL": ""}
    env.pop("STREAMD_REDIS_URL")
    t0 = time.monotonic()
    try:
        # --duration counts from the first result: the model's set-up (several seconds on a busy CPU) is not counted
        p = subprocess.run(STREAMD + ["demo", "--duration", "4", "--json", "--port", "0"], capture_output=True,
                           text=True,
                           timeout=200, env=env)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr
        raise AssertionError(f"the demo did not stop after --duration; stderr: {(err or '')[-3000:]}") from None
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    results = [x for x in recs if x["kind"] == "results"]
    assert len(results) >= 5, p.stdout[-2000:]
    assert results[0]["stream_id"] == "demo"
    # the default pipeline detects and tracks the people in the sample clip with a real model, offline
    people = [d for x in results for d in x["outputs"]["detect"]["detections"] if d["label"] == "person"]
    assert len(people) >= len(results), "about two people per frame"
    assert all("track_id" in t for x in results for t in x["outputs"]["track"]["tracks"])
    assert any(x["kind"] == "events" and x["type"] == "track_started" for x in recs)
    assert time.monotonic() - t0 < 280
    assert "embedded redis-server" in p.stderr
    assert re.search(r"the page: http://127\.0\.0\.1:\d+/", p.stderr), p.stderr[-2000:]  # the page is served
    assert (tmp_path / "home" / "samples").is_dir()


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parent.parent / "pipelines").glob("*.yaml")))
def test_every_shipped_pipeline_validates(name):
    from streamd.config import parse_config
    from streamd.streams.pipelines import check_config

    check_config(parse_config({"streams": [{"id": "a", "url": "redis:frames:a", "pipeline": name}]}, environ={}))
