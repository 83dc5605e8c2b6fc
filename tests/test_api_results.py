"""Results over HTTP (issue 16): paged results and events, Server-Sent Events that resume after a dropped
connection with Last-Event-ID, snapshots with and without the overlay, against a real daemon and real Redis."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import numpy as np
from PIL import Image

from streamd import keys
from streamd.api.results import id_key
from conftest import OPER, PERSON, READ, api_cfg, at_least, h, running, until


def live_clip(clip, sid="cam", pipeline="frame_info", fps=5.0):
    return {"id": sid, "url": str(clip), "fps": fps, "playback": "realtime", "loop": True, "pipeline": pipeline}


async def read_events(resp: aiohttp.ClientResponse, n: int) -> list[tuple[str, dict]]:
    """The next `n` SSE events (id, data) of an open response."""
    out: list[tuple[str, dict]] = []
    eid, data = None, []
    while len(out) < n:
        line = (await resp.content.readline()).decode().rstrip("\n")
        if line.startswith("id: "):
            eid = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            out.append((eid, json.loads("".join(data))))
            eid, data = None, []
    return out


async def test_results_and_events_paged(r, redis_server, clip):
    async with running(api_cfg(redis_server.url, [live_clip(clip)])) as d, aiohttp.ClientSession() as s:
        await until(lambda: at_least(r, "cam", 12), 30, what="results")
        url = d.api_url + "/api/v1/streams/cam/results"
        async with s.get(url, params={"limit": "5"}, headers=h(READ)) as resp:
            newest = await resp.json()
        assert resp.status == 200 and len(newest["entries"]) == 5 and newest["more"]
        seqs = [e["record"]["seq"] for e in newest["entries"]]
        assert seqs == sorted(seqs)  # oldest first, the newest five
        # paging from the start: every entry once, in Redis order, pages of 4
        ids, after = [], "0-0"
        while True:
            async with s.get(url, params={"after": after, "limit": "4"}, headers=h(READ)) as resp:
                page = await resp.json()
            ids += [e["id"] for e in page["entries"]]
            if not page["entries"]:
                assert page["next_after"] == after
                break
            after = page["next_after"]
            if len(ids) >= 12:
                break
        in_redis = [e.decode() for e, _ in await r.xrange(keys.results_key("cam"), count=len(ids))]
        assert ids == in_redis
        async with s.get(d.api_url + "/api/v1/streams/cam/events", headers=h(READ)) as resp:
            evs = await resp.json()
        assert any(e["record"]["type"] == "state" and e["record"]["to"] == "live" for e in evs["entries"])
        for bad in ("x", "1-2-3", "99999999999999999999999-0", "-1"):
            async with s.get(url, params={"after": bad}, headers=h(READ)) as resp:
                body = await resp.json()
                assert resp.status == 400 and body["error"]["code"] == "invalid_cursor", (bad, body)
        for bad in ("0", "1001", "x", "²", "١٢"):  # Unicode digits: str.isdigit() says yes, int() refused '²'
            async with s.get(url, params={"limit": bad}, headers=h(READ)) as resp:
                assert resp.status == 422 and (await resp.json())["error"]["details"]["path"] == "limit", bad
        for bad in ("²", "-1", "86401", "nan", "inf", "x"):
            async with s.get(url + "/live", params={"timeout_s": bad}, headers=h(READ)) as resp:
                assert resp.status == 422 and (await resp.json())["error"]["details"]["path"] == "timeout_s", bad
        async with s.get(d.api_url + "/api/v1/streams/nosuch/results", headers=h(READ)) as resp:
            assert resp.status == 404


async def test_sse_resumes_after_a_dropped_connection(r, redis_server, clip):
    async with running(api_cfg(redis_server.url, [live_clip(clip)])) as d:
        url = d.api_url + "/api/v1/streams/cam/results/live"
        await until(lambda: at_least(r, "cam", 2), 30, what="results")
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers=h(READ)) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
                first = await read_events(resp, 4)
        # the connection is dropped; results go on meanwhile
        last_id = first[-1][0]
        await until(lambda: at_least(r, "cam", len(first) + 10), 30, what="results while disconnected")
        assert d.api_url and not any(f.subs for f in d_live(d).feeds.values())  # the dropped client left
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers={**h(READ), "Last-Event-ID": last_id}) as resp:
                resumed = await read_events(resp, 12)
        in_redis = [e.decode() for e, _ in await r.xrange(keys.results_key("cam"), f"({last_id}", "+", count=12)]
        assert [eid for eid, _ in resumed] == in_redis  # nothing missed, nothing twice, in order
        seqs = [rec["seq"] for _, rec in first + resumed]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        # bounded: ?timeout_s ends the response; a bad Last-Event-ID is refused
        async with aiohttp.ClientSession() as s:
            async with s.get(url, params={"timeout_s": "1"}, headers=h(READ)) as resp:
                body = await resp.read()
                assert body.count(b"event: result") >= 1
            async with s.get(url, headers={**h(READ), "Last-Event-ID": "nope"}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_cursor"


async def test_sse_new_and_resuming_clients_while_another_keeps_the_feed_alive(r, redis_server, clip):
    """Client A stays connected the whole time (the feed never restarts): B, new, gets the newest entry first (not
    the one the feed started at); C, resuming 10 entries back, gets those 10 from Redis, then the live ones."""
    async with running(api_cfg(redis_server.url, [live_clip(clip)])) as d, aiohttp.ClientSession() as s:
        url = d.api_url + "/api/v1/streams/cam/results/live"
        await until(lambda: at_least(r, "cam", 2), 30, what="results")
        async with s.get(url, headers=h(READ)) as a:
            a_first = await read_events(a, 1)
            n = len(await r.xrange(keys.results_key("cam")))
            await until(lambda: at_least(r, "cam", n + 12), 30, what="results while A stays")
            assert len(d_live(d).feeds) == 1  # A's feed, started when A connected
            newest = (await r.xrevrange(keys.results_key("cam"), count=1))[0][0].decode()
            async with s.get(url, headers=h(READ)) as b:
                b_first = await read_events(b, 1)
            assert id_key(b_first[0][0]) >= id_key(newest) > id_key(a_first[0][0])
            back = [e.decode() for e, _ in await r.xrevrange(keys.results_key("cam"), count=11)][::-1]
            async with s.get(url, headers={**h(READ), "Last-Event-ID": back[0]}) as c:
                resumed = await read_events(c, 12)
            in_redis = [e.decode() for e, _ in await r.xrange(keys.results_key("cam"), f"({back[0]}", "+", count=12)]
            assert [eid for eid, _ in resumed] == in_redis and in_redis[:10] == back[1:]


def d_live(d):
    from streamd.api.live import LIVE

    return d.api.app[LIVE]


async def test_snapshot_with_and_without_overlay(r, redis_server, clip):
    cfg = api_cfg(redis_server.url, [live_clip(clip, pipeline="people", fps=2.0)],
                  pipelines={"people": {"stages": [*PERSON, {"type": "track"}]}})
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        url = d.api_url + "/api/v1/streams/cam/snapshot.jpg"

        async def with_people():
            for _, f in reversed(await r.xrange(keys.results_key("cam"))):
                rec = json.loads(f[b"record"])
                if rec["outputs"]["detect"]["detections"]:
                    return rec
            return None

        await until(with_people, 60, what="a result with people")
        # the frame of a result with detections, raw and annotated
        for _ in range(50):
            async with s.get(url, headers=h(READ)) as resp:
                assert resp.status == 200 and resp.content_type == "image/jpeg"
                raw = await resp.read()
                eid = resp.headers["X-Streamd-Entry-Id"]
            entries = await r.xrange(keys.results_key("cam"), eid, eid)
            rec = json.loads(entries[0][1][b"record"])
            if rec["outputs"]["detect"]["detections"]:
                break
        assert int(resp.headers["X-Streamd-Seq"]) == rec["seq"]
        async with s.get(url, params={"entry": eid, "overlay": "true"}, headers=h(READ)) as resp:
            assert resp.status == 200 and resp.headers["X-Streamd-Entry-Id"] == eid
            drawn = await resp.read()
        a = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(int)
        b = np.asarray(Image.open(io.BytesIO(drawn)).convert("RGB")).astype(int)
        assert a.shape == b.shape == (360, 640, 3)
        det = rec["outputs"]["detect"]["detections"][0]
        x1, y1, x2, y2 = (int(round(v)) for v in det["box"])
        # along the box's left edge the annotated frame differs from the raw one; far from every box it does not
        edge = np.abs(b[max(y1, 0) + 20 : y2 - 5, max(x1, 0) + 1] - a[max(y1, 0) + 20 : y2 - 5, max(x1, 0) + 1])
        assert edge.sum(axis=1).mean() > 60, edge.sum(axis=1).mean()
        boxes = [d["box"] for d in rec["outputs"]["detect"]["detections"]]
        mask = np.ones(a.shape[:2], bool)
        for bx in boxes:
            mask[max(0, int(bx[1]) - 30): int(bx[3]) + 30, max(0, int(bx[0]) - 30): int(bx[2]) + 30] = False
        if mask.any():
            assert np.abs(a - b)[mask].mean() < 6  # re-encoding noise only
        async with s.get(url, params={"entry": "1-0"}, headers=h(READ)) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "frame_not_found"
        async with s.get(url, params={"overlay": "maybe"}, headers=h(READ)) as resp:
            assert resp.status == 422
        # a stream added through the API that has published nothing yet has no frame
        body = {"id": "idle", "url": "redis:frames:idle", "pipeline": "frame_info"}
        async with s.post(d.api_url + "/api/v1/streams", json=body, headers=h(OPER)) as resp:
            assert resp.status == 201
        async with s.get(d.api_url + "/api/v1/streams/idle/snapshot.jpg", headers=h(READ)) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "frame_not_found"


async def test_pause_and_resume_a_stream(r, redis_server):
    """PATCH {"paused": true}: kept, listed stopped with reason_code paused, nothing read; false: it runs again."""
    import numpy as np

    from streamd.testing.media import push_frames

    imgs = [np.full((32, 32, 3), i * 30, np.uint8) for i in range(3)]
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        url = d.api_url + "/api/v1/streams"
        body = {"id": "yard", "url": "redis:frames:yard", "pipeline": "frame_info"}
        async with s.post(url, json=body, headers=h(OPER)) as resp:
            assert resp.status == 201
        await push_frames(r, "frames:yard", imgs[:1])
        await until(lambda: at_least(r, "yard", 1), what="a result")
        async with s.patch(url + "/yard", json={"paused": True}, headers=h(OPER)) as resp:
            info = await resp.json()
        assert resp.status == 200 and info["state"] == "stopped" and info["reason_code"] == "paused"
        await push_frames(r, "frames:yard", imgs[1:])
        async with s.get(url + "/yard", headers=h(READ)) as resp:
            assert (await resp.json())["reason"] == "paused"
        assert len(await r.xrange(keys.results_key("yard"))) == 1  # nothing read while paused
        assert json.loads((await r.hget("streamd:api:streams", "yard")))["paused"] is True  # kept paused
        async with s.patch(url + "/yard", json={"paused": False}, headers=h(OPER)) as resp:
            assert resp.status == 200 and (await resp.json())["reason_code"] != "paused"
        await until(lambda: at_least(r, "yard", 3), what="the frames pushed while paused")


async def test_a_client_that_falls_behind_is_ended_not_buffered(r, redis_server):
    """The feed never holds more than QUEUE records for one client: past that the client is ended (and may resume
    with Last-Event-ID); the other clients go on."""
    from streamd.api.live import QUEUE, LiveFeeds

    feeds = LiveFeeds(lambda: r)
    key = keys.results_key("slow")
    await r.xadd(key, {"record": b"{}"})
    async with feeds.subscribe(key) as (feed, slow, _), feeds.subscribe(key) as (_, fast, _):
        async def read_all() -> list:
            got = []
            while len(got) < QUEUE + 10:  # the fast one takes everything as it comes
                await asyncio.wait_for(fast.wake.wait(), 10)
                fast.wake.clear()
                got += fast.queue
                fast.queue.clear()
            return got

        reader = asyncio.create_task(read_all())
        for i in range(QUEUE + 10):
            await r.xadd(key, {"record": json.dumps({"seq": i}).encode()})
        got = await reader
        assert not fast.ended and fast in feed.subs
        assert [json.loads(item[1].split(b"data: ")[1]) for item in got] == [{"seq": i} for i in range(QUEUE + 10)]
        assert slow.ended and slow not in feed.subs and len(slow.queue) == QUEUE  # what it is sent before its end
        assert [json.loads(item[1].split(b"data: ")[1]) for item in slow.queue] == [{"seq": i} for i in range(QUEUE)]
    assert feeds.feeds == {} and feeds.clients == 0  # the feed stopped with its last client


async def test_caught_up_clients_get_events_framed_for_their_http_version(r, redis_server):
    """Caught up, a client's events are written to its connection by the feed itself: as HTTP/1.1 chunks to an
    HTTP/1.1 client, as they are to an HTTP/1.0 one (no chunked encoding there), each event in order, once."""
    stream = {"id": "old", "url": "redis:frames:old", "pipeline": "frame_info"}
    async with running(api_cfg(redis_server.url, [stream])) as d, aiohttp.ClientSession() as s:
        port = int(d.api_url.rsplit(":", 1)[1])
        key = keys.results_key("old")
        await r.xadd(key, {"record": b'{"seq": 0}'})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET /api/v1/streams/old/results/live HTTP/1.0\r\nHost: x\r\n"
                         f"Authorization: Bearer {READ}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
            async with s.get(d.api_url + "/api/v1/streams/old/results/live", headers=h(READ)) as new:
                assert new.headers["Transfer-Encoding"] == "chunked"
                assert [x[1] for x in await read_events(new, 1)] == [{"seq": 0}]
                assert (await reader.readuntil(b"\n\n")).endswith(b'data: {"seq": 0}\n\n')
                subs = d_live(d).feeds[key].subs
                await until(lambda: len(subs) == 2 and all(c.direct is not None for c in subs), 10,
                            what="both clients caught up")
                ids = [(await r.xadd(key, {"record": json.dumps({"seq": i}).encode()})).decode() for i in (1, 2, 3)]
                assert await read_events(new, 3) == [(eid, {"seq": i}) for eid, i in zip(ids, (1, 2, 3))]
                raw = b"".join([await reader.readuntil(b"\n\n") for _ in range(3)])
                assert raw == b"".join(b"id: %s\nevent: result\ndata: {\"seq\": %d}\n\n" % (eid.encode(), i)
                                       for eid, i in zip(ids, (1, 2, 3)))
        finally:
            writer.close()


def test_overlay_draws_boxes_and_masks_where_the_record_puts_them() -> None:
    """streamd/api/overlay.py: a record's masks (COCO RLE, as streamd.stages.masks writes them) and boxes on the frame."""
    from streamd.api.overlay import PALETTE, decode_rle, draw
    from streamd.stages.masks import mask_rle

    h, w = 120, 160
    mask = np.zeros((h, w), bool)
    mask[40:80, 20:60] = True
    rle = mask_rle(mask)
    assert (decode_rle(rle, w, h) == mask).all()
    assert decode_rle(rle, w + 1, h) is None and decode_rle({"size": [h, w], "counts": [5]}, w, h) is None
    grey = np.full((h, w, 3), 128, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "JPEG", quality=95)
    rec = {"outputs": {"detect": {"detections": [
        {"label": "person", "track_id": 2, "confidence": 0.9, "box": [100.0, 30.0, 150.0, 110.0]},
        {"label": "person", "track_id": 3, "confidence": 0.8, "box": [20.0, 40.0, 60.0, 80.0], "mask": rle}]}}}
    out = np.asarray(Image.open(io.BytesIO(draw(buf.getvalue(), rec, 95))).convert("RGB")).astype(int)
    edge = out[70, 100]  # the first box's left edge
    assert np.abs(edge - PALETTE[2]).max() < 40, edge
    inside = out[65, 40]  # inside the mask, away from its box's outline and label
    assert np.abs(inside - (np.asarray(PALETTE[3]) + 128) // 2).max() < 20, inside
    assert np.abs(out[10, 80] - 128).max() < 8  # untouched
    assert draw(buf.getvalue(), None) == buf.getvalue()


def test_overlay_tints_segment_masks_in_their_track_or_object_colour() -> None:
    """A segment stage's (SAM 2) objects carry masks too: tinted in their track's colour, or without a track in
    their object's; no box of their own is drawn (their track's detection has it)."""
    from streamd.api.overlay import PALETTE, draw
    from streamd.stages.masks import mask_rle
    from streamd.testing.media import encode_jpeg

    h, w = 120, 160
    a, b = np.zeros((h, w), bool), np.zeros((h, w), bool)
    a[20:60, 20:60] = True
    b[60:100, 100:140] = True
    rec = {"outputs": {"segment": {"model": "sam2.1-hiera-tiny", "memory": {}, "objects": [
        {"object_id": 1, "track_id": 5, "label": "person", "box": [20, 20, 59, 59], "mask": mask_rle(a)},
        {"object_id": 4, "track_id": None, "label": None, "box": [100, 60, 139, 99], "mask": mask_rle(b)},
        {"object_id": 6, "track_id": None, "box": None, "mask": "not a mask"}]}}}
    out = np.asarray(Image.open(io.BytesIO(draw(encode_jpeg(np.full((h, w, 3), 128, np.uint8)), rec, 95))))
    out = out.astype(int)
    assert np.abs(out[40, 40] - (np.asarray(PALETTE[5]) + 128) // 2).max() < 20, out[40, 40]
    assert np.abs(out[80, 120] - (np.asarray(PALETTE[4]) + 128) // 2).max() < 20, out[80, 120]
    assert np.abs(out[20, 40] - (np.asarray(PALETTE[5]) + 128) // 2).max() < 20  # the mask's edge: no outline
    assert np.abs(out[10, 80] - 128).max() < 8 and np.abs(out[110, 20] - 128).max() < 8  # untouched


def test_overlay_skips_hostile_boxes_and_draws_reversed_ones_sorted():
    """A record is data from Redis: boxes reversed, out of the frame, not numbers, not finite, labels of any
    script. Reversed boxes are drawn as their sorted form, the rest skipped; never an error (it was a 500)."""
    from streamd.api.overlay import draw
    from streamd.testing.media import encode_jpeg

    jpeg = encode_jpeg(np.full((120, 160, 3), 90, np.uint8))

    def rec(*boxes, label="person"):
        return {"outputs": {"detect": {"detections": [{"box": b, "label": label, "class_id": 0} for b in boxes]}}}

    def pixels(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)

    sorted_box = pixels(draw(jpeg, rec([20, 30, 100, 90])))
    assert np.abs(pixels(draw(jpeg, rec([100, 90, 20, 30]))) - sorted_box).max() <= 2  # the same drawing
    hostile = rec(["a", "b", "c", "d"], [1, 2, 3], [float("nan"), 0, 5, 5], [0, 0, float("inf"), 5],
                  [True, 0, 5, 5], None, "box", [-500, -500, 5000, 5000], label="人 ¹²")
    hostile["outputs"]["other"] = {"detections": "not a list"}
    drawn = pixels(draw(jpeg, hostile))
    assert drawn.shape == (120, 160, 3)
    assert np.abs(drawn - pixels(jpeg)).max() > 50  # the out-of-frame box, clamped, is drawn along the edges
    assert np.abs(pixels(draw(jpeg, rec(["a", 1, 2, 3]))) - pixels(draw(jpeg, None))).max() <= 2  # skipped


async def test_a_client_that_reads_nothing_loses_its_slot(r, redis_server, monkeypatch):
    """A client that stops reading (its TCP window shut, our buffers full) cannot hold its MAX_CLIENTS slot: a
    write that does not finish within WRITE_TIMEOUT_S aborts the connection; a reading client goes on."""
    import socket

    from streamd.api import live

    monkeypatch.setattr(live, "WRITE_TIMEOUT_S", 0.5)
    stream = {"id": "big", "url": "redis:frames:big", "pipeline": "frame_info"}
    async with running(api_cfg(redis_server.url, [stream])) as d, aiohttp.ClientSession() as s:
        port = int(d.api_url.rsplit(":", 1)[1])
        key = keys.results_key("big")
        await r.xadd(key, {"record": b'{"seq": 0}'})
        sock = socket.socket()
        try:  # closed before the daemon stops, whatever happens (a stuck write would hold its shutdown)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, never read
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            sock.send(f"GET /api/v1/streams/big/results/live HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {READ}\r\n\r\n".encode())
            await until(lambda: d_live(d).clients == 1, 10, what="the silent client connected")
            async with s.get(d.api_url + "/api/v1/streams/big/results/live", headers=h(READ)) as reader:
                assert len(await read_events(reader, 1)) == 1 and d_live(d).clients == 2
                big = b'{"pad": "' + b"x" * 300_000 + b'"}'
                for _ in range(100):  # 30 MB: more than the kernel's and the transport's buffers hold
                    await r.xadd(key, {"record": big})
                got = await read_events(reader, 100)  # the reading client gets every one
                assert len(got) == 100
                await until(lambda: d_live(d).clients == 1, 30, what="the silent client dropped")
        finally:
            sock.close()


def hostile_masks(h: int, w: int) -> list:
    """RLE masks a record from Redis may carry that must be skipped: counts whose int64 sum wraps round to h*w (it
    crashed np.repeat: a segfault), a count past int64 (an OverflowError), negative, bool, float and string
    counts, too many counts, and compressed (string) counts, which are not supported."""
    n = h * w
    return [{"size": [h, w], "counts": [n] + [2**62] * 4}, {"size": [h, w], "counts": [0, 2**63]},
            {"size": [h, w], "counts": [n + 5, -5]}, {"size": [h, w], "counts": [True] * n},
            {"size": [h, w], "counts": [float(n)]}, {"size": [h, w], "counts": ["1"] * n},
            {"size": [h, w], "counts": [0] * (n + 2) + [n]}, {"size": [h, w], "counts": "PPYo0"},
            {"size": [h, w], "counts": 3}, {"size": [float("inf"), w], "counts": [n]}]


def test_overlay_skips_rle_masks_whose_counts_overflow_or_are_not_counts():
    """decode_rle checks counts with Python ints before numpy: the hostile ones are None, never an error or a
    crash; draw skips them and still tints the good mask and draws every box."""
    from streamd.api.overlay import PALETTE, decode_rle, draw
    from streamd.stages.masks import mask_rle
    from streamd.testing.media import encode_jpeg

    h, w = 36, 64
    for m in hostile_masks(h, w):
        assert decode_rle(m, w, h) is None, m
    good = np.zeros((h, w), bool)
    good[10:30, 30:60] = True
    dets = [{"track_id": 1, "box": [2, 2, 20, 30], "mask": m} for m in hostile_masks(h, w)]
    dets.append({"track_id": 3, "box": [30, 10, 59, 29], "mask": mask_rle(good)})
    out = np.asarray(Image.open(io.BytesIO(draw(encode_jpeg(np.full((h, w, 3), 128, np.uint8)),
                                                {"outputs": {"detect": {"detections": dets}}}, 95))))
    assert np.abs(out[26, 55].astype(int) - (np.asarray(PALETTE[3]) + 128) // 2).max() < 20, out[26, 55]
    assert np.abs(out[25, 10].astype(int) - 128).max() < 8  # inside the hostile masks' box: not tinted


async def test_snapshot_overlay_skips_hostile_masks(r, redis_server):
    """The snapshot endpoint draws a record from Redis: hostile RLE counts there (the int64 sum that wrapped
    segfaulted the daemon) are skipped with a 200, the good mask beside them still tinted."""
    from streamd.api.overlay import PALETTE
    from streamd.stages.masks import mask_rle
    from streamd.testing.media import push_frames

    ht, wd = 36, 64
    stream = {"id": "yard", "url": "redis:frames:yard", "pipeline": "frame_info"}
    async with running(api_cfg(redis_server.url, [stream])) as d, aiohttp.ClientSession() as s:
        await push_frames(r, "frames:yard", [np.full((ht, wd, 3), 128, np.uint8)])
        await until(lambda: at_least(r, "yard", 1), what="a result")
        key = keys.results_key("yard")
        eid = (await r.xrange(key))[-1][0].decode()
        good = np.zeros((ht, wd), bool)
        good[10:30, 30:60] = True
        dets = [{"track_id": 1, "box": [2, 2, 20, 30], "mask": m} for m in hostile_masks(ht, wd)]
        dets.append({"track_id": 3, "box": [30, 10, 59, 29], "mask": mask_rle(good)})
        await r.delete(key)  # the frame's result record replaced by a hostile one at the same entry id
        await r.xadd(key, {"record": json.dumps({"outputs": {"detect": {"detections": dets}}}).encode()}, id=eid)
        url = d.api_url + "/api/v1/streams/yard/snapshot.jpg"
        async with s.get(url, params={"entry": eid, "overlay": "true"}, headers=h(READ)) as resp:
            assert resp.status == 200 and resp.headers["X-Streamd-Entry-Id"] == eid
            out = np.asarray(Image.open(io.BytesIO(await resp.read())).convert("RGB")).astype(int)
        assert np.abs(out[26, 55] - (np.asarray(PALETTE[3]) + 128) // 2).max() < 30, out[26, 55]
        assert np.abs(out[25, 10] - 128).max() < 10
        async with s.get(d.api_url + "/api/v1/streams/yard", headers=h(READ)) as resp:
            assert resp.status == 200  # the daemon lives on


async def test_head_on_the_live_results_sends_headers_only(r, redis_server):
    """HEAD on the SSE route (allow_head) answers headers and nothing else: a body after them (events, chunk
    framing) would be read as the next response on a keep-alive connection (behind a proxy: every later
    client's). On one connection: HEAD, a new entry, then a GET: what follows the HEAD's headers is the GET's."""
    stream = {"id": "hd", "url": "redis:frames:hd", "pipeline": "frame_info"}
    async with running(api_cfg(redis_server.url, [stream])) as d:
        port = int(d.api_url.rsplit(":", 1)[1])
        key = keys.results_key("hd")
        await r.xadd(key, {"record": b'{"seq": 0}'})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            auth = f"Host: x\r\nAuthorization: Bearer {READ}\r\n\r\n"
            writer.write(f"HEAD /api/v1/streams/hd/results/live?timeout_s=1 HTTP/1.1\r\n{auth}".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
            await r.xadd(key, {"record": b'{"seq": 1}'})
            writer.write(f"GET /api/v1/streams/hd HTTP/1.1\r\n{auth}".encode())
            nxt = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert nxt.startswith(b"HTTP/1.1 200 "), nxt
            length = next(int(line.split(b":")[1]) for line in nxt.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            assert json.loads(await reader.readexactly(length))["id"] == "hd"
        finally:
            writer.close()


async def test_a_client_ahead_of_the_feed_gets_no_older_entries(r, redis_server):
    """A Last-Event-ID ahead of the stream's newest entry (a clock ahead, a stream recreated): entries up to it
    are not sent, not even once the client is caught up (the feed's direct writes did not filter them); the first
    entry past it is."""
    stream = {"id": "ah", "url": "redis:frames:ah", "pipeline": "frame_info"}
    async with running(api_cfg(redis_server.url, [stream])) as d, aiohttp.ClientSession() as s:
        key = keys.results_key("ah")
        first = (await r.xadd(key, {"record": b'{"seq": 0}'})).decode()
        ahead = id_key(first)[0] + 60_000
        hdrs = {**h(READ), "Last-Event-ID": f"{ahead}-0"}
        async with s.get(d.api_url + "/api/v1/streams/ah/results/live", headers=hdrs) as resp:
            assert resp.status == 200
            subs = await until(lambda: key in d_live(d).feeds and d_live(d).feeds[key].subs, 10,
                               what="the client subscribed")
            older = (await r.xadd(key, {"record": b'{"seq": 1}'}, id=f"{ahead - 30_000}-0")).decode()
            await until(lambda: d_live(d).feeds[key].last_id == older, 10, what="the feed read the older entry")
            newer = (await r.xadd(key, {"record": b'{"seq": 2}'}, id=f"{ahead + 1}-0")).decode()
            assert await read_events(resp, 1) == [(newer, {"seq": 2})]
            assert subs
