"""Frames pushed into a Redis stream: one result per entry, every entry acknowledged, poison to dead letters."""

import asyncio
import time

import numpy as np
import pytest

from streamd import keys
from streamd.testing.media import encode_jpeg, push_frames
from conftest import at_least, events, make_config, results, running, until


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
        recs = await until(lambda: at_least(r, "rf", 10), 20, what="10 results")
        await until(lambda: _zero(r, "frames:cam"), 10, what="all acknowledged")
        more = await push_frames(r, "frames:cam", images(2), "jpeg")  # entries added while running
        recs = await until(lambda: at_least(r, "rf", 12), 20, what="12 results")
        await until(lambda: _zero(r, "frames:cam"), 10, what="all acknowledged")
    assert [x["input"]["entry_id"] for x in recs] == ids + more
    assert len({x["seq"] for x in recs}) == 12
    raw = recs[9]
    assert raw["meta"] == {"site": "north"} and raw["width"] == 64
    # the raw frame decoded to the exact pixels: mean matches
    assert abs(raw["outputs"]["frame_info"]["mean_brightness"] - float(np.mean(imgs[9][::32, ::32]))) < 0.01


async def _zero(r, key):
    return await pending(r, key) == 0


def _bomb_png() -> bytes:
    """A small PNG (~70 KB) that decodes to 5000x5000 pixels (75 MB of RGB): under PIL's own bomb limit."""
    import zlib

    w = h = 5000
    row = b"\0" * (1 + w * 3)  # filter byte + black pixels
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(h)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", w.to_bytes(4, "big") + h.to_bytes(4, "big") + b"\x08\x02\0\0\0") \
        + chunk(b"IDAT", body) + chunk(b"IEND", b"")


