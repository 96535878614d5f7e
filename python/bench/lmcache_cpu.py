"""LMCache 0.5.6's own LocalCPUBackend, driven by `kvhost bench --suite micro --vs-lmcache`.

The host starts this script once and sends one JSON command per line on stdin; each answer is one JSON
line on stdout. The host alternates its own measurement with each command, so both sides run the same
sizes and batch counts, rep by rep, in the same run. Every measurement uses fresh keys.

What each command measures, on LMCache's side (what its engine does around the GPU copy):
- `copy`: put-with-copy = `allocate` + a torch copy of the chunk into the MemoryObj (torch intra-op
  threads = cores) + `submit_put_task`; get-with-copy = `get_blocking` + a torch copy out.
- `book`: the same without the copies (allocate + submit_put_task; get_blocking + ref_count_down).
- `contains`: `contains(key)` over cached keys, in a random order.
- `walk`: `batched_contains` of a 1,000-key prefix (all hit).

Exit codes: 0 after `quit`; 3 when LMCache or torch cannot be imported (the host reports it).
"""

import json
import os
import random
import sys
import time

try:
    import torch
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
except ImportError as e:  # pragma: no cover - environment
    print(json.dumps({"error": f"LMCache 0.5.6 is not importable in {sys.executable}: {e}"}), flush=True)
    sys.exit(3)

MODEL = "bench/llama"
_SEED = iter(range(1, 1 << 40))


def kv_shape(size: int) -> tuple:
    """(layers, 2, 256 tokens, heads, 64) in bf16 making `size` bytes per chunk."""
    per_layer_head = 2 * 256 * 64 * 2
    units = size // per_layer_head
    assert units * per_layer_head == size and units >= 1, size
    heads = 4 if units % 4 == 0 and units >= 16 else 1
    return (units // heads, 2, 256, heads, 64)


def fresh_keys(n: int) -> list:
    base = next(_SEED) << 24
    return [CacheEngineKey(MODEL, 1, 0, base + i, torch.bfloat16) for i in range(n)]


class Backend:
    """One LocalCPUBackend sized for `n` chunks of `size` bytes."""

    def __init__(self, size: int, n: int):
        self.size = size
        if size % (2 * 256 * 64 * 2) == 0:
            layers, _, tokens, heads, head_size = kv_shape(size)
            self.shape = torch.Size([2, layers, tokens, heads * head_size])
        else:  # small objects for the index rows: 16 tokens of one 64-wide head, K and V
            assert size == 2 * 16 * 64 * 2, size
            self.shape = torch.Size([2, 1, 16, 64])
        cfg = LMCacheEngineConfig.from_dict({
            "chunk_size": 256, "local_cpu": True,
            "max_local_cpu_size": (n * size + (256 << 20)) / 2**30,
        })
        md = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
                             local_worker_id=0, kv_dtype=torch.bfloat16,
                             kv_shape=kv_shape(max(size, 2 * 256 * 64 * 2)),
                             role="worker")
        self.b = LocalCPUBackend(cfg, md, dst_device="cpu")

    def put(self, keys, src=None):
        for i, k in enumerate(keys):
            obj = self.b.allocate(self.shape, torch.bfloat16, MemoryFormat.KV_2LTD)
            if obj is None:
                raise RuntimeError(f"LocalCPUBackend could not allocate chunk {i} of {len(keys)}")
            if src is not None:
                obj.tensor.view(-1).view(torch.uint8).copy_(src[i * self.size:(i + 1) * self.size])
            self.b.submit_put_task(k, obj)
            obj.ref_count_down()  # the backend holds its own reference now

    def get(self, keys, dst=None):
        for i, k in enumerate(keys):
            obj = self.b.get_blocking(k)
            if obj is None:
                raise RuntimeError(f"LocalCPUBackend lost chunk {i} of {len(keys)}")
            if dst is not None:
                dst[i * self.size:(i + 1) * self.size].copy_(obj.tensor.view(-1).view(torch.uint8))
            obj.ref_count_down()

    def close(self):
        self.b.clear()
        self.b.close()


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


_CURRENT: list = []


def backend(size: int, n: int) -> Backend:
    """A new backend for each measurement (the previous one closed first), after a warm-up pass so no
    rep pays the first touch of LMCache's buffer (kvhost prefaults its arena). Reusing one backend
    across reps through `clear()` made every later rep 10-100x slower here."""
    while _CURRENT:
        _CURRENT.pop().close()
    b = Backend(size, n)
    _CURRENT.append(b)
    keys = fresh_keys(n)
    b.put(keys, torch.zeros(n * size, dtype=torch.uint8))
    b.get(keys)
    b.b.clear()
    return b


def copy_cmd(size: int, n: int) -> dict:
    b = backend(size, n)
    src = torch.full((n * size,), 0x5A, dtype=torch.uint8)
    dst = torch.zeros(n * size, dtype=torch.uint8)
    keys = fresh_keys(n)
    put = timed(lambda: b.put(keys, src))
    get = timed(lambda: b.get(keys, dst))
    if not torch.equal(src, dst):
        raise RuntimeError("LocalCPUBackend returned different bytes")
    return {"put_gbps": n * size / put / 1e9, "get_gbps": n * size / get / 1e9}


def book_cmd(size: int, n: int) -> dict:
    b = backend(size, n)
    keys = fresh_keys(n)
    put = timed(lambda: b.put(keys))
    get = timed(lambda: b.get(keys))
    return {"put_ns": put / n * 1e9, "get_ns": get / n * 1e9}


def contains_cmd(n: int, calls: int, walk: int) -> dict:
    size = 2 * 16 * 64 * 2
    b = backend(size, n)
    keys = fresh_keys(n)
    b.put(keys)
    order = list(range(n))
    random.Random(7).shuffle(order)
    probe = [keys[i] for i in order]

    def contains():
        hits = sum(1 for k in probe if b.b.contains(k))
        if hits != n:
            raise RuntimeError(f"contains found {hits} of {n}")

    c = timed(contains)
    starts = [order[i] % (n - walk) for i in range(calls)]

    def walks():
        for s in starts:
            if b.b.batched_contains(keys[s:s + walk]) != walk:
                raise RuntimeError("a prefix walk missed")

    w = timed(walks)
    return {"contains_mps": n / c / 1e6, "walk_us": w / calls * 1e6}


def main() -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    print(json.dumps({"ready": True, "torch_threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.get("op")
        try:
            if op == "quit":
                return 0
            if op == "copy":
                out = copy_cmd(cmd["size"], cmd["n"])
            elif op == "book":
                out = book_cmd(cmd["size"], cmd["n"])
            elif op == "contains":
                out = contains_cmd(cmd["n"], cmd["calls"], cmd["walk"])
            else:
                out = {"error": f"unknown command {op!r}"}
        except Exception as e:  # reported to the host, which fails the row
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
