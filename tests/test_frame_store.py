"""The frame store (streamd/frame_store.py): per-stream rings bounded by count, bytes and age, memory accounted,
JPEG encoded in its thread (lazily in the raw window, at once past it), and, in a real daemon, each published
frame told the entry id of its result record."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from streamd import keys
from streamd.frame_store import FrameLimits, FrameStore
from streamd.frames import Frame
from streamd.metrics import Metrics

from conftest import make_config, running, until


def frame(sid: str, seq: int, ts: float | None = None, h: int = 48, w: int = 64) -> Frame:
    img = np.full((h, w, 3), seq % 256, np.uint8)
    img[:, : w // 2, 0] = 255
    return Frame(sid, seq, seq * 0.5, time.time() if ts is None else ts, img)


async def test_count_limit_keeps_the_newest_and_latest_between_get() -> None:
    store = FrameStore(FrameLimits(max_frames=3, raw_frames=3))
    fs = [store.add(frame("a", i, ts=1000.0 + i)) for i in range(5)]
    assert [sf.seq for sf in store.frames("a")] == [2, 3, 4]
    assert store.latest("a") is fs[4]
    assert store.latest("a", written=True) is None  # no record written yet
    store.written(fs[3], "1-3")
    assert store.latest("a", written=True) is fs[3]
    assert store.get("a", "1-3") is fs[3] and store.get("a", "9-9") is None
    assert [sf.seq for sf in store.between("a", 1002.5, 1004.0)] == [3, 4]
    assert store.evicted == {"frames": 2}
    assert store.latest("b") is None and store.frames("b") == []


async def test_bytes_accounted_and_bounded_per_stream_and_in_total() -> None:
    one = 48 * 64 * 3
    m = Metrics()
    store = FrameStore(FrameLimits(max_frames=10, max_bytes=3 * one, raw_frames=10), max_total_bytes=5 * one,
                       metrics=m)
    for i in range(6):
        store.add(frame("a", i))
    assert len(store.frames("a")) == 3 and store.total_bytes == 3 * one
    for i in range(3):
        store.add(frame("b", i))
    # 6 frames' worth: over the total; the oldest frame of any stream goes first
    assert store.total_bytes <= 5 * one
    assert [sf.seq for sf in store.frames("a")] == [4, 5]
    assert store.stats()["streams"]["a"] == {"frames": 2, "bytes": 2 * one, "raw": 2}
    assert m.registry.get_sample_value("streamd_frame_store_bytes") == store.total_bytes
    assert m.registry.get_sample_value("streamd_frame_store_frames") == 5
    assert m.registry.get_sample_value("streamd_frame_store_evicted_total", {"reason": "total_bytes"}) == 1
    store.drop("a")
    assert store.total_bytes == 3 * one and store.frames("a") == []


async def test_the_newest_frame_is_kept_whatever_its_size() -> None:
    store = FrameStore(FrameLimits(max_frames=4, max_bytes=100, raw_frames=4))
    store.add(frame("a", 0))
    store.add(frame("a", 1))
    assert [sf.seq for sf in store.frames("a")] == [1]


async def test_age_limit() -> None:
    store = FrameStore(FrameLimits(max_frames=10, max_age_s=0.2, raw_frames=10))
    store.add(frame("a", 0))
    await asyncio.sleep(0.3)
    store.add(frame("a", 1))
    assert [sf.seq for sf in store.frames("a")] == [1]
    await asyncio.sleep(0.3)
    assert store.frames("a") == [] and store.total_bytes == 0 and store.evicted["age"] == 2


async def test_raw_window_encodes_only_when_asked_and_off_the_loop() -> None:
    store = FrameStore(FrameLimits(max_frames=2, raw_frames=2))
    for i in range(5):
        store.add(frame("a", i))
    await asyncio.sleep(0.1)
    assert store.encoded == 0  # nobody asked: nothing encoded
    sf = store.latest("a")
    raw = sf.nbytes
    seen: list[str] = []
    import streamd.frame_store as fsmod

    orig = fsmod.encode_jpeg

    def spy(image: np.ndarray, quality: int) -> bytes:
        seen.append(threading.current_thread().name)
        return orig(image, quality)

    fsmod.encode_jpeg = spy
    try:
        a, b = await asyncio.gather(store.jpeg(sf), store.jpeg(sf))  # two viewers, one encode
    finally:
        fsmod.encode_jpeg = orig
    assert a == b and a[:2] == b"\xff\xd8" and store.encoded == 1
    assert seen == [seen[0]] and seen[0].startswith("frame-jpeg")  # in the encoder thread, not on the loop
    assert Image.open(io.BytesIO(a)).size == (64, 48)
    assert sf.image is None and sf.nbytes == len(a) < raw
    assert store.total_bytes == sf.nbytes + store.frames("a")[0].nbytes
    store.close()


async def test_retention_past_the_raw_window_is_kept_as_jpeg() -> None:
    store = FrameStore(FrameLimits(max_frames=50, raw_frames=1, max_bytes=1 << 30))
    for i in range(20):
        store.add(frame("a", i, h=120, w=160))
    await until(lambda: store.encoded == 19, what="the older frames encoded")
    kept = store.frames("a")
    assert len(kept) == 20
    assert [sf.image is None for sf in kept] == [True] * 19 + [False]
    assert store.total_bytes == sum(sf.nbytes for sf in kept) < 20 * 120 * 160 * 3 // 4
    jpegs = [await store.jpeg(sf) for sf in store.between("a", 0, time.time())]
    assert len(jpegs) == 20 and store.encoded == 20
    store.close()


async def test_encoder_behind_drops_instead_of_queueing() -> None:
    store = FrameStore(FrameLimits(max_frames=100, raw_frames=1), max_pending_encodes=2)
    for i in range(10):
        store.add(frame("a", i, h=480, w=640))
    assert store.evicted.get("encoder_busy", 0) >= 1
    await until(lambda: store.stats()["pending_encodes"] == 0, what="encodes done")
    assert len(store.frames("a")) == 10 - store.evicted["encoder_busy"]
    store.close()


async def test_set_limits_per_stream() -> None:
    store = FrameStore(FrameLimits(max_frames=2, raw_frames=2))
    store.set_limits("keep", FrameLimits(max_frames=30, raw_frames=1, max_age_s=600))
    for i in range(10):
        store.add(frame("keep", i))
        store.add(frame("other", i))
    assert len(store.frames("keep")) == 10 and len(store.frames("other")) == 2
    store.set_limits("keep", None)
    assert len(store.frames("keep")) == 2
    with pytest.raises(ValueError):
        FrameLimits(max_frames=0)
    store.close()


async def test_daemon_keeps_frames_with_their_result_entry_ids(redis_server, r, clip) -> None:
    cfg = make_config(redis_server.url, [{"id": "cam", "url": str(clip), "fps": 5}],
                      frames={"per_stream": 3})
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["cam"].state == "stopped", 60, what="the clip played")
        await until(lambda: d.sink.flushed(1), what="published")
        kept = d.frames.frames("cam")
        assert len(kept) == 3 and all(sf.entry_id for sf in kept)
        entries = await r.xrange(keys.results_key("cam"))
        by_id = {e.decode(): int(f[b"seq"]) for e, f in entries}
        assert [by_id[sf.entry_id] for sf in kept] == [sf.seq for sf in kept]
        assert kept[-1].seq == max(by_id.values())
        jpg = await d.frames.jpeg(kept[-1])
        assert Image.open(io.BytesIO(jpg)).size == (640, 360)


async def test_an_evicted_frame_holds_no_bytes_even_when_a_queued_job_still_lists_it() -> None:
    """A re-score job chooses its frames when accepted and reads them when it runs: an evicted frame is skipped
    then (LookupError), and its JPEG is not kept alive outside the store's accounting meanwhile."""
    store = FrameStore(FrameLimits(max_frames=2, raw_frames=1))
    fs = [store.add(frame("a", i, ts=1000.0 + i)) for i in range(2)]
    listed = list(store.between("a", 999.0, 1002.0))  # what a queued job holds
    assert [await store.jpeg(sf) for sf in listed]  # encoded
    for i in range(2, 4):
        store.add(frame("a", i, ts=1000.0 + i))
    assert fs[0].jpeg is None and fs[0].image is None and fs[1].jpeg is None
    with pytest.raises(LookupError):
        await store.jpeg(listed[0])
