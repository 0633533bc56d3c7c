"""The response cache on Redis: a real redis-server (started here, or the one .ci/run starts
and names in CONTEXTWISE_TEST_REDIS_URL); skipped when neither is available."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import pytest
from contextwise.middleware.cache import ResponseCache

from contextwise.policy import Cache


def u(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    pytest.importorskip("redis")
    url = os.environ.get("CONTEXTWISE_TEST_REDIS_URL")
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server (apt-get install redis-server; .ci/run does)")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def policy(redis_url: str) -> Cache:
    return Cache(backend="redis", redis_url=redis_url)


@pytest.fixture
def prefix() -> str:
    return f"cwtest:{uuid.uuid4().hex[:8]}:"


def _cache(policy: Cache, prefix: str, embedder=None) -> ResponseCache:
    from contextwise.memory.cache_redis import RedisCacheEntries

    return ResponseCache(policy, entries=RedisCacheEntries(policy.redis_url, prefix=prefix),
                         embedder=embedder, model="m")


def test_redis_exact_semantic_and_negatives(policy, prefix, embedder) -> None:
    cache = _cache(policy, prefix, embedder)
    cache.put(u("What is the capital of France?"), "Paris.", session="s1")
    assert cache.get(u("what is the capital of france")).text == "Paris."
    assert cache.get(u("Tell me the capital city of France")).text == "Paris."
    assert cache.get(u("What is the capital of Germany?")) is None
    assert cache.stats()["entries"] == 1 and cache.list()[0].session == "s1"


def test_redis_shared_between_processes(policy, prefix, embedder) -> None:
    reader = _cache(policy, prefix, embedder)
    assert reader.get(u("How do I reset my password?")) is None  # index built, empty
    script = textwrap.dedent(f"""
        from contextwise.memory.cache_redis import RedisCacheEntries
        from contextwise.middleware.cache import ResponseCache
        from contextwise.policy import Cache
        c = ResponseCache(Cache(backend="redis", redis_url={policy.redis_url!r}),
                          entries=RedisCacheEntries({policy.redis_url!r}, prefix={prefix!r}),
                          model="m")
        c.put([{{"role": "user", "content": "How do I reset my password?"}}], "Settings.")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert reader.get(u("how can i reset my password")).text == "Settings."
    assert reader.invalidate(everything=True) == 1
    assert reader.get(u("How do I reset my password?")) is None


def test_redis_eviction_ttl_and_invalidation(policy, prefix) -> None:
    lru = _cache(policy.model_copy(update={"max_entries": 3, "semantic": False}), prefix)
    for q in ("q1", "q2", "q3"):
        lru.put(u(q), q.upper(), session="a" if q == "q3" else "b")
    assert lru.get(u("q1"))
    lru.put(u("q4"), "Q4", session="b")
    found = [lru.get(u(q)) is not None for q in ("q1", "q2", "q3", "q4")]
    assert found == [True, False, True, True]
    assert lru.invalidate(session="a") == 1
    assert lru.entries.totals()[0] == 2
    lru.put(u("q1"), "again")  # same exact key: replaced, not duplicated
    assert lru.get(u("q1")).text == "again" and lru.entries.totals()[0] == 2


def test_redis_unreachable_is_a_clear_error() -> None:
    pytest.importorskip("redis")
    from contextwise.errors import ContextwiseError

    with pytest.raises(ContextwiseError, match="cannot reach Redis"):
        ResponseCache(Cache(backend="redis", redis_url=f"redis://127.0.0.1:{_free_port()}/0"))
    from contextwise.errors import InputError

    with pytest.raises(InputError, match="redis_url"):
        ResponseCache(Cache(backend="redis"))
