"""`BlockingFetcher` (streamd/egress.py): the egress policy for a thread that fetches by itself (the HLS decoder
thread reads its segments, keys and init sections). The same guarantees as the event loop's `StreamEgress.fetch`,
checked against real HTTP servers on loopback: a name resolved once, by the policy, on the loop (a rebinding
answer is never used), the connection made to the checked address and kept alive, every redirect hop checked
before it connects, byte and time limits, the request budget, and a close that interrupts a fetch in flight. The
canary (127.0.0.3, refused) never sees a connection."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time

import pytest

from streamd.egress import BlockingFetcher, EgressError, EgressRules, Interrupted, StreamEgress
from streamd.testing.egress import Canary, RebindingDns, connect_guard, redirect
from streamd.testing.servers import HttpDir

ALLOWED = "127.0.0.2"
CANARY = "127.0.0.3"


def rules(**kw) -> EgressRules:
    return EgressRules(deny_non_global=True, allow_networks=(ipaddress.ip_network(f"{ALLOWED}/32"),
                                                             ipaddress.ip_network("127.0.0.1/32")), **kw)


async def fetch_all(fetcher: BlockingFetcher, urls: list[str], **kw) -> list[int | str]:
    """Fetch each URL from a thread (as the decoder thread does); a length, or the refusal's code."""

    def run() -> list[int | str]:
        out: list[int | str] = []
        for u in urls:
            try:
                out.append(len(fetcher.fetch(u, max_bytes=kw.get("max_bytes", 100_000),
                                             timeout_s=kw.get("timeout_s", 5))[0]))
            except EgressError as e:
                out.append(e.code)
        return out

    return await asyncio.to_thread(run)


@pytest.mark.parametrize("keep_alive", [True, False])
async def test_a_rebinding_name_is_resolved_once_on_the_loop_and_never_reaches_its_second_address(tmp_path,
                                                                                                     keep_alive):
    """Keep-alive or not, the thread's fetches connect only to the address the policy checked for the name: the
    name is resolved once (by the policy, on the loop: the rebinding stand-in sees one lookup), a reconnect
    (HTTP/1.0) goes to that same checked address, and another name for the same port gets a resolution and a
    check of its own (here refused)."""
    for i in range(3):
        (tmp_path / f"s{i}.ts").write_bytes(bytes([0x47]) * 1000 * (i + 1))
    http = HttpDir(tmp_path, keep_alive=keep_alive).start()
    canary = Canary(CANARY, {"/s1.ts": (200, {}, b"canary"), "/s0.ts": (200, {}, b"canary")},
                    port=http.port).start()
    eg = StreamEgress(rules(), "s")
    fetcher = BlockingFetcher(eg, asyncio.get_running_loop())
    try:
        with connect_guard() as guard:
            with RebindingDns("rebind.test", "127.0.0.1", CANARY) as dns:
                got = await fetch_all(fetcher, [f"http://rebind.test:{http.port}/s{i}.ts" for i in range(3)])
                lookups = dns.lookups
            with RebindingDns("other.test", CANARY, CANARY):
                other = await fetch_all(fetcher, [f"http://other.test:{http.port}/s0.ts"])
    finally:
        fetcher.close()
        await eg.aclose()
        http.stop()
        canary.stop()
    assert got == [1000, 2000, 3000] and lookups == 1, (got, lookups)
    assert other == ["egress_refused"]
    assert guard.outside == [] and canary.connections == 0
    assert all(addr[0] == "127.0.0.1" for addr in guard.connects), guard.connects
    assert len(guard.connects) == (1 if keep_alive else 3), guard.connects
    assert eg.requests == 4  # every request took from the stream's budget (the refused one too)


