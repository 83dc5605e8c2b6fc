"""Time-based logic driven by its own clock, without waiting: VLM tag ranges and triggers run on stream time (the
frames' pts), so a test sets the clock by the pts it hands over. (Stall detection's clock is FFmpeg's reads: it is
tested against real servers in tests/test_source_trust.py.)"""

import numpy as np

from streamd.frames import Frame, Work
from streamd.stages.vlm.modes import TagTimeline
from streamd.stages.vlm.options import VlmOptions
from streamd.stages.vlm.triggers import StreamTriggers


def test_a_tag_ends_only_after_it_has_been_absent_for_end_after_s_of_stream_time():
    tl = TagTimeline({"smoke": 0.8}, default=0.5, end_after_s=3.0)
    assert [e for e, _ in tl.apply(0, 10.0, 1000.0, {"fire": 0.6, "smoke": 0.7})] == ["tag_started"]  # smoke < 0.8
    assert tl.apply(1, 11.0, 1001.0, {"fire": 0.9}) == []
    assert tl.apply(2, 13.9, 1003.9, {}) == []  # absent 2.9 s of stream time: still on
    (kind, ended), = tl.apply(3, 14.0, 1004.0, {})  # absent 3.0 s: ends, the range is first .. last seen
    assert kind == "tag_ended"
    assert (ended["tag"], ended["start_pts_s"], ended["end_pts_s"], ended["duration_s"]) == ("fire", 10.0, 11.0, 1.0)
    assert (ended["start_seq"], ended["end_seq"], ended["absent_seq"], ended["max_confidence"]) == (0, 1, 3, 0.9)
    assert tl.apply(2, 20.0, 1010.0, {"fire": 1.0}) == []  # an answer older than one applied moves nothing
    events = tl.apply(4, 15.0, 1005.0, {"fire": 0.6}) + tl.close("shutdown")
    assert [(k, e.get("reason")) for k, e in events] == [("tag_started", None), ("tag_ended", "shutdown")]


def _work(seq, pts):
    return Work(Frame(stream_id="s", seq=seq, pts_s=pts, capture_ts=pts, image=np.zeros((4, 4, 3), np.uint8)))


def test_interval_trigger_follows_stream_time_and_restarts_when_time_goes_back():
    tr = StreamTriggers(VlmOptions(model="m", every_s=1.0, on_prompt_change=False))
    why = []
    for seq, pts in enumerate([0.0, 0.5, 0.99, 1.0, 1.5, 2.2, 0.1, 0.6]):  # a looping file restarts at 0.1
        w = tr.frame_trigger(_work(seq, pts), None)
        if w:
            tr.asked()
        why.append(w)
    assert why == ["start", None, None, "interval", None, "interval", "interval", None]
