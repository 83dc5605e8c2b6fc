"""The prompt store on its own against a real redis-server: versions 1, 2, 3 ... without gaps or repeats however many
writers, history newest first, rollback as a new version; and the cache's most-specific-scope resolution."""

import asyncio

import pytest
import redis.asyncio as aioredis

from streamd.prompts import CHANNEL, PromptCache, PromptNotFound, PromptStore


@pytest.fixture
async def store(r):
    return PromptStore(r)


async def test_concurrent_writers_get_every_version_once_without_gaps(r, redis_server, store):
    other = aioredis.Redis.from_url(redis_server.url)  # a second daemon's store
    try:
        stores = [store, PromptStore(other)]
        recs = await asyncio.gather(*(stores[i % 2].put("vlm", "global", {"text": f"t{i}"}, f"w{i % 2}")
                                      for i in range(60)))
    finally:
        await other.aclose()
    assert sorted(x["version"] for x in recs) == list(range(1, 61))
    total, hist = await store.history("vlm", "global", limit=100)
    assert total == 60 and [x["version"] for x in hist] == list(range(60, 0, -1))
    # each stored version is exactly what its writer was told
    assert {x["version"]: x["text"] for x in hist} == {x["version"]: x["text"] for x in recs}
    assert (await store.current("vlm", "global"))["version"] == 60


async def test_each_prompt_counts_its_own_versions(store):
    a = await store.put("vlm", "stream:a", {"text": "a"}, "alice")
    g1 = await store.put("vlm", "global", {"text": "g"}, "alice")
    g2 = await store.put("vlm", "global", {"text": "g2"}, "alice", note="better")
    v = await store.put("vocabulary", "global", {"phrases": ["cat"]}, "bob")
    assert (a["version"], g1["version"], g2["version"], v["version"]) == (1, 1, 2, 1)
    assert g2 == {**g2, "kind": "vlm", "scope": "global", "text": "g2", "author": "alice", "note": "better"}
    assert isinstance(g2["created_ts"], float)
    assert {(x["kind"], x["scope"], x["version"]) for x in await store.all_current()} == {
        ("vlm", "stream:a", 1), ("vlm", "global", 2), ("vocabulary", "global", 1)}


async def test_history_is_newest_first_and_pages(store):
    for i in range(1, 8):
        await store.put("vlm", "pipeline:p", {"text": f"v{i}"}, "alice")
    total, page = await store.history("vlm", "pipeline:p", offset=0, limit=3)
    assert total == 7 and [x["text"] for x in page] == ["v7", "v6", "v5"]
    total, page = await store.history("vlm", "pipeline:p", offset=5, limit=3)
    assert total == 7 and [x["version"] for x in page] == [2, 1]
    assert (await store.history("vlm", "pipeline:p", offset=7, limit=3)) == (7, [])
    with pytest.raises(PromptNotFound):
        await store.history("vlm", "pipeline:none")


async def test_rollback_is_a_new_version_with_the_old_content(store):
    await store.put("vlm", "global", {"text": "first", "schema": {"type": "object"}}, "alice")
    await store.put("vlm", "global", {"text": "second"}, "alice")
    rb = await store.rollback("vlm", "global", 1, "bob")
    assert rb["version"] == 3 and rb["rolled_back_from"] == 1 and rb["author"] == "bob"
    assert rb["text"] == "first" and rb["schema"] == {"type": "object"} and rb["note"] == "rollback to version 1"
    assert await store.current("vlm", "global") == rb
    total, hist = await store.history("vlm", "global")
    assert total == 3 and [x["text"] for x in hist] == ["first", "second", "first"]  # history kept
    again = await store.rollback("vlm", "global", 2, "bob", note="back again")
    assert (again["version"], again["text"], again["note"], "schema" in again) == (4, "second", "back again", False)
    with pytest.raises(PromptNotFound):
        await store.rollback("vlm", "global", 9, "bob")
    with pytest.raises(PromptNotFound):
        await store.current("vlm", "stream:nobody")


async def test_every_put_is_announced_on_the_channel(r, redis_server, store):
    sub = aioredis.Redis.from_url(redis_server.url)
    pubsub = sub.pubsub()
    try:
        await pubsub.subscribe(CHANNEL)
        await pubsub.get_message(timeout=1.0)  # the subscription's confirmation
        await store.put("vocabulary", "stream:cam", {"phrases": ["dog"]}, "alice")
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
    finally:
        await pubsub.aclose()
        await sub.aclose()
    assert msg is not None and msg["data"] == b"vocabulary|stream:cam"


async def test_the_cache_resolves_the_most_specific_scope_and_keeps_the_newest(store):
    cache = PromptCache(store)
    for scope in ("global", "pipeline:p", "stream:s"):
        await store.put("vlm", scope, {"text": scope}, "alice")
    await cache.refresh()
    assert cache.loaded.is_set()
    assert cache.resolve("vlm", "s", "p")["text"] == "stream:s"
    assert cache.resolve("vlm", "other", "p")["text"] == "pipeline:p"
    assert cache.resolve("vlm", "other", "q")["text"] == "global"
    assert cache.resolve("vocabulary", "s", "p") is None
    newer = await store.put("vlm", "global", {"text": "newer"}, "alice")
    cache.set(newer)
    cache.set({**newer, "version": 1, "text": "stale"})  # a late, older answer never replaces a newer one
    assert cache.resolve("vlm", "other", "q")["text"] == "newer"
