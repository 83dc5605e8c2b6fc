from streamd.sampling import FpsSampler


def kept(sampler: FpsSampler, pts: list[float]) -> list[float]:
    return [p for p in pts if sampler.offer(p).keep]


def test_fps_by_timestamp_not_frame_count():
    pts = [i / 30 for i in range(300)]  # 10 s at 30 fps
    out = kept(FpsSampler(2.0), pts)
    assert len(out) == 20
    gaps = [b - a for a, b in zip(out, out[1:])]
    assert all(abs(g - 0.5) < 1 / 30 + 1e-9 for g in gaps)


def test_variable_frame_rate_keeps_the_rate():
    pts, t = [], 0.0
    for i in range(600):  # alternating 10 ms and 60 ms gaps
        t += 0.01 if i % 2 else 0.06
        pts.append(t)
    out = kept(FpsSampler(4.0), pts)
    duration = pts[-1] - pts[0]
    assert abs(len(out) - duration * 4) <= 2


def test_every_frame_when_fps_is_none():
    assert len(kept(FpsSampler(None), [i * 0.1 for i in range(50)])) == 50


def test_jump_backwards_is_a_discontinuity():
    s = FpsSampler(2.0)
    flags = [(p, s.offer(p)) for p in [0, 0.5, 1.0, 1.5, 0.2, 0.7]]
    keeps = [(p, d.discontinuity) for p, d in flags if d.keep]
    assert keeps[:4] == [(0, False), (0.5, False), (1.0, False), (1.5, False)]
    assert keeps[4] == (0.2, True)  # restarts the grid at the new timestamp
    assert keeps[5] == (0.7, False)


def test_forward_jump_and_reconnect_are_flagged():
    s = FpsSampler(1.0, jump_s=5)
    assert not s.offer(0).discontinuity
    assert s.offer(100).discontinuity
    s.mark_discontinuity()
    d = s.offer(3)
    assert d.keep and d.discontinuity
