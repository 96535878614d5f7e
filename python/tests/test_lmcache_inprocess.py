"""LMCache 0.5.6's own StorageManager, configured the way its users configure storage plugins, storing
and loading through kvhost.lmcache.StoragePlugin and native plugins."""

from __future__ import annotations

import time

import pytest

lmcache = pytest.importorskip("lmcache", reason="LMCache is not installed in this interpreter")
torch = pytest.importorskip("torch")

from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.event_manager import EventManager  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.storage_manager import StorageManager  # noqa: E402

import kvhost  # noqa: E402
from conftest import plugin_config, plugin_dirs  # noqa: E402

CHUNK = 256
META = dict(
    model_name="test/llama",
    world_size=1,
    local_world_size=1,
    worker_id=0,
    local_worker_id=0,
    kv_dtype=torch.bfloat16,
    kv_shape=(4, 2, CHUNK, 4, 64),  # 4 layers x K,V x 256 tokens x 256 bf16: 1 MiB chunks
    role="worker",
)


def engine(chain: dict, local_cpu: bool, name: str = "kv") -> StorageManager:
    cfg = LMCacheEngineConfig.from_dict(
        {
            "chunk_size": CHUNK,
            "local_cpu": local_cpu,
            "max_local_cpu_size": 0.2,
            "storage_plugins": [name],
            "extra_config": {
                f"storage_plugin.{name}.module_path": "kvhost.lmcache",
                f"storage_plugin.{name}.class_name": "StoragePlugin",
                f"storage_plugin.{name}.kvhost": chain,
                f"storage_plugin.{name}.plugin_dirs": plugin_dirs(),
            },
        }
    )
    return StorageManager(cfg, LMCacheMetadata(**META), EventManager())


def keys(n: int, base: int) -> list:
    return [CacheEngineKey("test/llama", 1, 0, base + i, torch.bfloat16) for i in range(n)]


def fill(sm: StorageManager, n: int, seed: int):
    md = LMCacheMetadata(**META)
    objs = sm.batched_allocate(md.get_shapes()[0], md.get_dtypes()[0], n, MemoryFormat.KV_2LTD)
    g = torch.Generator().manual_seed(seed)
    expect = []
    for o in objs:
        o.tensor.copy_(torch.randn(o.tensor.shape, generator=g, dtype=torch.float32).to(torch.bfloat16))
        expect.append(o.tensor.clone())
    return objs, expect


def wait_stored(plugin, ks, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(plugin.contains(k) for k in ks) and not any(plugin.exists_in_put_tasks(k) for k in ks):
            return
        time.sleep(0.01)
    raise AssertionError("puts did not complete")


def round_trip(sm: StorageManager, n: int, base: int, local_cpu: bool, name: str = "kv"):
    plugin = sm.storage_backends[name]
    assert isinstance(plugin, kvhost.lmcache.StoragePlugin)
    ks = keys(n, base)
    objs, expect = fill(sm, n, seed=base)
    sm.batched_put(ks, objs)  # StorageManager drops its references here
    wait_stored(plugin, ks)
    if local_cpu:  # make LMCache's own hot cache forget them: the reads must come from kvhost
        sm.batched_remove(ks, locations=["LocalCPUBackend"])
    mapping = sm.get_block_mapping([(k, i * CHUNK, (i + 1) * CHUNK) for i, k in enumerate(ks)])
    assert list(mapping) == [name], mapping
    got = sm.batched_get([k for k, _, _ in mapping[name]], location=name)
    assert len(got) == n
    for g, e in zip(got, expect):
        assert g is not None
        assert g.tensor.dtype == torch.bfloat16 and g.tensor.shape == e.shape
        assert g.metadata.fmt == MemoryFormat.KV_2LTD
        assert torch.equal(g.tensor, e), "bytes differ"
        g.ref_count_down()
    return plugin, ks


@pytest.mark.parametrize("local_cpu", [False, True])
def test_storage_manager_round_trip_fs(local_cpu, fs_dir):
    chain = plugin_config("fs", "kvhost_fs", "fs", {"path": fs_dir})
    sm = engine(chain, local_cpu)
    try:
        plugin, ks = round_trip(sm, 8, base=0x1000, local_cpu=local_cpu)
        # pin, remove, and the engine's view afterwards
        assert plugin.pin(ks[0]) and plugin.unpin(ks[0])
        assert plugin.batched_contains(ks) == 8
        assert sm.remove(ks[0]) >= 1
        assert not plugin.contains(ks[0])
        # get_non_blocking: a future of the chunk
        fut = plugin.get_non_blocking(ks[1])
        obj = fut.result(timeout=10)
        assert obj is not None and obj.get_size() == 1 << 20
        obj.ref_count_down()
        assert plugin.get_non_blocking(keys(1, 0x9999)[0]) is None
        stats = plugin.stats()
        assert stats["tiers"][1]["name"] == "fs" and stats["tiers"][1]["puts"] >= 8
    finally:
        sm.close()


def test_storage_manager_round_trip_redis(redis_server):
    chain = plugin_config("redis", "kvhost_redis", "redis", {"url": redis_server.url})
    sm = engine(chain, local_cpu=False)
    try:
        round_trip(sm, 16, base=0x2000, local_cpu=False)
    finally:
        sm.close()


def test_put_callback_after_plugin_completes(fs_dir):
    chain = plugin_config("fs", "kvhost_fs", "fs", {"path": fs_dir})
    sm = engine(chain, local_cpu=False)
    try:
        plugin = sm.storage_backends["kv"]
        ks = keys(4, 0x3000)
        objs, _ = fill(sm, 4, seed=3)
        done = []
        plugin.batched_submit_put_task(ks, objs, on_complete_callback=done.append)
        for o in objs:  # what StorageManager does right after submit
            o.ref_count_down()
        deadline = time.monotonic() + 10
        while len(done) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(k.chunk_hash for k in done) == [k.chunk_hash for k in ks]
        assert all(plugin.contains(k) for k in ks)
    finally:
        sm.close()


def test_bad_configs_fail_the_plugin_clearly(fs_dir):
    # LMCache's launcher only logs a constructor error; construct directly to see the message.
    from kvhost.lmcache import StoragePlugin

    def cfg(extra, plugins=("kv",)):
        return LMCacheEngineConfig.from_dict(
            {"chunk_size": CHUNK, "local_cpu": False, "storage_plugins": list(plugins), "extra_config": extra}
        )

    base = {"storage_plugin.kv.module_path": "kvhost.lmcache", "storage_plugin.kv.class_name": "StoragePlugin"}
    with pytest.raises(kvhost.ConfigError, match="kvhost_config"):
        StoragePlugin(config=cfg(dict(base)))
    with pytest.raises(kvhost.ConfigError, match="nope.yaml"):
        StoragePlugin(config=cfg({**base, "storage_plugin.kv.kvhost_config": "/nope.yaml"}))
    two = {**base, "storage_plugin.b.module_path": "kvhost.lmcache", "storage_plugin.b.class_name": "StoragePlugin"}
    with pytest.raises(kvhost.ConfigError, match="all name"):
        StoragePlugin(config=cfg(two, plugins=("kv", "b")))
    bad_plugin = {**base, "storage_plugin.kv.kvhost": plugin_config("x", "kvhost_fs", "fs", {"path": fs_dir, "bogus": 1}),
                  "storage_plugin.kv.plugin_dirs": plugin_dirs()}
    with pytest.raises(kvhost.PluginLoadError, match="bogus"):
        StoragePlugin(config=cfg(bad_plugin))
