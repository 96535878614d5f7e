"""Drive a running `kvhost serve` with LMCache's own lm:// client (LMCServerConnector) and its own
CPU backend, exactly as an LMCache deployment with `remote_url: lm://host:port` would.

Usage: lmcache_client.py HOST PORT [roundtrip|bench SIZE_BYTES COUNT]
Prints one JSON line with the results; exits non-zero on any mismatch.
"""
import asyncio
import json
import sys
import threading
import time

import torch

from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def make_backend(cpu_gib):
    config = LMCacheEngineConfig.from_defaults(chunk_size=256, local_cpu=True, max_local_cpu_size=cpu_gib)
    metadata = LMCacheMetadata(
        model_name=MODEL,
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.bfloat16,
        kv_shape=(32, 2, 256, 8, 128),
    )
    return config, LocalCPUBackend(config, metadata, dst_device="cpu")


def key(h):
    return CacheEngineKey(MODEL, 1, 0, h, torch.bfloat16)


def main():
    host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "roundtrip"
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 1 << 20
    count = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    config, cpu = make_backend(max(0.5, 2.5 * size * count / 2**30))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    conn = LMCServerConnector(host, port, loop, cpu)

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    # Chunks the way LMCache allocates them: KV_2LTD tensors from its own CPU allocator.
    elems = size // 2
    shape = torch.Size([2, 1, elems // 2])
    objs = []
    for i in range(count):
        obj = cpu.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD)
        assert obj is not None, "LMCache could not allocate a chunk"
        obj.tensor.copy_(torch.arange(elems, dtype=torch.float32).reshape(shape).to(torch.bfloat16) + i)
        objs.append(obj)
    # Distinct keys per size (a key names fixed bytes: the server never overwrites one); negative
    # hashes too, as Python's hash() produces them.
    keys = [key((size * 1000 + i + 1) * 0x9E37_79B9 * (-1 if i % 2 else 1)) for i in range(count)]

    if mode == "roundtrip":
        missing = key(0xDEAD)
        assert not run(conn.exists(missing)), "EXIST of a missing key"
        assert run(conn.get(missing)) is None, "GET of a missing key"
        for k, obj in zip(keys, objs):
            run(conn.put(k, obj))
        for k, obj in zip(keys, objs):
            assert run(conn.exists(k)), f"EXIST {k.to_string()}"
            got = run(conn.get(k))
            assert got is not None, f"GET {k.to_string()} missed"
            assert got.get_shape() == obj.get_shape(), (got.get_shape(), obj.get_shape())
            assert got.get_dtype() == obj.get_dtype(), (got.get_dtype(), obj.get_dtype())
            assert got.get_memory_format() == obj.get_memory_format()
            assert torch.equal(got.tensor, obj.tensor), "bytes differ"
            got.ref_count_down()
        print(json.dumps({"mode": mode, "chunks": count, "bytes": size, "ok": True}))
    else:
        t = time.perf_counter()
        for k, obj in zip(keys, objs):
            run(conn.put(k, obj))
        # PUT has no reply: an EXIST on the same connection orders after every PUT before it.
        assert run(conn.exists(keys[-1]))
        put_s = time.perf_counter() - t
        t = time.perf_counter()
        for k in keys:
            got = run(conn.get(k))
            assert got is not None
            got.ref_count_down()
        get_s = time.perf_counter() - t
        mb = size * count / 1e6
        print(json.dumps({"mode": mode, "chunks": count, "bytes": size, "put_mb_s": mb / put_s, "get_mb_s": mb / get_s}))
    run(conn.close())
    for obj in objs:
        obj.ref_count_down()


if __name__ == "__main__":
    main()