POISON = {  # an entry streamd cannot use: (fields, the dead letter's whole reason: stable, no addresses)
    "image": ({"image": b"not an image at all", "ts": "1"},
              b"cannot decode image: not a JPEG, PNG, WEBP, BMP or TIFF image"),
    "truncated": ({"image": encode_jpeg(np.zeros((32, 32, 3), np.uint8))[:200]},
                  b"cannot decode image: truncated or corrupt image data"),
    "bomb": ({"image": _bomb_png()}, b"image is 5000x5000, over redis_input.max_pixels (8294400)"),
    "raw-too-big": ({"image": b"\0" * 12, "shape": "5000,5000,3"},
                    b"image is 5000x5000, over redis_input.max_pixels (8294400)"),
    "raw-negative": ({"image": b"\0" * 12, "shape": "-1,2,3"}, b"shape has a dimension that is not positive"),
    "raw-size": ({"image": b"\0" * 11, "shape": "2,2,3"}, b"raw image size does not match shape and dtype"),
    "dtype-text": ({"image": b"\0" * 48, "shape": "2,2,3", "dtype": "U1"},
                   b"dtype must be a plain numeric type (bool, int, uint or float)"),
    "dtype-void": ({"image": b"\0" * 12, "shape": "2,2,3", "dtype": "V1"},
                   b"dtype must be a plain numeric type (bool, int, uint or float)"),
    "dtype-date": ({"image": b"\0" * 96, "shape": "2,2,3", "dtype": "M8[s]"},
                   b"dtype must be a plain numeric type (bool, int, uint or float)"),
    "dtype-struct": ({"image": b"\0" * 24, "shape": "2,2,3", "dtype": "u1,u1"},
                     b"dtype must be a plain numeric type (bool, int, uint or float)"),
    "dtype-junk": ({"image": b"\0" * 12, "shape": "2,2,3", "dtype": "no such type"}, b"dtype is not a numpy dtype"),
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
    async with running(cfg) as d:
        dead = await until(lambda: r.xrange(keys.dead_letter_key("frames:p")), 20, what="a dead letter")
        await until(lambda: _zero(r, "frames:p"), 10, what="all acknowledged")
        later = await push_frames(r, "frames:p", images(1), "jpeg")  # the stream goes on after it
        await until(lambda: at_least(r, "p", 4), 20, what="a result after the dead letter")
        recs = await results(r, "p")
        evs = await events(r, "p", "dead_letter")
        state = d.streams.runners["p"].state.value
        counted = d.metrics.registry.get_sample_value("streamd_dead_letters_total", {"stream": "p"})
    assert state == "live"
    assert [x["input"]["entry_id"] for x in recs] == good + later  # no result for the poison entry
    (_, fields), = dead
    assert fields[b"dead.entry_id"].decode() == bad
    assert int(fields[b"dead.deliveries"]) == 3
    assert fields[b"dead.reason"] == reason
    assert counted == 1
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
        recs = await until(lambda: at_least(r, "c", 3), 20, what="3 results")
        await until(lambda: _zero(r, "frames:c"), 10, what="all acknowledged")
    assert [x["input"]["entry_id"] for x in recs] == ids
    assert all(x["input"]["deliveries"] >= 2 for x in recs)


async def test_restart_pages_through_all_its_own_pending_entries(r, redis_server):
    """40 entries delivered to this consumer before a crash, read 2 at a time: the first pages are still in the
    pipeline when the next is read, and every page is still taken at once (not after claim_idle_ms)."""
    await r.xgroup_create("frames:pg", "streamd", id="0", mkstream=True)
    ids = await push_frames(r, "frames:pg", images(40), "jpeg")
    await r.xreadgroup("streamd", "worker-1", {"frames:pg": ">"}, count=100)
    cfg = make_config(redis_server.url, [{"id": "pg", "url": "redis:frames:pg",
                                          "redis_input": {"read_count": 2, "claim_idle_ms": 120_000}}],
                      redis={"url": redis_server.url, "consumer": "worker-1"})
    async with running(cfg):
        recs = await until(lambda: at_least(r, "pg", 40), 30, what="40 results well before claim_idle_ms")
        await until(lambda: _zero(r, "frames:pg"), 10, what="all acknowledged")
    assert sorted(x["input"]["entry_id"] for x in recs) == ids
    assert len(recs) == 40


async def test_a_dead_consumers_entries_are_claimed_all_at_once(r, redis_server):
    """64 entries left pending by a dead consumer: claimed in one sweep once idle, not read_count per
    claim_idle_ms / 2 (which took 32 rounds: 16 s here)."""
    await r.xgroup_create("frames:dc", "streamd", id="0", mkstream=True)
    ids = await push_frames(r, "frames:dc", images(64), "jpeg")
    await r.xreadgroup("streamd", "dead-worker", {"frames:dc": ">"}, count=100)
    cfg = make_config(redis_server.url, [{"id": "dc", "url": "redis:frames:dc",
                                          "redis_input": {"read_count": 2, "claim_idle_ms": 1000}}])
    async with running(cfg) as d:
        recs = await until(lambda: at_least(r, "dc", 64), 8, what="64 claimed results")
        info = d.streams.stream_info("dc")
    assert sorted(x["input"]["entry_id"] for x in recs) == ids
    assert info["fps"] is None  # every entry gets a result: the effective rate, not the 2.0 default


def test_block_ms_stays_below_the_socket_timeout():
    """A block as long as the connection's socket timeout (10 s) made the stream flap every 10 s."""
    from pydantic import ValidationError

    from streamd.config import StreamConfig

    with pytest.raises(ValidationError, match="block_ms"):
        StreamConfig.model_validate({"id": "b", "url": "redis:frames:b", "redis_input": {"block_ms": 10_000}})
    assert StreamConfig.model_validate({"id": "b", "url": "redis:frames:b",
                                        "redis_input": {"block_ms": 5000}}).redis_input.block_ms == 5000


def test_decoding_does_not_go_through_a_replaced_pil_open():
    """Ultralytics replaces PIL.Image.open with one that imports (or pip-installs) a HEIF plugin when an image is
    not identified: a Redis entry's junk must still get its stable reason, and real images still decode."""
    import io

    import ultralytics.utils.patches  # noqa: F401 - applies the replacement
    from PIL import Image

    from streamd.errors import FrameDecodeError
    from streamd.sources.redis import decode_image

    assert Image.open.__module__ != "PIL.Image"
    with pytest.raises(FrameDecodeError) as e:
        decode_image({b"image": b"not an image at all"}, "image")
    assert str(e.value) == "cannot decode image: not a JPEG, PNG, WEBP, BMP or TIFF image"
    img = images(1)[0]
    for fmt in ("PNG", "BMP", "TIFF", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        assert np.array_equal(decode_image({b"image": buf.getvalue()}, "image"), img), fmt
    assert decode_image({b"image": encode_jpeg(img)}, "image").shape == img.shape


async def test_entries_a_drop_oldest_queue_drops_are_acknowledged_not_left_pending(r, redis_server):
    """A Redis input the user set to `drop_oldest` (a live feed pushed into Redis) behind a slow stage: the frames
    its queue drops are skipped on purpose, so their entries are acknowledged without a result; none stays pending
    (unread again while the stream lives, the consumer group's backlog growing)."""
    from conftest import PERSON

    await push_frames(r, "frames:live", images(40, 240, 320), "jpeg")
    cfg = make_config(redis_server.url, [{"id": "live", "url": f"{redis_server.url}#frames:live", "queue_size": 1,
                                          "drop_policy": "drop_oldest", "pipeline": "people"}],
                      pipelines={"people": {"stages": PERSON}})
    async def settled():
        try:
            return (await r.xinfo_groups("frames:live"))[0]["entries-read"] == 40 and await _zero(r, "frames:live")
        except Exception:  # noqa: BLE001 - the group is not there yet
            return False

    async with running(cfg) as d:
        await until(settled, 60, what="every entry read, and acknowledged with a result or dropped")
        dropped = d.streams.runners["live"].drops.total
    got = await results(r, "live")
    assert dropped > 0, "the queue never dropped: the test proves nothing"
    assert len(got) + dropped == 40, (len(got), dropped)


# -- Redis inputs on other servers connect through the stream egress policy ---------------------------------------
ALLOWED, CANARY = "127.0.0.2", "127.0.0.3"


def _stream(sid: str, url: str, **kw):
    from streamd.config import StreamConfig

    return StreamConfig.model_validate({"id": sid, "url": url, "pipeline": "frame_info", **kw})


async def test_a_redis_inputs_host_is_checked_when_it_connects_not_only_when_added(r, redis_server):
    """Security review #5: an API redis:// input was checked once, at admission; redis-py then resolved the name
    itself on connect, so a rebinding name led it to a refused address (the canary got PING and HELLO). Now each
    connect resolves through the stream's policy: refused (egress_refused, the address and its class named), the
    canary sees no connection, and another stream keeps running."""
    from streamd.api.security import check_stream_url
    from streamd.config import ApiConfig, EgressConfig
    from streamd.testing.egress import Canary, RebindingDns

    canary = Canary(CANARY).start()
    url = f"redis://rebind.test:{canary.port}/0#frames:cam"
    allow = [f"{ALLOWED}/32"]
    await push_frames(r, "frames:ok", images(3), "jpeg")
    cfg = make_config(redis_server.url, [{"id": "ok", "url": "redis:frames:ok"}], egress={"allow": allow})
    try:
        async with running(cfg) as d:
            with RebindingDns("rebind.test", ALLOWED, CANARY) as dns:
                await check_stream_url(url, ApiConfig(), EgressConfig(allow=allow))  # admitted: the first answer
                d.streams.add_stream(_stream("rq", url), "api")
                rq = d.streams.runners["rq"]
                await until(lambda: rq.reason_code == "egress_refused", 15, what="the connect refused")
                assert dns.lookups >= 2  # the connect asked the policy (after the admission's lookup)
            assert "rebind.test (127.0.0.3)" in rq.reason and "loopback" in rq.reason, rq.reason
            await until(lambda: at_least(r, "ok", 3), 20, what="the other stream's results")
            more = await push_frames(r, "frames:ok", images(2), "jpeg")
            got = await until(lambda: at_least(r, "ok", 5), 20, what="the other stream still running")
            assert got[-1]["input"]["entry_id"] == more[-1] and d.streams.runners["ok"].state.value == "live"
        assert canary.connections == 0, "a Redis input connected to an address the policy refuses"
    finally:
        canary.stop()


async def test_an_allowed_redis_input_reconnects_after_a_restart_through_the_policy(r, redis_server, tmp_path):
    """A Redis input on another server, at an allowed loopback address behind a name: it reads, and after that
    Redis restarts it reconnects and reads on, each connect resolving the name through the policy; once the name
    answers a refused address, the next reconnect is refused (egress_refused) and never reaches it."""
    import redis.asyncio as aioredis

    from streamd.redis_server import ManagedRedis
    from streamd.testing.egress import Canary, RebindingDns

    other = ManagedRedis(tmp_path / "other", durable=True).start()  # durable: the consumer group survives
    canary = Canary(CANARY, port=other.port).start()  # the same port on the refused address
    client = aioredis.Redis.from_url(other.url)
    url = f"redis://redis.test:{other.port}/0#frames:cam"
    cfg = make_config(redis_server.url, [], egress={"allow": ["127.0.0.1/32"]})
    try:
        async with running(cfg) as d:
            with RebindingDns("redis.test", "127.0.0.1", "127.0.0.1") as dns:
                await push_frames(client, "frames:cam", images(3), "jpeg")
                d.streams.add_stream(_stream("far", url), "api")
                await until(lambda: at_least(r, "far", 3), 20, what="results from the other Redis")
                before = dns.lookups
                await asyncio.to_thread(other.stop)
                await asyncio.to_thread(other.start)
                more = await push_frames(client, "frames:cam", images(2), "jpeg")

                async def read_on():
                    return set(more) <= {x["input"]["entry_id"] for x in await results(r, "far")}

                await until(read_on, 30, what="results for the entries pushed after the restart")
                assert dns.lookups > before  # the reconnect resolved through the policy again
                dns.then = CANARY  # the name now answers a refused address
                await asyncio.to_thread(other.stop)
                far = d.streams.runners["far"]
                await until(lambda: far.reason_code == "egress_refused", 20, what="the reconnect refused")
        assert canary.connections == 0
    finally:
        await client.aclose()
        other.stop()
        canary.stop()


def _self_signed(tmp_path, name: str):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_a_tls_redis_input_connects_to_the_checked_address_and_verifies_the_name(tmp_path):
    """rediss://: the connection goes to the address the policy checked, while TLS still names the host: SNI is the
    name and the certificate (issued to the name only, no address in it) is verified against it. The next connect
    resolves again and is refused when the name answers a refused address."""
    import ipaddress
    import ssl

    from streamd.egress import EgressError, EgressRules, StreamEgress
    from streamd.redis_clients import PolicedSSLConnection
    from streamd.testing.egress import RebindingDns

    cert, key = _self_signed(tmp_path, "redis.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    sni: list[str | None] = []
    ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    server = await asyncio.start_server(lambda _r, w: w.close(), ALLOWED, 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    policy = StreamEgress(EgressRules(allow_networks=(ipaddress.ip_network(f"{ALLOWED}/32"),)), "tls")
    conn = PolicedSSLConnection(host="redis.test", port=port, ssl_ca_certs=str(cert), egress=policy)
    try:
        with RebindingDns("redis.test", ALLOWED, CANARY) as dns:
            await conn._connect()  # the TCP connect and the TLS handshake (verified: ssl_check_hostname)
            ssl_object = conn._writer.get_extra_info("ssl_object")
            assert ssl_object.server_hostname == "redis.test" and sni == ["redis.test"]
            assert conn._writer.get_extra_info("peername")[0] == ALLOWED
            await conn.disconnect()
            with pytest.raises(EgressError, match="127.0.0.3"):
                await conn._connect()
            assert dns.lookups == 2
    finally:
        await conn.disconnect()
        server.close()
        await server.wait_closed()


async def test_an_input_on_another_redis_is_acknowledged_on_that_server(r, redis_server, tmp_path):
    """An input on another Redis server: each entry is acknowledged on that server once its result is written (old:
    the XACK went to the daemon's own Redis: the entries stayed pending there and came again after every reconnect,
    a second result each, and a same-key stream on the daemon's own Redis had its entries acknowledged instead)."""
    import redis.asyncio as aioredis

    from streamd.redis_server import ManagedRedis

    other = ManagedRedis(tmp_path / "other", durable=True).start()  # durable: the consumer group survives
    client = aioredis.Redis.from_url(other.url)
    ids = [f"{1000 + i}-0" for i in range(3)]
    data = {"image": encode_jpeg(images(1)[0])}
    try:
        for eid in ids:  # the same key, group and entry ids on both servers; pending for someone on the own one
            await client.xadd("frames:cam", data, id=eid)
            await r.xadd("frames:cam", data, id=eid)
        await r.xgroup_create("frames:cam", "streamd", id="0")
        await r.xreadgroup("streamd", "someone", {"frames:cam": ">"})
        cfg = make_config(redis_server.url, [], egress={"allow": ["127.0.0.1/32"]})
        async with running(cfg) as d:
            d.streams.add_stream(_stream("far", f"{other.url}#frames:cam"), "api")
            await until(lambda: at_least(r, "far", 3), 20, what="results from the other Redis")
            await until(lambda: _zero(client, "frames:cam"), 10, what="acknowledged on the other Redis")
            assert await pending(r, "frames:cam") == 3  # the daemon's own same-key stream: untouched
            await asyncio.to_thread(other.stop)  # the input reconnects: nothing of it is delivered again
            await asyncio.to_thread(other.start)
            more = await push_frames(client, "frames:cam", images(2), "jpeg")
            recs = await until(lambda: at_least(r, "far", 5), 20, what="results after the restart")
            await until(lambda: _zero(client, "frames:cam"), 10, what="acknowledged on the other Redis")
            await asyncio.sleep(0.3)  # a redelivered entry (old code) would have its second result by now
            recs = await results(r, "far")
        assert [x["input"]["entry_id"] for x in recs] == ids + more  # one result each, none twice
        assert await pending(r, "frames:cam") == 3
    finally:
        await client.aclose()
        other.stop()


async def test_an_entry_on_another_redis_whose_result_was_written_gets_no_second_result_after_a_restart(
        r, redis_server, tmp_path):
    """An input on another Redis server: the daemon wrote the results and stopped before it could acknowledge the
    entries there (that server refused XACK: NOPERM). The next daemon reads them again from its pending list and
    finds them marked in `streamd:{far}:acking` (set with each result): acknowledged there, no second result (old:
    a second result each, and the first daemon acknowledged nothing there at all)."""
    import redis.asyncio as aioredis

    from streamd.redis_server import ManagedRedis

    other = ManagedRedis(tmp_path / "other", durable=True).start()
    client = aioredis.Redis.from_url(other.url)
    cfg = make_config(redis_server.url, [{"id": "far", "url": f"{other.url}#frames:cam"}],
                      egress={"allow": ["127.0.0.1/32"]})
    try:
        ids = await push_frames(client, "frames:cam", images(3), "jpeg")
        await client.execute_command("ACL", "SETUSER", "default", "-xack")
        async with running(cfg):
            await until(lambda: at_least(r, "far", 3), 20, what="results from the other Redis")
        assert await pending(client, "frames:cam") == 3  # never acknowledged there
        await client.execute_command("ACL", "SETUSER", "default", "+xack")
        async with running(cfg):
            await until(lambda: _zero(client, "frames:cam"), 10, what="acknowledged by the next daemon")
            more = await push_frames(client, "frames:cam", images(1), "jpeg")
            await until(lambda: at_least(r, "far", 4), 20, what="the next entry's result")
            await until(lambda: _zero(client, "frames:cam"), 10, what="acknowledged")
            recs = await results(r, "far")
        assert [x["input"]["entry_id"] for x in recs] == ids + more  # one result each
        assert await r.hlen("streamd:{far}:acking") == 0  # each mark removed once acknowledged
        assert not await r.exists("frames:cam")  # nothing on the daemon's own Redis
    finally:
        await client.aclose()
        other.stop()


async def test_an_inputs_acking_marks_expire_and_go_with_its_stream(r, redis_server, tmp_path):
    """An input on another Redis whose entries cannot be acknowledged there (NOPERM): the marks of their written
    results are in `streamd:{far}:acking`, a hash with an expiry (refreshed with each mark), and DELETE of the
    stream removes it (old: no expiry, and the hash stayed after the DELETE)."""
    import redis.asyncio as aioredis

    from streamd.redis_server import ManagedRedis

    other = ManagedRedis(tmp_path / "other", durable=True).start()
    client = aioredis.Redis.from_url(other.url)
    cfg = make_config(redis_server.url, [{"id": "far", "url": f"{other.url}#frames:cam"}],
                      egress={"allow": ["127.0.0.1/32"]})
    try:
        await push_frames(client, "frames:cam", images(2), "jpeg")
        await client.execute_command("ACL", "SETUSER", "default", "-xack")
        async with running(cfg) as d:
            await until(lambda: at_least(r, "far", 2), 20, what="results from the other Redis")
            assert await r.hlen("streamd:{far}:acking") == 2
            assert await r.pttl("streamd:{far}:acking") > 0
            await d.streams.api_delete_stream("far")
            assert not await r.exists("streamd:{far}:acking")
    finally:
        await client.aclose()
        other.stop()


async def test_an_input_on_another_redis_reads_on_while_the_daemons_own_redis_is_down(tmp_path):
    """An input on another Redis whose entries read again (a dead consumer's, claimed) are checked against the
    daemon's own Redis (acking marks): that Redis down, they are left pending and the input reads on (new entries'
    results wait in the sink), never failing the stream; once it is back, every entry gets one result (old: the
    stream failed with "redis: ..." at each claim and backed off)."""
    import redis.asyncio as aioredis

    from streamd.redis_server import ManagedRedis

    own = ManagedRedis(tmp_path / "own", durable=True).start()
    other = ManagedRedis(tmp_path / "other", durable=True).start()
    client = aioredis.Redis.from_url(other.url)
    own_r = aioredis.Redis.from_url(own.url)
    cfg = make_config(own.url, [{"id": "far", "url": f"{other.url}#frames:cam",
                                 "redis_input": {"claim_idle_ms": 300}}], egress={"allow": ["127.0.0.1/32"]})
    try:
        first = await push_frames(client, "frames:cam", images(1), "jpeg")
        async with running(cfg) as d:
            runner = d.streams.runners["far"]
            await until(lambda: at_least(own_r, "far", 1), 20, what="a result")
            await own_r.aclose()
            await asyncio.to_thread(own.stop)
            async with client.pipeline(transaction=True) as tx:  # a dead consumer's pending entries (the daemon,
                for img in images(2):  # blocked reading, is not served before the transaction's XREADGROUP)
                    tx.xadd("frames:cam", {"image": encode_jpeg(img), "ts": repr(time.time())})
                tx.xreadgroup("streamd", "dead", {"frames:cam": ">"})
                *added, got = await tx.execute()
            dead = [i.decode() for i in added]
            assert len(got[0][1]) == 2

            async def claimed():
                rows = await client.xpending_range("frames:cam", "streamd", min="-", max="+", count=10)
                return all(row["consumer"] != b"dead" for row in rows)

            await until(claimed, 10, what="the dead consumer's entries claimed")
            more = await push_frames(client, "frames:cam", images(1), "jpeg")
            await until(lambda: runner._redis_source.frames_decoded >= 2, 10, what="a new entry read while the own Redis is down")
            await asyncio.sleep(0.5)  # the old code failed the stream at the claim
            assert runner.attempts == 0 and runner.state.value == "live", runner.reason
            await asyncio.to_thread(own.start)
            own_r = aioredis.Redis.from_url(own.url)
            await until(lambda: at_least(own_r, "far", 4), 20, what="every entry's result")
            await until(lambda: _zero(client, "frames:cam"), 10, what="acknowledged on the other Redis")
            recs = await results(own_r, "far")
        assert sorted(x["input"]["entry_id"] for x in recs) == sorted(first + dead + more)  # one result each
    finally:
        await own_r.aclose()
        await client.aclose()
        other.stop()
        own.stop()