@pytest.mark.parametrize("target", ["canary", "metadata", "cgnat", "ftp"])
async def test_every_redirect_hop_is_checked_before_it_connects(target):
    to = {"canary": f"http://{CANARY}:{{port}}/secret.ts", "metadata": "http://169.254.169.254/latest/meta-data/",
          "cgnat": "http://100.100.100.200/latest/meta-data/", "ftp": f"ftp://{CANARY}/secret.ts"}[target]
    with Canary(CANARY, {"/secret.ts": (200, {}, b"secret")}) as canary:
        with Canary(ALLOWED, {"/hop": redirect("/hop2"), "/hop2": redirect(to.format(port=canary.port))}) as origin:
            eg = StreamEgress(rules(), "s")
            fetcher = BlockingFetcher(eg, asyncio.get_running_loop())
            try:
                with connect_guard() as guard:
                    got = await fetch_all(fetcher, [origin.url("/hop")])
            finally:
                fetcher.close()
                await eg.aclose()
            assert origin.hits("/hop") == 1 and origin.hits("/hop2") == 1
        assert got == ["egress_refused"]
        assert canary.connections == 0 and guard.outside == []


async def test_limits_redirects_size_status_and_request_rate():
    body = b"x" * 5000
    routes = {"/big": (200, {}, body), "/ok": (200, {}, b"ok"), "/gone": (404, {}, b"no"),
              **{f"/r{i}": redirect(f"/r{i + 1}") for i in range(10)}}
    with Canary(ALLOWED, routes) as origin:
        eg = StreamEgress(rules(max_redirects=3, requests_per_s=0.001, request_burst=12), "s")
        fetcher = BlockingFetcher(eg, asyncio.get_running_loop())
        try:
            got = await fetch_all(fetcher, [origin.url("/big"), origin.url("/ok"), origin.url("/gone"),
                                             origin.url("/r0"), origin.url("/ok"), origin.url("/ok")],
                                  max_bytes=4096)
        finally:
            fetcher.close()
            await eg.aclose()
    # 1 + 1 + 1 + 4 (three redirects followed, the fourth refused) + 1 = 8 requests; then 4 left in the budget
    assert got == ["too_large", 2, "http_status", "too_many_redirects", 2, 2]
    assert origin.hits("/r3") == 1 and origin.hits("/r4") == 0
    eg2 = StreamEgress(rules(requests_per_s=0.001, request_burst=2), "s2")
    fetcher2 = BlockingFetcher(eg2, asyncio.get_running_loop())
    with Canary(ALLOWED, {"/ok": (200, {}, b"ok")}) as origin2:
        try:
            got2 = await fetch_all(fetcher2, [origin2.url("/ok")] * 3)
        finally:
            fetcher2.close()
            await eg2.aclose()
    assert got2 == [2, 2, "request_rate"] and origin2.hits("/ok") == 2


async def test_time_limit_and_interrupt():
    """A server that does not answer: the fetch fails with `timeout` at its time limit; `interrupt()` from
    another thread fails a fetch in flight at once (a closing source's thread returns)."""
    release = threading.Event()

    def slow():
        release.wait(10)
        return (200, {}, b"late")

    with Canary(ALLOWED, {"/slow": slow}) as origin:
        eg = StreamEgress(rules(), "s")
        fetcher = BlockingFetcher(eg, asyncio.get_running_loop())
        try:
            t0 = time.monotonic()
            got = await fetch_all(fetcher, [origin.url("/slow")], timeout_s=0.5)
            took = time.monotonic() - t0
            assert got == ["timeout"] and took < 5, (got, took)

            def interrupted() -> str:
                try:
                    fetcher.fetch(origin.url("/slow"), max_bytes=100, timeout_s=30)
                except Interrupted:
                    return "interrupted"
                except EgressError as e:
                    return e.code
                return "fetched"

            task = asyncio.ensure_future(asyncio.to_thread(interrupted))
            await asyncio.sleep(0.3)
            fetcher.interrupt()
            assert await asyncio.wait_for(task, 5) == "interrupted"
        finally:
            release.set()
            fetcher.close()
            await eg.aclose()
