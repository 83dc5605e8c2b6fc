"""asyncio.wait_for before Python 3.12 can swallow a cancellation (CPython gh-86296); the daemon installs 3.12's.

redis-py wraps every command's write in `asyncio.wait_for(..., socket_timeout)`: a task cancelled while it talked to
Redis went on running about one time in five under Python 3.11 (a daemon's stop that hung until its grace ran out)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest

from streamd import aiocompat

CANCEL_LOOP = textwrap.dedent("""
    import asyncio, json, random, sys
    from streamd.config import parse_config
    from streamd.daemon import Daemon

    async def main():
        cfg = parse_config({"redis": {"url": sys.argv[1]}, "streams": []}, environ={})
        async with Daemon(cfg) as d:  # its start installs the fix
            r = d.redis  # the daemon's own client (socket_timeout set: every write goes through wait_for)
            await r.hset("aiocompat:h", mapping={f"k{i}": "v" * 200 for i in range(200)})
            stuck = 0
            for _ in range(int(sys.argv[2])):
                async def loop():
                    while True:
                        await r.hgetall("aiocompat:h")
                t = asyncio.create_task(loop())
                await asyncio.sleep(random.uniform(0, 0.003))
                t.cancel()
                done, _ = await asyncio.wait({t}, timeout=0.5)
                if not done:  # the cancellation was lost: the loop ran on
                    stuck += 1
                    t.cancel()
                    await asyncio.wait({t}, timeout=1)
            print(json.dumps({"stuck": stuck, "wait_for": asyncio.wait_for.__module__}))

    asyncio.run(main())
""")


def test_a_task_cancelled_while_it_talks_to_redis_stops(redis_server):
    """A real daemon's Redis client, 300 loops of HGETALL cancelled at random moments: every one stops (Python
    3.11's own wait_for: 50-70 of 300 ran on)."""
    p = subprocess.run([sys.executable, "-c", CANCEL_LOOP, redis_server.url, "300"], capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["stuck"] == 0, out
    if sys.version_info < (3, 12):
        assert out["wait_for"] == "streamd.aiocompat"


async def _cancelled_as_it_completes(wait_for) -> str:
    """The awaited future completes in the very iteration its waiter is cancelled: what the waiter sees."""
    fut = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait_for(fut, 10))
    await asyncio.sleep(0)  # the task now waits inside wait_for
    fut.set_result("result")
    task.cancel()
    try:
        return f"returned {await task!r}"
    except asyncio.CancelledError:
        return "cancelled"


async def test_wait_for_does_not_swallow_a_cancellation():
    assert await _cancelled_as_it_completes(aiocompat.wait_for) == "cancelled"
    if sys.version_info < (3, 12):  # what it fixes: Python's own returned the result and lost the cancellation
        assert await _cancelled_as_it_completes(aiocompat._original) == "returned 'result'"


async def test_wait_for_keeps_its_other_behaviour():
    async def value(delay: float):
        await asyncio.sleep(delay)
        return delay

    assert await aiocompat.wait_for(value(0), 5) == 0
    assert await aiocompat.wait_for(value(0.01), None) == 0.01
    with pytest.raises(TimeoutError):
        await aiocompat.wait_for(value(5), 0.05)
    done = asyncio.get_running_loop().create_future()
    done.set_result(7)
    assert await aiocompat.wait_for(done, 0) == 7  # already done: its result even with no time left
    with pytest.raises(TimeoutError):
        await aiocompat.wait_for(value(5), 0)
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await aiocompat.wait_for(never, -1)
    assert never.cancelled()  # what it waited for is cancelled, as Python's own does
    task = asyncio.create_task(aiocompat.wait_for(value(5), 10))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
