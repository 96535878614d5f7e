"""kvhost.Chain in-process: round trips through real plugins, every buffer kind, keys, typed errors,
buffer lifetimes, the GIL, hung plugins and close."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref

import pytest

import kvhost
from conftest import plugin_config

KEY = "test-model@1@0@{:x}@bfloat16"


def keys(n: int, start: int = 1) -> list[str]:
    return [KEY.format(i) for i in range(start, start + n)]


def test_import_does_not_import_engines():
    """`import kvhost` (and the L2 client) work without LMCache, SGLang or torch: checked in a fresh
    interpreter, since this one may have imported them for other tests."""
    import subprocess
    import sys

    code = (
        "import sys, kvhost, kvhost.lmcache\n"
        "assert kvhost.lmcache.NativeL2Client is not None\n"
        "loaded = [m for m in ('lmcache', 'sglang', 'torch', 'numpy') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print(kvhost.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == kvhost.__version__


@pytest.mark.parametrize("copy_threads", [0, 2])
def test_large_chunks_cross_the_hot_cache_through_the_copy_pool(mem_config, dirs, copy_threads):
    """Chunks of 1 MiB and more are copied into and out of the hot cache over the copy pool (split
    between the caller and its helpers with copy_threads: 2, on the caller alone with 0): odd sizes at
    an odd destination offset come back byte for byte, nothing written around them."""
    cfg = dict(mem_config, copy_threads=copy_threads, max_local_cpu_size=0.25)
    with kvhost.Chain(cfg, plugin_dirs=dirs, hot_cache=True) as chain:
        sizes = [1 << 20, (1 << 20) + 1, (4 << 20) + 4093, 3 << 20, 4096]
        ks = keys(len(sizes), 500)
        data = [os.urandom(n) for n in sizes]
        assert chain.put(ks, data) == [True] * len(sizes)
        bufs = [bytearray(n + 5) for n in sizes]
        assert chain.get_into(ks, [memoryview(b)[1:] for b in bufs]) == sizes
        for b, d in zip(bufs, data):
            assert b[0] == 0 and bytes(b[1:1 + len(d)]) == d and bytes(b[1 + len(d):]) == b"\0" * 4
        assert chain.stats()["tiers"][0]["name"] == "LocalCPUBackend"


@pytest.mark.parametrize("hot_cache", [False, True])
def test_round_trip_mem(mem_config, dirs, hot_cache):
    with kvhost.Chain(mem_config, plugin_dirs=dirs, hot_cache=hot_cache) as chain:
        ks = keys(8)
        data = [os.urandom(4096 + 1000 * i) for i in range(8)]
        assert chain.put(ks, data) == [True] * 8
        assert chain.contains(ks + keys(1, 100)) == [True] * 8 + [False]
        bufs = [bytearray(len(d) + 7) for d in data]
        lens = chain.get_into(ks, bufs)
        assert lens == [len(d) for d in data]
        for b, d in zip(bufs, data):
            assert bytes(b[: len(d)]) == d
            assert bytes(b[len(d):]) == b"\0" * 7  # nothing written past the chunk
        assert chain.lookup(ks[:3] + keys(1, 100) + ks[3:]) == 3
        assert chain.remove(ks[:2]) == [True, True]
        assert chain.contains(ks[:3]) == [False, False, True]
        stats = chain.stats()
        assert stats["tiers"][0]["name"] == "LocalCPUBackend"
        assert stats["tiers"][1]["name"] == "mem"


def test_buffer_kinds(mem_config, dirs):
    np = pytest.importorskip("numpy")
    with kvhost.Chain(mem_config, plugin_dirs=dirs) as chain:
        payload = os.urandom(1 << 16)
        arr = np.frombuffer(payload, dtype=np.float16).copy()
        sources = [payload, bytearray(payload), memoryview(payload), arr]
        ks = keys(len(sources))
        assert chain.put(ks, sources) == [True] * len(sources)
        out = np.zeros_like(arr)
        dst = [bytearray(len(payload)), memoryview(bytearray(len(payload))), out, np.zeros(len(payload), np.uint8)]
        assert chain.get_into(ks, dst) == [len(payload)] * 4
        for d in dst:
            assert bytes(memoryview(d).cast("B")) == payload
        with pytest.raises(BufferError, match="writable"):
            chain.get_into(ks[:1], [payload])
        with pytest.raises(BufferError, match="contiguous"):
            chain.put(ks[:1], [np.zeros((8, 8), np.uint8)[:, ::2]])
        with pytest.raises(TypeError, match="buffer"):
            chain.put(ks[:1], [12345])
        shared = bytearray(100)
        with pytest.raises(ValueError, match="overlap"):
            chain.get_into(ks[:2], [memoryview(shared)[:60], memoryview(shared)[50:]])


def test_torch_tensors(mem_config, dirs):
    torch = pytest.importorskip("torch")
    with kvhost.Chain(mem_config, plugin_dirs=dirs) as chain:
        src = torch.randn(4, 256, dtype=torch.bfloat16)
        (k,) = keys(1)
        assert chain.put([k], [src], [(1, 3, tuple(src.shape))]) == [True]
        assert chain.meta([k]) == [(src.numel() * 2, 1, 3, (4, 256))]
        dst = torch.empty_like(src)
        assert chain.get_into([k], [dst]) == [src.numel() * 2]
        assert torch.equal(src, dst)
        with pytest.raises(ValueError, match="non-contiguous"):
            chain.put([k], [src.t()])


def test_region_api(mem_config, dirs):
    torch = pytest.importorskip("torch")
    with kvhost.Chain(mem_config, plugin_dirs=dirs) as chain:
        pool = torch.randint(0, 255, (16, 4096), dtype=torch.uint8)
        ks = keys(4)
        offs, lens = [0, 4096 * 3, 4096 * 7, 4096 * 15], [4096] * 4
        assert chain.put_regions(ks, pool, offs, lens) == [True] * 4
        out = torch.zeros_like(pool)
        assert chain.get_regions(ks, out, [4096 * i for i in range(4)], lens) == [4096] * 4
        for i, row in enumerate([0, 3, 7, 15]):
            assert torch.equal(out[i], pool[row])
        with pytest.raises(ValueError, match="outside"):
            chain.put_regions(ks[:1], pool, [16 * 4096 - 10], [4096])


def test_keys_every_form(mem_config, dirs):
    with kvhost.Chain(mem_config, plugin_dirs=dirs) as chain:

        class EngineKey:  # duck-typed LMCache CacheEngineKey
            def to_string(self):
                return KEY.format(0xABC)

        object_key = "Qwen/Qwen2-7B@08000100@0@00ff0a0b"
        salted = object_key + "@user1"
        assert chain.put([EngineKey(), object_key, salted], [b"a", b"b", b"c"]) == [True] * 3
        assert chain.contains([KEY.format(0xABC), object_key, salted]) == [True] * 3
        # The salt isolates: same content key, other salt, not found.
        assert chain.contains([object_key + "@user2"]) == [False]
        with pytest.raises(ValueError, match="neither a CacheEngineKey"):
            chain.contains(["not-a-key"])
        with pytest.raises(ValueError, match="key_format"):
            kvhost.Chain(chain_config := {"storage_plugins": []}, key_format="bogus")
        del chain_config


def test_fs_persists_across_chains(dirs, fs_dir):
    cfg = plugin_config("fs", "kvhost_fs", "fs", {"path": fs_dir})
    ks = keys(4)
    data = [os.urandom(1 << 18) for _ in ks]
    with kvhost.Chain(cfg, plugin_dirs=dirs) as chain:
        assert chain.put(ks, data) == [True] * 4
        chain.flush()
    with kvhost.Chain(cfg, plugin_dirs=dirs) as chain:
        bufs = [bytearray(1 << 18) for _ in ks]
        assert chain.get_into(ks, bufs) == [1 << 18] * 4
        assert [bytes(b) for b in bufs] == data


def test_config_errors_name_the_cause(dirs, fixtures, tmp_path):
    with pytest.raises(kvhost.ConfigError, match="nope.yaml"):
        kvhost.Chain(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: [1, 2\n")
    with pytest.raises(kvhost.ConfigError, match="bad.yaml"):
        kvhost.Chain(bad)
    with pytest.raises(kvhost.PluginLoadError, match="kvhost_nothere"):
        kvhost.Chain(plugin_config("x", "kvhost_nothere", "x"), plugin_dirs=dirs)
    with pytest.raises(kvhost.PluginLoadError, match="wrong_class"):
        kvhost.Chain(plugin_config("m", "kvhost_mem", "wrong_class"), plugin_dirs=dirs)
    failing = plugin_config("f", str(fixtures / "libfx_create_fails.so"), "create_fails")
    with pytest.raises(kvhost.PluginLoadError, match="create"):
        kvhost.Chain(failing)
    assert issubclass(kvhost.PluginLoadError, kvhost.KvhostError)


def test_hung_plugin_times_out_and_close_returns(fixtures):
    cfg = plugin_config("h", str(fixtures / "libfx_hang.so"), "hang", blocking_timeout_secs=0.5)
    chain = kvhost.Chain(cfg)
    buf = bytearray(1024)
    started = time.monotonic()
    with pytest.raises(kvhost.OperationTimeout, match="did not complete"):
        chain.get_into(keys(1), [buf])
    assert time.monotonic() - started < 5
    assert sum(n for _, n in chain.pending()) == 1
    with pytest.raises(kvhost.OperationTimeout):
        chain.put(keys(1), [b"x" * 100])
    started = time.monotonic()
    chain.close(timeout=0.2)
    assert time.monotonic() - started < 10
    with pytest.raises(kvhost.ChainClosed):
        chain.contains(keys(1))


class Buf(bytearray):
    """A bytearray that can be weakly referenced."""


def test_buffer_outlives_every_python_reference(dirs):
    """The asynchronous client returns at once; the caller drops every reference while the (slow)
    plugin still reads the buffer: it must stay alive until the completion is drained, then go."""
    from kvhost.lmcache import NativeL2Client

    client = NativeL2Client(**plugin_config("mem", "kvhost_mem", "mem", {"delay_us": 300_000}), plugin_dirs=dirs)
    b = Buf(os.urandom(1 << 20))
    expected = bytes(b)
    ref = weakref.ref(b)
    key = "m@00000000@0@01"
    fid = client.submit_batch_set([key], [memoryview(b)])
    del b
    gc.collect()
    assert ref() is not None, "the buffer was freed while the plugin held it"
    got = []
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        got = client.drain_completions()
        time.sleep(0.01)
    assert got == [(fid, True, "", [True])]
    gc.collect()
    assert ref() is None, "the buffer leaked after its completion was drained"
    out = Buf(1 << 20)
    fid = client.submit_batch_get([key], [memoryview(out)])
    del out  # the destination too
    gc.collect()
    got = []
    while not got and time.monotonic() < deadline + 10:
        got = client.drain_completions()
        time.sleep(0.01)
    assert got == [(fid, True, "", [True])]
    client.close()


def test_timed_out_buffer_stays_alive_until_the_plugin_lets_go(fixtures):
    cfg = plugin_config("h", str(fixtures / "libfx_hang.so"), "hang", blocking_timeout_secs=0.3)
    chain = kvhost.Chain(cfg)
    b = Buf(4096)
    ref = weakref.ref(b)
    with pytest.raises(kvhost.OperationTimeout):
        chain.get_into(keys(1), [b])
    del b
    gc.collect()
    assert ref() is not None, "the buffer was freed while the hung plugin still held it"
    chain.close(timeout=0.1)  # destroy completes (cancels) the operation: the plugin lets go
    chain.tier_names()  # any call that takes the GIL runs PyO3's deferred decrefs
    gc.collect()
    assert ref() is None, "the buffer leaked after the plugin let go"


def test_gil_released_while_plugin_works(dirs):
    cfg = plugin_config("mem", "kvhost_mem", "mem", {"delay_us": 500_000})
    chain = kvhost.Chain(cfg, plugin_dirs=dirs)
    ticks = 0
    stop = threading.Event()

    def spin():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.05)
    before = ticks
    chain.put(keys(1), [b"x" * 4096])  # ~0.5 s inside the plugin
    during = ticks - before
    stop.set()
    t.join()
    chain.close()
    # With the GIL held for 0.5 s the other thread would not count at all.
    assert during > 10_000, f"the other thread made {during} steps while the plugin worked"
