"""Frames pushed into a Redis stream: one result per entry, every entry acknowledged, poison to dead letters."""

import numpy as np
import pytest

from streamd import keys
from streamd.testing import encode_jpeg, push_frames
from conftest import events, make_config, results, running, until


def images(n, h=48, w=64):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


async def pending(r, key, group="streamd"):
    info = await r.xpending(key, group)
    return info["pending"]


async def test_redis_frames_one_result_per_entry_all_acked(r, redis_server):
    imgs = images(10)
    ids = await push_frames(r, "frames:cam", imgs[:4], "jpeg")
    ids += await push_frames(r, "frames:cam", imgs[4:7], "png")
    ids += await push_frames(r, "frames:cam", imgs[7:], "raw", extra={"site": "north"})
    cfg = make_config(redis_server.url, [{"id": "rf", "url": f"{redis_server.url}#frames:cam"}])
    async with running(cfg):
        recs = await until(lambda: _n(r, "rf", 10), 20, what="10 results")
        await until(lambda: _zero(r, "frames:cam"), 10, what="all acknowledged")
        more = await push_frames(r, "frames:cam", images(2), "jpeg")  # entries added while running
        recs = await until(lambda: _n(r, "rf", 12), 20, what="12 results")
        await until(lambda: _zero(r, "frames:cam"), 10, what="all acknowledged")
    assert [x["input"]["entry_id"] for x in recs] == ids + more
    assert len({x["seq"] for x in recs}) == 12
    raw = recs[9]
    assert raw["meta"] == {"site": "north"} and raw["width"] == 64
    # the raw frame decoded to the exact pixels: mean matches
    assert abs(raw["outputs"]["frame_info"]["mean_brightness"] - float(np.mean(imgs[9][::32, ::32]))) < 0.01


async def _n(r, sid, n):
    recs = await results(r, sid)
    return recs if len(recs) >= n else None


async def _zero(r, key):
    return await pending(r, key) == 0


POISON = {  # an entry streamd cannot use: (fields, what the dead letter's reason says)
    "image": ({"image": b"not an image at all", "ts": "1"}, b"cannot decode image"),
    "ts-nan": ({"ts": "nan"}, b"ts is not a finite number"),  # NaN would reach every JSON consumer
    "ts-inf": ({"ts": "1e999"}, b"ts is not a finite number"),
    "pts-inf": ({"pts": "-Infinity"}, b"pts is not a finite number"),
    "ts-text": ({"ts": "soon"}, b"ts is not a number"),
}


@pytest.mark.parametrize("case", list(POISON))
async def test_poison_entry_goes_to_dead_letters_after_max_deliveries(r, redis_server, case):
    fields, reason = POISON[case]
    if "image" not in fields:
        fields = {"image": encode_jpeg(images(1)[0]), **fields}
    good = await push_frames(r, "frames:p", images(2), "jpeg")
    bad = (await r.xadd("frames:p", fields)).decode()
    good += await push_frames(r, "frames:p", images(1), "jpeg")
    cfg = make_config(redis_server.url, [{"id": "p", "url": "redis:frames:p",
                                         "redis_input": {"max_deliveries": 3, "claim_idle_ms": 200}}])
    async with running(cfg):
        dead = await until(lambda: r.xrange(keys.dead_letter_key("frames:p")), 20, what="a dead letter")
        await until(lambda: _zero(r, "frames:p"), 10, what="all acknowledged")
        recs = await results(r, "p")
        evs = await events(r, "p", "dead_letter")
    assert [x["input"]["entry_id"] for x in recs] == good  # no result for the poison entry
    (_, fields), = dead
    assert fields[b"dead.entry_id"].decode() == bad
    assert int(fields[b"dead.deliveries"]) == 3
    assert reason in fields[b"dead.reason"], fields[b"dead.reason"]
    assert fields[b"image"] == dict(POISON[case][0]).get("image", fields[b"image"])  # the original entry is kept
    assert evs and evs[0]["entry_id"] == bad


async def test_consumer_restart_rereads_its_own_pending_entries(r, redis_server):
    """Entries delivered to this consumer but never acknowledged (a crash) are processed on restart."""
    await r.xgroup_create("frames:c", "streamd", id="0", mkstream=True)
    ids = await push_frames(r, "frames:c", images(3), "jpeg")
    await r.xreadgroup("streamd", "worker-1", {"frames:c": ">"}, count=10)  # delivered, then "crashed"
    assert await pending(r, "frames:c") == 3
    cfg = make_config(redis_server.url, [{"id": "c", "url": "redis:frames:c"}],
                      redis={"url": redis_server.url, "consumer": "worker-1"})
    async with running(cfg):
        recs = await until(lambda: _n(r, "c", 3), 20, what="3 results")
        await until(lambda: _zero(r, "frames:c"), 10, what="all acknowledged")
    assert [x["input"]["entry_id"] for x in recs] == ids
    assert all(x["input"]["deliveries"] >= 2 for x in recs)
