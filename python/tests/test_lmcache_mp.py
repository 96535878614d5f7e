"""LMCache 0.5.6 multi-process mode: kvhost.lmcache.NativeL2Client as a `native_plugin` L2 adapter,
built by LMCache's own registry and factory from the JSON spec, storing LMCache's L1 memory objects
into native plugins and loading them back, across a process restart too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("lmcache", reason="LMCache is not installed in this interpreter")

import lmcache_l2 as l2  # noqa: E402
from conftest import plugin_config, plugin_dirs  # noqa: E402

import kvhost  # noqa: E402

HARNESS = Path(l2.__file__).resolve()


def spec(chain: dict, **params) -> dict:
    return {
        "type": "native_plugin",
        "module_path": "kvhost.lmcache",
        "class_name": "NativeL2Client",
        "adapter_params": {**chain, "plugin_dirs": plugin_dirs(), **params},
    }


def fs_spec(path: str, **opts) -> dict:
    return spec(plugin_config("fs", "kvhost_fs", "fs", {"path": path, **opts}))


@pytest.mark.parametrize("count,chunk_bytes", [(1000, 256 << 10), (64, 4 << 20)], ids=["1000x256KiB", "64x4MiB"])
def test_store_lookup_load_delete_and_restart(fs_dir, count, chunk_bytes):
    s = fs_spec(fs_dir)
    l1 = l2.l1_manager(2 * count * chunk_bytes + (64 << 20))
    adapter = l2.build_adapter(s, l1)
    assert type(adapter).__name__ == "NativeConnectorL2Adapter"
    assert type(adapter._client).__name__ == "NativeL2Client"
    keys = l2.object_keys(count, seed=count)
    src = l2.allocate(l1, chunk_bytes, count)
    l2.fill(src, seed=count)
    assert l2.store(adapter, keys, src)
    for o in src:
        o.ref_count_down()

    # A key never stored, in the middle: lookup reports exactly the stored ones.
    probe = keys[:3] + l2.object_keys(1, seed=99_999) + keys[3:]
    assert l2.lookup_and_lock(adapter, probe) == [i for i in range(count + 1) if i != 3]
    adapter.submit_unlock(probe)

    dst = l2.allocate(l1, chunk_bytes, count)
    for o in dst:
        o.tensor.zero_()
    assert l2.lookup_and_lock(adapter, keys) == list(range(count))
    assert l2.load(adapter, keys, dst) == list(range(count))
    adapter.submit_unlock(keys)
    assert all(l2.check(dst, seed=count)), "loaded bytes differ from stored"
    for o in dst:
        o.ref_count_down()
    adapter.close()

    # A second process on the same directory finds and loads what this one stored.
    out = subprocess.run(
        [sys.executable, str(HARNESS), json.dumps(s), str(count), str(chunk_bytes), str(count)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "LMCACHE_LOG_LEVEL": "ERROR"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["found"] == result["loaded"] == result["equal"] == count

    # Delete (LMCache's eviction path), then the keys are gone.
    adapter = l2.build_adapter(s, l1)
    adapter.delete(keys[: count // 2])
    assert l2.lookup_and_lock(adapter, keys) == list(range(count // 2, count))
    adapter.submit_unlock(keys)
    adapter.close()
    l1.close()


def test_native_client_contract_directly(fs_dir):
    """The raw contract: ids at once, eventfd reset by drain, per-key lists, buffers too small."""
    client = kvhost.lmcache.NativeL2Client(**fs_spec(fs_dir)["adapter_params"])
    fd = client.event_fd()
    keys = [f"m@00000000@0@{i:032x}" for i in range(4)]
    data = [os.urandom(100_000) for _ in keys]
    ids = [client.submit_batch_set(keys, [memoryview(d) for d in data])]
    bufs = [bytearray(100_000) for _ in keys]
    small = bytearray(10)

    def drain_all(n):
        got = {}
        deadline = time.monotonic() + 20
        while len(got) < n and time.monotonic() < deadline:
            import select

            p = select.poll()
            p.register(fd, select.POLLIN)
            if p.poll(200):
                for c in client.drain_completions():
                    got[c[0]] = c
        return got

    got = drain_all(1)
    assert got[ids[0]][1] is True, got
    # After a drain the fd is not readable (the client reset it).
    import select

    p = select.poll()
    p.register(fd, select.POLLIN)
    assert p.poll(0) == []
    e = client.submit_batch_exists(keys + ["m@00000000@0@" + "ff" * 16])
    g = client.submit_batch_get(keys[:3] + ["m@00000000@0@" + "ff" * 16], [memoryview(b) for b in bufs])
    t = client.submit_batch_get(keys[:1], [memoryview(small)])
    bad = client.submit_batch_get(["not a key"], [memoryview(small)])
    d = client.submit_batch_delete(keys[3:])
    got = drain_all(5)
    assert got[e][1:] == (True, "", [True, True, True, True, False])
    assert got[g][1] is False and got[g][3] == [True, True, True, False]
    assert [bytes(b) for b in bufs[:3]] == data[:3]
    assert got[t][1] is False and got[t][3] == [False] and "too small" in got[t][2]
    assert got[bad][1] is False and "not a key" in got[bad][2]
    assert got[d][3] == [True]
    assert len({e, g, t, bad, d, ids[0]}) == 6
    client.close()


def test_finished_operations_leave_the_deadline_queue(fs_dir):
    """Finished operations do not wait out the timeout in the deadline queue: after 2,000 answered
    lookups the queue holds only what is still unanswered (at most the newest one)."""
    client = kvhost.lmcache.NativeL2Client(**fs_spec(fs_dir)["adapter_params"])
    fd = client.event_fd()
    import select

    keys = [f"m@00000000@0@{i:032x}" for i in range(4)]
    answered = 0
    for _ in range(2000):
        client.submit_batch_exists(keys)
        p = select.poll()
        p.register(fd, select.POLLIN)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if p.poll(200):
                got = client.drain_completions()
                answered += len(got)
                if got:
                    break
    assert answered == 2000
    # The last lookup's entry leaves when the next operation arms its own.
    client.submit_batch_exists(keys)
    assert client.pending_deadlines() <= 2, client.pending_deadlines()
    client.close()


def test_bad_construction_raises_host_message(fs_dir, fixtures):
    with pytest.raises(kvhost.ConfigError, match="nope.yaml"):
        kvhost.lmcache.NativeL2Client(config="/nope.yaml")
    with pytest.raises(kvhost.ConfigError, match="either"):
        kvhost.lmcache.NativeL2Client(config="/x.yaml", storage_plugins=["fs"])
    with pytest.raises(kvhost.PluginLoadError, match="create_fails"):
        kvhost.lmcache.NativeL2Client(**plugin_config("f", str(fixtures / "libfx_create_fails.so"), "create_fails"))
    with pytest.raises(kvhost.PluginLoadError, match="no_such_class"):
        kvhost.lmcache.NativeL2Client(**plugin_config("fs", "kvhost_fs", "no_such_class"), plugin_dirs=plugin_dirs())
    # Through LMCache's factory, the same errors reach the caller.
    l1 = l2.l1_manager(16 << 20)
    with pytest.raises(kvhost.PluginLoadError, match="no_such_class"):
        l2.build_adapter(spec(plugin_config("fs", "kvhost_fs", "no_such_class")), l1)
    l1.close()


def test_hung_plugin_lookup_fails_and_close_returns(fixtures):
    cfg = plugin_config("h", str(fixtures / "libfx_hang.so"), "hang", blocking_timeout_secs=0.5)
    l1 = l2.l1_manager(16 << 20)
    adapter = l2.build_adapter(spec(cfg), l1)
    keys = l2.object_keys(2, seed=5)
    started = time.monotonic()
    assert l2.lookup_and_lock(adapter, keys) == []  # failed at the deadline: nothing found
    assert time.monotonic() - started < 10
    objs = l2.allocate(l1, 256 << 10, 2)
    tid = adapter.submit_load_task(keys, objs)  # hangs in the plugin, buffers stay lent
    time.sleep(0.7)
    assert adapter.query_load_result(tid) is None
    started = time.monotonic()
    closer = threading.Thread(target=adapter.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close did not return"
    assert time.monotonic() - started < 30
    l1.close()


def drain(client, n, timeout=10.0):
    got = {}
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for c in client.drain_completions():
            got[c[0]] = c
        time.sleep(0.01)
    return got


def test_failing_plugins_report_per_key_false(fixtures, dirs):
    # `liar`: contains answers an undefined status, get never reports its items.
    liar = kvhost.lmcache.NativeL2Client(**plugin_config("l", str(fixtures / "libfx_liar.so"), "liar"))
    keys = ["m@00000000@0@00", "m@00000000@0@01"]
    e = liar.submit_batch_exists(keys)
    g = liar.submit_batch_get(keys, [memoryview(bytearray(64)) for _ in keys])
    got = drain(liar, 2)
    assert got[e][1] is True and got[e][3] == [False, False] and "12345" in got[e][2]
    assert got[g][1] is False and got[g][3] == [False, False] and "did not report" in got[g][2]
    liar.close()
    # A Rust plugin that panics in get: the SDK's boundary turns it into an error for those keys.
    panicky = kvhost.lmcache.NativeL2Client(
        **plugin_config("p", "kvhost_fixture_rust", "rust_mem", {"panic_in": "get"}), plugin_dirs=dirs
    )
    s = panicky.submit_batch_set(keys, [memoryview(b"x" * 64) for _ in keys])
    g = panicky.submit_batch_get(keys, [memoryview(bytearray(64)) for _ in keys])
    got = drain(panicky, 2)
    assert got[s][1] is True
    assert got[g][1] is False and got[g][3] == [False, False] and "panic" in got[g][2].lower()
    panicky.close()
