"""`streamd bench` at a tiny scale: a real daemon per step, an embedded redis-server, a small file replicated."""

import json

import pytest

from streamd.cli import main
from streamd.log import setup_logging
from streamd.samples import make_pan_clip


@pytest.fixture(autouse=True)
def _logging_as_found():
    """`streamd bench` in process sets the log level to warning for the process: the later tests (which read info
    lines) get the suite's logging back."""
    yield
    setup_logging("info", "console")


def test_bench_reports_the_largest_number_of_copies_that_keeps_up(tmp_path, capsys):
    clip = make_pan_clip(tmp_path / "cam.mp4", seconds=3, fps=15, size=(160, 96), gop=15)
    rc = main(["bench", "--url", str(clip), "--pipeline", "frame_info", "--fps", "2", "--decode", "keyframes",
               "--steps", "1,2", "--seconds", "3", "--warmup", "1", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decode"] == "keyframes" and report["fps"] == 2.0 and report["replicated"] == "source"
    assert [s["streams"] for s in report["steps"]] == [1, 2]
    assert report["max_streams"] == 2  # two tiny streams at 2 fps keep up on any machine
    for s in report["steps"]:
        assert s["keeps_up"] and s["why"] == "" and s["dropped"] == 0
        # keyframes every second at 2 fps: one record a second per copy (the keyframe rate)
        assert s["streams"] * 2 <= s["records"] <= s["streams"] * 5
        assert 0 <= s["p50_ms"] <= s["p99_ms"] < 1000
        assert s["cpu_cores"] > 0 and s["cpu_per_stream"] == pytest.approx(s["cpu_cores"] / s["streams"], abs=1e-3)
        assert s["cpu_ms_per_frame"] > 0 and s["gpu_util_pct"] is None  # no GPU here


def test_bench_table_and_bad_usage(tmp_path, capsys):
    clip = make_pan_clip(tmp_path / "cam.mp4", seconds=2, fps=10, size=(160, 96), gop=10)
    assert main(["bench", "--url", str(clip), "--pipeline", "frame_info", "--steps", "1", "--seconds", "2",
                 "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "largest number of copies that keeps up: 1" in out and out.splitlines()[0].split()[:2] == ["streams",
                                                                                                    "keeps"]
    assert main(["bench", "--url", str(clip), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["bench"]) == 2  # neither a config nor a URL


def test_bench_records_a_live_source_and_replays_the_recording(tmp_path, capsys):
    """A live RTSP camera stand-in: a short recording is made (packets copied) and its copies play in real time."""
    from streamd.testing.servers import RtspServer

    if not RtspServer.available():
        pytest.skip("Debian's GStreamer RTSP server (python3-gi) is not installed on this machine")
    cfg = tmp_path / "cams.yaml"
    srv = RtspServer(size=(320, 180)).start()
    try:
        cfg.write_text(f"streams:\n  - id: door\n    url: {srv.url}\n    pipeline: frame_info\n    fps: 1\n")
        rc = main(["bench", "-c", str(cfg), "--stream", "door", "--steps", "2", "--seconds", "3", "--warmup", "1",
                   "--record-s", "3", "--json"])
    finally:
        srv.stop()
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stream"] == "door" and report["url_kind"] == "rtsp" and report["replicated"] == "recording"
    (step,) = report["steps"]
    assert step["streams"] == 2 and step["keeps_up"] and step["records"] >= 2 * 2  # ~1 record/s per copy
    assert report["max_streams"] == 2
