"""Driving an LMCache multi-process L2 adapter the way LMCache's own store and prefetch controllers do:
built from its JSON spec through LMCache's adapter registry and factory, fed LMCache L1 memory objects.

Used by the tests and the benchmark, and runnable as a script (the "second process" of the restart
test): ``python lmcache_l2.py SPEC_JSON COUNT BYTES SEED`` looks up, loads and checks COUNT chunks that
another process stored, and prints a JSON line.
"""

from __future__ import annotations

import argparse
import json
import select
import sys
import time

import torch
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.config import L1MemoryManagerConfig
from lmcache.v1.distributed.l2_adapters import create_l2_adapter
from lmcache.v1.distributed.l2_adapters.config import add_l2_adapters_args, parse_args_to_l2_adapters_config
from lmcache.v1.distributed.memory_manager.l1_memory_manager import L1MemoryManager
from lmcache.v1.platform.event_notifier import consume_fd

MODEL = "test/llama"


def build_adapter(spec: dict, l1: L1MemoryManager):
    """LMCache's path from ``--l2-adapter JSON`` to an adapter (as its storage manager does)."""
    parser = argparse.ArgumentParser()
    add_l2_adapters_args(parser)
    config = parse_args_to_l2_adapters_config(parser.parse_args(["--l2-adapter", json.dumps(spec)]))
    adapter = create_l2_adapter(config.adapters[0], l1.get_l1_memory_desc())
    adapter.set_backend_identity(spec["type"])
    return adapter


def l1_manager(nbytes: int) -> L1MemoryManager:
    return L1MemoryManager(L1MemoryManagerConfig(size_in_bytes=nbytes, use_lazy=False, shm_name=""))


def layout(chunk_bytes: int) -> MemoryLayoutDesc:
    assert chunk_bytes % (2 * 256 * 2) == 0
    return MemoryLayoutDesc(shapes=[torch.Size([2, 256, chunk_bytes // (2 * 256 * 2)])], dtypes=[torch.bfloat16])


def object_keys(n: int, seed: int, salt: str = "") -> list:
    return [
        ObjectKey(
            chunk_hash=(seed * 1_000_003 + i).to_bytes(16, "big"),
            model_name=MODEL,
            kv_rank=ObjectKey.ComputeKVRank(1, 0, 1, 0),
            object_group_id=0,
            cache_salt=salt,
        )
        for i in range(n)
    ]


def allocate(l1: L1MemoryManager, chunk_bytes: int, n: int) -> list:
    err, objs = l1.allocate(layout(chunk_bytes), n)
    assert objs is not None and len(objs) == n, f"L1 allocation failed: {err}"
    return objs


def fill(objs: list, seed: int) -> None:
    """Deterministic content per (seed, index), so another process can check it."""
    for i, o in enumerate(objs):
        flat = o.tensor.view(torch.int16).view(-1)
        g = torch.Generator().manual_seed(seed * 7919 + i)
        flat.copy_(torch.randint(-32768, 32767, flat.shape, generator=g, dtype=torch.int16))


def check(objs: list, seed: int) -> list[bool]:
    ok = []
    for i, o in enumerate(objs):
        flat = o.tensor.view(torch.int16).view(-1)
        g = torch.Generator().manual_seed(seed * 7919 + i)
        ok.append(bool(torch.equal(flat, torch.randint(-32768, 32767, flat.shape, generator=g, dtype=torch.int16))))
    return ok


def wait(fd: int, timeout_s: float = 120.0) -> None:
    """What LMCache's controllers do: poll the adapter's eventfd, then consume it."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    if not p.poll(int(timeout_s * 1000)):
        raise TimeoutError(f"no completion within {timeout_s} s")
    consume_fd(fd)


def store(adapter, keys, objs) -> bool:
    tid = adapter.submit_store_task(keys, objs)
    while True:
        wait(adapter.get_store_event_fd())
        done = adapter.pop_completed_store_tasks()
        if tid in done:
            return done[tid].is_successful()


def lookup_and_lock(adapter, keys) -> list[int]:
    tid = adapter.submit_lookup_and_lock_task(keys, {})
    while True:
        wait(adapter.get_lookup_and_lock_event_fd())
        bm = adapter.query_lookup_and_lock_result(tid)
        if bm is not None:
            return bm.get_indices_list()


def load(adapter, keys, objs) -> list[int]:
    tid = adapter.submit_load_task(keys, objs)
    while True:
        wait(adapter.get_load_event_fd())
        bm = adapter.query_load_result(tid)
        if bm is not None:
            return bm.get_indices_list()


def main() -> int:
    spec, count, chunk_bytes, seed = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    l1 = l1_manager(count * chunk_bytes + (64 << 20))
    adapter = build_adapter(spec, l1)
    keys = object_keys(count, seed)
    started = time.monotonic()
    found = lookup_and_lock(adapter, keys)
    dst = allocate(l1, chunk_bytes, count)
    for o in dst:
        o.tensor.zero_()
    loaded = load(adapter, keys, dst)
    adapter.submit_unlock(keys)
    ok = check(dst, seed)
    print(json.dumps({"found": len(found), "loaded": len(loaded), "equal": sum(ok), "seconds": time.monotonic() - started}))
    adapter.close()
    return 0 if len(found) == len(loaded) == sum(ok) == count else 1


if __name__ == "__main__":
    sys.exit(main())
