"""kvhost.sglang.HiCacheStorage through SGLang's own code: the `dynamic` backend factory, a real
MHATokenToKVPoolHost on CPU, and once the real HiCacheController storage threads.

Needs SGLang (skipped without it) and the repository's plugins built (`cargo build --release
--workspace`); `KVHOST_TEST_PLUGIN_DIRS` (os.pathsep-separated) overrides where they are looked for.
The `kvhost/sglang.py` of this working tree is tested, with the installed native module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import queue
import socket
import sys
import threading
from pathlib import Path

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed in this interpreter", allow_module_level=True)

import kvhost  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# Bound by the `_sglang` fixture: SGLang (and torch) are imported when these tests run, not when
# pytest collects this file, so tests of other files in the same session run without them (they
# check that `import kvhost` imports no engine).
torch = None
KVBufferLayout = KVBuffers = MHABufferInfo = HiCacheStorageConfig = None
MHATokenToKVPoolHost = StorageBackendFactory = HiCacheStorage = None


@pytest.fixture(scope="module", autouse=True)
def _sglang():
    global torch, KVBufferLayout, KVBuffers, MHABufferInfo, HiCacheStorageConfig
    global MHATokenToKVPoolHost, StorageBackendFactory, HiCacheStorage
    import torch
    from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    from kvhost.sglang import HiCacheStorage

    yield


PLUGIN_DIRS = [
    d
    for d in os.environ.get(
        "KVHOST_TEST_PLUGIN_DIRS",
        os.pathsep.join([str(REPO / "target/release/plugins"), str(REPO / "target/release")]),
    ).split(os.pathsep)
    if d
]

L, H, D, PS, NTOK = 3, 2, 32, 16, 128  # layers, heads, head dim, page size, device tokens
NPAGES = 5


def _find_plugin(name: str) -> bool:
    return any((Path(d) / f"lib{name}.so").is_file() for d in PLUGIN_DIRS)


@pytest.fixture(scope="module", autouse=True)
def _plugins_built():
    for lib in ("kvhost_fs", "kvhost_mem"):
        if not _find_plugin(lib):
            pytest.fail(
                f"lib{lib}.so not found in {PLUGIN_DIRS}: run `cargo build --release --workspace` "
                "or set KVHOST_TEST_PLUGIN_DIRS"
            )


def fs_chain(path) -> dict:
    return {
        "chunk_size": 256,
        "local_cpu": False,
        "storage_plugins": ["fs"],
        "extra_config": {
            "storage_plugin.fs.module_path": "kvhost_fs",
            "storage_plugin.fs.class_name": "fs",
            "storage_plugin.fs.path": str(path),
        },
    }


def extra_config(chain=None, *, v1=True, **more) -> dict:
    extra = {
        "backend_name": "kvhost",
        "module_path": "kvhost.sglang",
        "class_name": "HiCacheStorage",
        "kvhost_plugin_dirs": PLUGIN_DIRS,
    }
    if v1:
        extra["interface_v1"] = 1
    if chain is not None:
        extra["kvhost"] = chain
    extra.update(more)
    return extra


def storage_config(extra, *, layout="page_first", tp_rank=0, tp_size=1, mla=False, metrics=False):
    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=metrics,
        is_page_first_layout=layout == "page_first",
        model_name="toy/model-1",
        extra_config=dict(extra),
    )


def make_host(layout: str) -> MHATokenToKVPoolHost:
    """A real MHA host pool on CPU; its "device" side is plain CPU tensors."""
    dt = torch.float16
    k = tuple(torch.zeros(NTOK, H, D, dtype=dt) for _ in range(L))
    v = tuple(torch.zeros(NTOK, H, D, dtype=dt) for _ in range(L))
    info = MHABufferInfo(
        buffers=KVBuffers(
            k=k,
            v=v,
            k_data_ptrs=torch.tensor([t.data_ptr() for t in k], dtype=torch.uint64),
            v_data_ptrs=torch.tensor([t.data_ptr() for t in v], dtype=torch.uint64),
            layout=KVBufferLayout.NHD,
        ),
        page_size=PS,
        head_num=H,
        head_dim=D,
        v_head_dim=D,
        dtype=dt,
        device=torch.device("cpu"),
    )
    host = MHATokenToKVPoolHost(
        info,
        2.0,
        0,
        PS,
        layout,
        pin_memory=False,
        device="cpu",
        device_capacity_tokens=NTOK,
        start_layer=0,
        end_layer=L,
    )
    host._test_refs = (k, v)  # the pool keeps raw pointers to these
    return host


def create(extra, host, **cfg_kw) -> HiCacheStorage:
    """What HiCacheController.attach_storage_backend does."""
    cfg = storage_config(extra, layout=host.layout, **cfg_kw)
    backend = StorageBackendFactory.create_backend("dynamic", cfg, host)
    assert type(backend) is HiCacheStorage
    backend.register_mem_pool_host(host)
    backend.on_host_pools_registered()
    return backend


def page_keys(n, salt="a"):
    return [hashlib.sha256(f"{salt}-{i}".encode()).hexdigest() for i in range(n)]


def fill_random(host, idx, seed=0):
    """Random bytes in the pages at `idx`; returns each page's flat bytes."""
    g = torch.Generator().manual_seed(seed)
    ref = []
    for p in range(len(idx) // PS):
        n = host.get_dummy_flat_data_page().numel()
        data = torch.randn(n, generator=g).to(host.dtype)
        host.set_from_flat_data_page(int(idx[p * PS]), data)
        ref.append(data.view(torch.uint8).clone())
    return ref


def page_bytes(host, idx, p):
    return host.get_data_page(int(idx[p * PS]), flat=True).contiguous().view(torch.uint8)


def assert_pages(host, idx, ref):
    for p, r in enumerate(ref):
        assert torch.equal(page_bytes(host, idx, p), r), f"page {p} differs"


def assert_only_pages_written(host, idx):
    """After a load into a zeroed pool: zero the loaded pages and nothing else may be non-zero."""
    zero = host.get_dummy_flat_data_page()
    for p in range(len(idx) // PS):
        host.set_from_flat_data_page(int(idx[p * PS]), zero)
    assert int(host.kv_buffer.count_nonzero()) == 0, "bytes outside the loaded pages were written"


@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_zero_copy_round_trip_and_restart(tmp_path, layout):
    host = make_host(layout)
    extra = extra_config(fs_chain(tmp_path / "fs"))
    backend = create(extra, host)
    parts = 2 if layout == "page_first" else 2 * L
    assert backend._parts == parts

    keys = page_keys(NPAGES)
    idx = host.alloc(NPAGES * PS)
    ref = fill_random(host, idx)
    assert backend.batch_exists(keys) == 0
    assert backend.batch_set_v1(keys, idx) == [True] * NPAGES
    # a second write of held pages is skipped, and still reported stored
    assert backend.batch_set_v1(keys, idx) == [True] * NPAGES

    assert backend.batch_exists(keys) == NPAGES
    missing = page_keys(1, salt="never")[0]
    assert backend.batch_exists(keys[:2] + [missing] + keys[2:]) == 2
    assert backend.batch_exists([missing] + keys) == 0
    assert backend.batch_exists(keys[1:4]) == 3
    assert backend.batch_exists([]) == 0
    assert backend.exists(keys[0]) and not backend.exists(missing)

    # load into other slots of a zeroed pool: byte-exact, nothing else touched
    host.kv_buffer.zero_()
    idx2 = host.alloc(NPAGES * PS)
    assert not set(idx2.tolist()) & set(idx.tolist())
    assert backend.batch_get_v1(keys, idx2) == [True] * NPAGES
    assert_pages(host, idx2, ref)
    assert_only_pages_written(host, idx2)

    # a missing page loads False in place, the others still load
    host.kv_buffer.zero_()
    got = backend.batch_get_v1(keys[:2] + [missing] + keys[3:], idx2)
    assert got == [True, True, False, True, True]
    assert_pages(host, idx2[: 2 * PS], ref[:2])

    # a page counts only whole: drop one chunk of page 3
    assert backend.chain.remove([backend._part_keys([keys[3]], parts)[-1]]) == [True]
    assert backend.batch_exists(keys) == 3
    assert backend.batch_get_v1(keys, idx2) == [True, True, True, False, True]
    again = fill_random(host, idx)  # the pool was zeroed: same seed, same pages
    assert all(torch.equal(a, b) for a, b in zip(again, ref))
    assert backend.batch_set_v1(keys[3:4], idx[3 * PS : 4 * PS]) == [True]  # rewrites the part
    assert backend.batch_exists(keys) == NPAGES
    backend.close()
    backend.close()  # idempotent

    # a new backend (new chain, new pool) on the same directory finds and loads everything
    host2 = make_host(layout)
    backend2 = create(extra, host2)
    assert backend2.batch_exists(keys) == NPAGES
    idx3 = host2.alloc(NPAGES * PS)
    assert backend2.batch_get_v1(keys, idx3) == [True] * NPAGES
    assert_pages(host2, idx3, ref)
    assert_only_pages_written(host2, idx3)
    backend2.close()


def test_layouts_do_not_share_pages(tmp_path):
    """A page stored in one layout has other bytes in another: it must not be found there."""
    extra = extra_config(fs_chain(tmp_path / "fs"))
    keys = page_keys(2)
    host = make_host("page_first")
    backend = create(extra, host)
    idx = host.alloc(2 * PS)
    fill_random(host, idx)
    assert backend.batch_set_v1(keys, idx) == [True, True]
    backend.close()
    host2 = make_host("layer_first")
    backend2 = create(extra, host2)
    assert backend2.batch_exists(keys) == 0
    backend2.close()


def test_rank_keys_mha_per_rank_mla_shared(tmp_path):
    extra = extra_config(fs_chain(tmp_path / "fs"))
    keys = page_keys(3)

    def store_then_count(writer_rank, reader_rank, mla):
        host = make_host("page_first")
        w = create(extra, host, tp_rank=writer_rank, tp_size=2, mla=mla)
        idx = host.alloc(3 * PS)
        fill_random(host, idx)
        assert w.batch_set_v1(keys, idx) == [True] * 3
        w.close()  # fs allows one instance per directory: the ranks take turns
        r = create(extra, make_host("page_first"), tp_rank=reader_rank, tp_size=2, mla=mla)
        try:
            return r.batch_exists(keys)
        finally:
            r.close()

    assert store_then_count(0, 1, mla=False) == 0
    assert store_then_count(0, 0, mla=False) == 3
    assert store_then_count(0, 1, mla=True) == 3


def test_legacy_tensor_interface(tmp_path):
    """Without interface_v1 SGLang copies pages into flat tensors (`_generic_page_set/get`)."""
    host = make_host("page_first")
    backend = create(extra_config(fs_chain(tmp_path / "fs"), v1=False), host)
    assert backend.zero_copy is False
    keys = page_keys(NPAGES, salt="legacy")
    idx = host.alloc(NPAGES * PS)
    ref = fill_random(host, idx, seed=3)

    data = [host.get_data_page(idx[i * PS]) for i in range(NPAGES)]  # as _generic_page_set
    assert backend.batch_set(keys, data) is True
    assert backend.batch_exists(keys) == NPAGES
    assert backend.batch_exists(keys[:1] + page_keys(1, salt="never") + keys[1:]) == 1

    host.kv_buffer.zero_()
    dummy = [host.get_dummy_flat_data_page() for _ in keys]  # as _generic_page_get
    pages = backend.batch_get(keys, dummy)
    assert all(p is dummy[i] for i, p in enumerate(pages))
    for i, p in enumerate(pages):
        host.set_from_flat_data_page(idx[i * PS], p)
    assert_pages(host, idx, ref)

    # single-key forms, targets filled in place, a non-contiguous target, and no target at all
    value = torch.arange(64, dtype=torch.float16)
    assert backend.set("my-key@with%odd chars", value) is True
    assert backend.exists("my-key@with%odd chars")
    out = torch.zeros(64, dtype=torch.float16)
    assert backend.get("my-key@with%odd chars", out) is out and torch.equal(out, value)
    strided = torch.zeros(128, dtype=torch.float16)[::2]
    assert backend.get("my-key@with%odd chars", strided) is strided
    assert torch.equal(strided, value)
    raw = backend.get("my-key@with%odd chars")
    assert raw.dtype == torch.uint8 and torch.equal(raw, value.view(torch.uint8))
    # a missing key or a target of another size: None, no exception
    assert backend.get("absent", torch.zeros(64, dtype=torch.float16)) is None
    assert backend.get("my-key@with%odd chars", torch.zeros(32, dtype=torch.float16)) is None
    assert backend.get("my-key@with%odd chars", torch.zeros(65, dtype=torch.float16)) is None
    assert backend.batch_get(["absent", keys[0]], [torch.zeros(64), dummy[0]])[0] is None

    # the v1 keyspace is separate (different bytes per chunk)
    backend.close()
    v1 = create(extra_config(fs_chain(tmp_path / "fs")), make_host("page_first"))
    assert v1.batch_exists(keys) == 0
    v1.close()


def test_missing_and_failures_do_not_raise(tmp_path, caplog):
    host = make_host("page_first")
    # a mem plugin too small for one chunk: every put fails in the plugin (NO_SPACE)
    tiny = {
        "storage_plugins": ["mem"],
        "extra_config": {
            "storage_plugin.mem.module_path": "kvhost_mem",
            "storage_plugin.mem.class_name": "mem",
            "storage_plugin.mem.capacity_bytes": 1024,
        },
    }
    backend = create(extra_config(tiny), host)
    keys = page_keys(2)
    idx = host.alloc(2 * PS)
    fill_random(host, idx)
    with caplog.at_level(logging.WARNING, logger="kvhost.sglang"):
        assert backend.batch_set_v1(keys, idx) == [False, False]
    assert "failed" in caplog.text
    assert backend.batch_exists(keys) == 0
    assert backend.batch_get_v1(keys, idx) == [False, False]
    assert backend.batch_set(keys, [host.get_data_page(idx[0])] * 2) is False
    assert backend.batch_get(keys, [host.get_dummy_flat_data_page()] * 2) == [None, None]
    # mismatched arguments from a caller: False, not an exception
    assert backend.batch_get_v1(keys, idx[:PS]) == [False, False]
    assert backend.batch_set(keys, None) is False
    # after close: everything answers "no"
    backend.close()
    assert backend.batch_set_v1(keys, idx) == [False, False]
    assert backend.batch_get_v1(keys, idx) == [False, False]
    assert backend.batch_exists(keys) == 0
    assert backend.get(keys[0], host.get_dummy_flat_data_page()) is None
    backend.clear()


def test_clear_and_stats(tmp_path):
    host = make_host("page_first")
    backend = create(extra_config(fs_chain(tmp_path / "fs")), host, metrics=True)
    keys = page_keys(4)
    idx = host.alloc(4 * PS)
    fill_random(host, idx)
    assert backend.batch_set_v1(keys, idx) == [True] * 4
    assert backend.batch_get_v1(keys, idx) == [True] * 4

    from sglang.srt.observability.metrics_collector import StorageMetrics

    stats = backend.get_stats()
    assert isinstance(stats, StorageMetrics)
    assert stats.backup_pgs == [4] and stats.prefetch_pgs == [4]
    assert len(stats.backup_bandwidth) == 1 and stats.backup_bandwidth[0] > 0
    assert backend.get_stats().backup_pgs == []  # drained by the previous call
    assert "fs" in [t["name"] for t in backend.chain.stats()["tiers"]]

    backend.clear()
    assert backend.batch_exists(keys) == 0
    backend.close()

    plain = create(extra_config(fs_chain(tmp_path / "fs2")), make_host("page_first"))
    assert plain.get_stats() is None
    plain.close()


def test_yaml_config_and_rank_placeholders(tmp_path):
    (tmp_path / "kv-1.yaml").write_text(
        "chunk_size: 256\n"
        "local_cpu: true\n"  # overridden: SGLang's host pool is the CPU tier
        "storage_plugins: [disk]\n"
        "extra_config:\n"
        "  storage_plugin.disk.module_path: kvhost_fs\n"
        "  storage_plugin.disk.class_name: fs\n"
        f"  storage_plugin.disk.path: {tmp_path}/disk-{{tp_rank}}-of-{{tp_size}}\n"
    )
    extra = extra_config(kvhost_config=str(tmp_path / "kv-{tp_rank}.yaml"))
    host = make_host("page_first")
    backend = create(extra, host, tp_rank=1, tp_size=2)
    assert backend.chain.tier_names()[1:] == ["disk"]
    assert backend.chain.stats()["hot"]["entries"] == 0
    idx = host.alloc(PS)
    fill_random(host, idx)
    assert backend.batch_set_v1(page_keys(1), idx) == [True]
    assert backend.chain.stats()["hot"]["entries"] == 0
    backend.close()
    # The YAML's own `{tp_rank}` is not substituted (only the path and inline configs are).
    assert (tmp_path / "disk-{tp_rank}-of-{tp_size}").is_dir()

    inline = extra_config(fs_chain(str(tmp_path / "inline-{tp_rank}")))
    create(inline, make_host("page_first"), tp_rank=1, tp_size=2).close()
    assert (tmp_path / "inline-1").is_dir()


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (extra_config(), kvhost.ConfigError, "neither `kvhost_config`"),
        (
            extra_config({"storage_plugins": []}, kvhost_config="/x.yaml"),
            kvhost.ConfigError,
            "not both",
        ),
        (extra_config(kvhost_config="/nonexistent/kvhost.yaml"), kvhost.ConfigError, "No such file"),
        (extra_config({"storage_plugins": []}), kvhost.ConfigError, "nothing would be stored"),
        (extra_config({"chunk_size": "many"}), kvhost.ConfigError, "chunk_size"),
        (extra_config("not a dict"), kvhost.ConfigError, "JSON object"),
        (
            extra_config(
                {
                    "storage_plugins": ["x"],
                    "extra_config": {
                        "storage_plugin.x.module_path": "kvhost_nope",
                        "storage_plugin.x.class_name": "x",
                    },
                }
            ),
            kvhost.PluginLoadError,
            "no library for module_path `kvhost_nope`",
        ),
        (
            extra_config(
                {
                    "storage_plugins": ["fs"],
                    "extra_config": {
                        "storage_plugin.fs.module_path": "kvhost_fs",
                        "storage_plugin.fs.class_name": "fs",
                    },
                }
            ),
            kvhost.PluginLoadError,
            "missing required option `path`",
        ),
    ],
)
def test_bad_config_raises(extra, error, message):
    with pytest.raises(error, match=message.replace("`", ".").replace("(", ".")):
        create(extra, make_host("page_first"))


def test_fs_directory_in_use_raises(tmp_path):
    extra = extra_config(fs_chain(tmp_path / "fs"))
    first = create(extra, make_host("page_first"))
    try:
        with pytest.raises(kvhost.PluginLoadError, match="in use"):
            create(extra, make_host("page_first"))
    finally:
        first.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_controller_attach_backup_prefetch(tmp_path, monkeypatch):
    """The real HiCacheController.attach_storage_backend("dynamic") with its backup and prefetch
    threads (write_storage -> batch_set_v1; prefetch -> batch_exists + gloo all-reduce ->
    batch_get_v1), then detach (which closes the backend)."""
    import torch.distributed as dist
    from sglang.srt.managers.cache_controller import HiCacheController, PrefetchOperation
    from sglang.srt.mem_cache.utils import get_storage_hash_str
    from sglang.srt.runtime_context import get_parallel

    # SGLang JIT-builds its page hash extension with ninja, which lives next to this Python.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", rank=0, world_size=1)
    get_parallel().override_permanently(
        attn_dcp_size=1, attn_dcp_rank=0, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1
    )
    host = make_host("page_first")
    # A controller with only what the storage path uses (the full __init__ wants a device pool).
    c = object.__new__(HiCacheController)
    c.__dict__.update(
        enable_storage=False,
        page_size=PS,
        mem_pool_host=host,
        storage_host_pool=host,
        mem_pool_device=object(),
        host_memory_mode="cache",
        storage_stop_event=threading.Event(),
        tp_group=dist.group.WORLD,
        attn_cp_group=None,
        attn_tp_group=None,
        pp_group=None,
        enable_storage_metrics=False,
    )
    try:
        c.attach_storage_backend("dynamic", 256, "toy", extra_config(fs_chain(tmp_path / "fs")))
        backend = c.storage_backend
        assert type(backend) is HiCacheStorage
        assert c.page_set_func.__name__ == "_page_set_zero_copy"
        assert c.page_get_func.__name__ == "_page_get_zero_copy"

        npages = 4
        tokens = list(range(7, 7 + npages * PS))
        hashes = get_storage_hash_str(tokens, None, page_size=PS)
        idx = host.alloc(len(tokens))
        ref = fill_random(host, idx, seed=9)
        c.write_storage(idx, tokens, hash_value=hashes, prefix_keys=[])
        ack = c.ack_backup_queue.get(timeout=60)
        assert ack.completed_tokens == npages * PS
        assert backend.batch_exists(hashes) == npages

        host.kv_buffer.zero_()
        # 5 more tokens: a partial tail page whose hash was never stored
        op = PrefetchOperation("req-A", tokens + [1, 2, 3, 4, 5], None, prefix_keys=[])
        c.prefetch_queue.put(op)
        op = c.prefetch_hit_queue.get(timeout=60)
        assert op.storage_hit_count == npages * PS
        op.host_indices = host.alloc(op.storage_hit_count)
        c.prefetch_buffer.put(op)
        done = 0
        while True:
            a = c.ack_prefetch_queue.get(timeout=60)
            done += a.completed_tokens or 0
            if a.completed_req:
                break
        assert done == npages * PS
        assert_pages(host, op.host_indices, ref)
    except queue.Empty:
        pytest.fail("SGLang's storage threads did not answer within 60 s")
    finally:
        if getattr(c, "storage_backend", None) is not None:
            c.detach_storage_backend()
        if own_group:
            dist.destroy_process_group()
    assert backend._closed and c.storage_backend is None
