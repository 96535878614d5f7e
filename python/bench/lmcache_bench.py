#!/usr/bin/env python3
"""kvhost against LMCache's own connectors, side by side, on the same LMCache L2 workload.

Run with the Python of an LMCache 0.5.6 environment that has ``kvhost`` installed::

    python lmcache_bench.py --plugin-dirs DIR1:DIR2 [--quick] [--json PATH]

What is compared (every pair in one process, alternating reps, fresh keys per rep):

a) kvhost ``fs`` behind LMCache's ``native_plugin`` L2 adapter (``kvhost.lmcache.NativeL2Client``)
   against LMCache's C++ ``fs_native`` L2 adapter, in directories under the same parent, buffered and
   with O_DIRECT; ``io_threads`` = ``num_workers``.
b) kvhost ``redis`` behind ``native_plugin`` against LMCache's C++ ``resp`` adapter, on one
   ``redis-server`` started here; ``pool_size`` = ``num_workers``.
c) ``kvhost.lmcache.StoragePlugin`` (the ``fs`` plugin) against LMCache's ``LocalDiskBackend``, both
   behind LMCache's (non-MP) ``StorageManager`` with ``local_cpu: false``; ``io_threads`` =
   ``disk_io_threads``. Stores are timed until every put has landed (kvhost: no put in flight;
   LocalDiskBackend: every key indexed, i.e. written), and only then are loads timed.

a) and b) are driven as LMCache's store and prefetch controllers drive an L2 adapter (submit a task,
poll the adapter's eventfd, consume it, pop or query the result), with the same LMCache L1 memory
objects for both systems. Rows: store (submit -> completion), lookup (lookup-and-lock), load.

Boundary: ``NativeL2Client`` over the ``noop`` plugin, timed per batch of submit_batch_* and
drain_completions straight on the client (1 key and 16 keys per batch).

Exit status: 0 when every judged row meets its target, 1 when one misses (listed at the end), 2 for
setup errors (kvhost or LMCache not importable, plugins not found, redis-server missing, ...).
Only the standard library, torch, lmcache, kvhost and ``lmcache_l2`` (next to this file) are used.
"""

from __future__ import annotations

import os
import sys
import warnings

# Before LMCache is imported: quiet logs, no GPU, and none of the FutureWarnings its imports raise.
os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
warnings.filterwarnings("ignore")

import argparse  # noqa: E402
import atexit  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import mmap  # noqa: E402
import platform  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SETUP_ERROR = 2
KIB, MIB = 1 << 10, 1 << 20
MODEL = "bench/llama"
_SEEDS = iter(range(1, 1 << 30))  # one per (system, rep): fresh keys, never a key written before


def fresh_seed() -> int:
    return next(_SEEDS)


class SetupError(Exception):
    """Something the benchmark needs is missing or misconfigured (exit status 2)."""


def die_setup(msg: str) -> None:
    print(f"lmcache_bench: setup error: {msg}", file=sys.stderr, flush=True)
    sys.exit(SETUP_ERROR)


# --------------------------------------------------------------------------------------------------
# Imports that can fail: report them as setup errors with what to do.

try:
    import torch
except ImportError as e:  # pragma: no cover - environment
    die_setup(f"torch is not importable in {sys.executable} ({e}); run this with LMCache's Python")

try:
    import lmcache_l2 as l2
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.event_manager import EventManager
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.platform.event_notifier import consume_fd
    from lmcache.v1.storage_backend.storage_manager import StorageManager
except ImportError as e:  # pragma: no cover - environment
    die_setup(
        f"LMCache (0.5.6) or lmcache_l2.py is not importable in {sys.executable} ({e}); run this with "
        f"the Python of an LMCache environment, with lmcache_l2.py next to this script ({HERE})"
    )

try:
    import kvhost
    import kvhost.lmcache
    from kvhost.lmcache import NativeL2Client
except ImportError as e:  # pragma: no cover - environment
    die_setup(
        f"kvhost is not importable in {sys.executable} ({e}). Install it into this interpreter, from "
        f"the kvhost repository: {sys.executable} -m pip install ./python"
    )


# --------------------------------------------------------------------------------------------------
# Cleanup: directories, redis-server, adapters; also on SIGTERM/SIGINT.


class Cleanup:
    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def add(self, what: str, fn: Callable[[], None]) -> Callable[[], None]:
        self._actions.append((what, fn))
        return fn

    def run_one(self, fn: Callable[[], None]) -> None:
        for i, (what, f) in enumerate(self._actions):
            if f == fn:  # bound methods are new objects at each access, but compare equal
                del self._actions[i]
                self._call(what, f)
                return

    def _call(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # cleanup must go on
            print(f"  (cleanup of {what} failed: {e})", file=sys.stderr)

    def run_all(self) -> None:
        while self._actions:
            what, fn = self._actions.pop()
            self._call(what, fn)


CLEANUP = Cleanup()
atexit.register(CLEANUP.run_all)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _on_signal)


# --------------------------------------------------------------------------------------------------
# Results.


@dataclass
class Row:
    section: str  # a, b, c, boundary
    name: str  # e.g. "a fs buffered 256KiB store"
    unit: str  # "GB/s", "Mkeys/s", "us/batch"
    kvhost: Optional[float] = None  # median
    lmcache: Optional[float] = None  # median
    ratio: Optional[float] = None  # median(kvhost) / median(lmcache)
    rep_ratio: Optional[float] = None  # median of per-rep ratios
    target: str = ""
    judged: bool = False
    verdict: str = ""  # PASS, MISS, info, ERROR, SKIP
    kvhost_reps: list = field(default_factory=list)
    lmcache_reps: list = field(default_factory=list)
    note: str = ""


ROWS: list[Row] = []
SETUP_PROBLEMS: list[str] = []


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio_row(section: str, name: str, unit: str, k: list, m: list, judged: bool, note: str = "") -> Row:
    km, mm = med(k), med(m)
    ratio = km / mm if km and mm else None
    per_rep = [a / b for a, b in zip(k, m) if a and b]
    row = Row(
        section,
        name,
        unit,
        km,
        mm,
        ratio,
        med(per_rep),
        ">= 1.00x" if judged else "info",
        judged,
        kvhost_reps=k,
        lmcache_reps=m,
        note=note,
    )
    if judged:
        row.verdict = "PASS" if ratio is not None and ratio >= 1.0 else "MISS"
    else:
        row.verdict = "info"
    ROWS.append(row)
    return row


def error_rows(section: str, names: list[str], why: str, verdict: str = "ERROR") -> None:
    for n in names:
        judged = verdict == "ERROR" and not n.endswith("lookup")
        ROWS.append(Row(section, n, "", target=">= 1.00x" if judged else "", judged=judged, verdict=verdict, note=why))


def size_name(nbytes: int) -> str:
    return f"{nbytes // MIB}MiB" if nbytes >= MIB else f"{nbytes // KIB}KiB"


# --------------------------------------------------------------------------------------------------
# Environment probes.


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding `path` (from /proc/self/mountinfo)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mnt = parts[4]
                sep = parts.index("-")
                fstype = parts[sep + 1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, fstype
    except (OSError, ValueError, IndexError):
        pass
    return kind


def odirect_works(directory: str) -> tuple[bool, str]:
    """Whether an aligned O_DIRECT write and read work in `directory`."""
    path = os.path.join(directory, f".odirect-probe-{os.getpid()}")
    buf = mmap.mmap(-1, 4096)  # page-aligned
    buf.write(b"x" * 4096)
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
        try:
            os.write(fd, buf)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.readv(fd, [buf])
        finally:
            os.close(fd)
        return True, "ok"
    except OSError as e:
        return False, str(e)
    finally:
        buf.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def settle() -> None:
    """Between timed phases: write back dirty pages (so one system's writeback does not land in the
    other's timing) and collect garbage. The page cache is not dropped (not available here)."""
    os.sync()
    gc.collect()


class Timed:
    """perf_counter around a block, with the garbage collector off."""

    def __enter__(self):
        gc.disable()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        gc.enable()
        return False


# --------------------------------------------------------------------------------------------------
# Redis.


class RedisServer:
    def __init__(self, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SetupError("redis-server is not installed (e.g. apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="kvhost-bench-redis-")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        CLEANUP.add(f"redis-server pid {self.proc.pid}", self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(f"redis-server exited with status {self.proc.returncode}")
            try:
                if self.command(b"PING").startswith(b"+PONG"):
                    self.version = self._version()
                    return
            except OSError:
                time.sleep(0.05)
        raise SetupError(f"redis-server did not answer on 127.0.0.1:{self.port} within {timeout} s")

    def command(self, cmd: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(cmd + b"\r\n")
            return s.recv(65536)

    def _version(self) -> str:
        info = self.command(b"INFO server").decode(errors="replace")
        for line in info.splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1].strip()
        return "?"

    def flushall(self) -> None:
        self.command(b"FLUSHALL")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Data: LMCache L1 memory objects, filled fast (content is irrelevant to the stores; equality of what
# is loaded against what was stored is what is checked).


def fill_fast(objs: list, seed: int) -> None:
    if not objs:
        return
    n = objs[0].tensor.numel() * objs[0].tensor.element_size()
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    for i, o in enumerate(objs):
        flat = o.tensor.view(torch.uint8).view(-1)
        flat.copy_(base)
        flat[:16].copy_(torch.tensor(list((seed * 1_000_003 + i).to_bytes(16, "little")), dtype=torch.uint8))


def same_bytes(dst: list, src: list) -> int:
    def equal(d, s) -> bool:
        return d is not None and torch.equal(d.tensor.view(torch.uint8), s.tensor.view(torch.uint8))

    return sum(1 for d, s in zip(dst, src) if equal(d, s))


# --------------------------------------------------------------------------------------------------
# Driving an L2 adapter the way LMCache's controllers do, with up to `inflight` tasks outstanding.


def drive(adapter, op: str, keys: list, objs: Optional[list], batch: int, inflight: int,
          timeout: float) -> tuple[float, int]:
    """Submit `keys` in batches (at most `inflight` tasks outstanding), wait for every completion.
    Returns (seconds, keys that succeeded)."""
    if op == "store":
        fd, submit = adapter.get_store_event_fd(), lambda k, o: adapter.submit_store_task(k, o)
    elif op == "lookup":
        fd, submit = adapter.get_lookup_and_lock_event_fd(), lambda k, o: adapter.submit_lookup_and_lock_task(k, {})
    elif op == "load":
        fd, submit = adapter.get_load_event_fd(), lambda k, o: adapter.submit_load_task(k, o)
    else:
        raise ValueError(op)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    n = len(keys)
    pending: dict[int, int] = {}  # task id -> keys in it
    good = 0
    i = 0
    with Timed() as t:
        deadline = time.monotonic() + timeout
        while i < n or pending:
            while i < n and len(pending) < inflight:
                j = min(n, i + batch)
                tid = submit(keys[i:j], objs[i:j] if objs is not None else None)
                pending[tid] = j - i
                i = j
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                raise TimeoutError(f"{op}: {len(pending)} task(s) not completed within {timeout} s")
            consume_fd(fd)
            if op == "store":
                for tid, res in adapter.pop_completed_store_tasks().items():
                    cnt = pending.pop(tid, None)
                    if cnt is not None and res.is_successful():
                        good += cnt
            else:
                query = adapter.query_lookup_and_lock_result if op == "lookup" else adapter.query_load_result
                for tid in list(pending):
                    bm = query(tid)
                    if bm is not None:
                        pending.pop(tid)
                        good += bm.popcount()
    return t.seconds, good


# --------------------------------------------------------------------------------------------------
# Settings.


@dataclass
class Settings:
    plugin_dirs: list
    sizes: list
    total_bytes: int
    reps: int
    batch: int
    inflight: int
    workers: int
    parent: str
    timeout: float
    sections: str
    boundary_iters: int
    boundary_reps: int
    quick: bool


def kvhost_chain(name: str, module: str, cls: str, options: dict, s: Settings) -> dict:
    extra = {f"storage_plugin.{name}.module_path": module, f"storage_plugin.{name}.class_name": cls}
    extra.update({f"storage_plugin.{name}.{k}": v for k, v in options.items()})
    return {"chunk_size": 256, "local_cpu": False, "storage_plugins": [name], "extra_config": extra}


def native_plugin_spec(chain: dict, s: Settings) -> dict:
    return {"type": "native_plugin", "module_path": "kvhost.lmcache", "class_name": "NativeL2Client",
            "adapter_params": {**chain, "plugin_dirs": list(s.plugin_dirs)}}


def build(spec: dict, l1) -> Any:
    try:
        return l2.build_adapter(spec, l1)
    except (kvhost.PluginLoadError, kvhost.ConfigError) as e:
        raise SetupError(f"kvhost could not load its plugin (check --plugin-dirs): {e}") from e


# --------------------------------------------------------------------------------------------------
# a) and b): MP L2 adapters.


def mp_pair(section: str, label: str, size: int, s: Settings, l1, src: list, dst: list,
            make: dict[str, Callable[[], Any]], after_rep: Optional[Callable[[], None]] = None) -> None:
    names = [f"{section} {label} {size_name(size)} {op}" for op in ("store", "lookup", "load")]
    n = len(src)
    adapters: dict[str, Any] = {}
    try:
        for system in ("kvhost", "lmcache"):
            adapters[system] = make[system]()
            CLEANUP.add(f"{system} adapter", adapters[system].close)
        res = {sys_: {"store": [], "lookup": [], "load": []} for sys_ in adapters}
        nbytes = n * size
        for rep in range(s.reps):
            order = ("kvhost", "lmcache") if rep % 2 == 0 else ("lmcache", "kvhost")
            stored_keys = {}
            for system in order:
                a = adapters[system]
                keys = l2.object_keys(n, fresh_seed())
                stored_keys[system] = keys
                for o in dst:
                    o.tensor.zero_()
                settle()
                t_store, stored = drive(a, "store", keys, src, s.batch, s.inflight, s.timeout)
                if stored != n:
                    raise RuntimeError(f"{system} stored {stored} of {n} chunks")
                settle()
                t_lookup, found = drive(a, "lookup", keys, None, s.batch, s.inflight, s.timeout)
                t_load, loaded = drive(a, "load", keys, dst, s.batch, s.inflight, s.timeout)
                a.submit_unlock(keys)
                if found != n or loaded != n:
                    raise RuntimeError(f"{system}: lookup found {found}, load loaded {loaded} of {n}")
                equal = same_bytes(dst, src)
                if equal != n:
                    raise RuntimeError(f"{system}: {n - equal} of {n} loaded chunks differ from what was stored")
                res[system]["store"].append(nbytes / t_store / 1e9)
                res[system]["lookup"].append(n / t_lookup / 1e6)
                res[system]["load"].append(nbytes / t_load / 1e9)
                print(f"    rep {rep} {system:7s} store {nbytes / t_store / 1e9:6.2f} GB/s  "
                      f"lookup {n / t_lookup / 1e6:6.3f} Mkeys/s  load {nbytes / t_load / 1e9:6.2f} GB/s", flush=True)
            # Both systems' chunks go at the end of the rep (LMCache's eviction path), so neither
            # system's timed phases follow the other's deletes within a rep.
            for system in order:
                adapters[system].delete(stored_keys[system])
            if after_rep:
                after_rep()
        ratio_row(section, names[0], "GB/s", res["kvhost"]["store"], res["lmcache"]["store"], True)
        ratio_row(section, names[1], "Mkeys/s", res["kvhost"]["lookup"], res["lmcache"]["lookup"], False)
        ratio_row(section, names[2], "GB/s", res["kvhost"]["load"], res["lmcache"]["load"], True)
    finally:
        for a in adapters.values():
            CLEANUP.run_one(a.close)


def section_a(s: Settings, l1, size: int, src: list, dst: list, odirect_ok: bool, odirect_why: str) -> None:
    modes = [("buffered", False), ("O_DIRECT", True)]
    for mode, direct in modes:
        label = f"fs {mode}"
        names = [f"a {label} {size_name(size)} {op}" for op in ("store", "lookup", "load")]
        if direct and not odirect_ok:
            error_rows("a", names, f"O_DIRECT not usable under {s.parent}: {odirect_why}", "SKIP")
            continue
        root = tempfile.mkdtemp(prefix="kvhost-bench-a-", dir=s.parent)
        rm = CLEANUP.add(f"dir {root}", lambda r=root: shutil.rmtree(r, ignore_errors=True))
        print(f"  a) {label} {size_name(size)}: kvhost fs io_threads={s.workers} vs fs_native "
              f"num_workers={s.workers} in {root}", flush=True)
        fs_opts = {"path": os.path.join(root, "kvhost"), "io_threads": s.workers, "o_direct": direct,
                   "max_size_gib": max(1.0, 4 * len(src) * size / 2**30)}
        make = {
            "kvhost": lambda: build(native_plugin_spec(kvhost_chain("fs", "kvhost_fs", "fs", fs_opts, s), s), l1),
            "lmcache": lambda: build({"type": "fs_native", "base_path": os.path.join(root, "fs_native"),
                                      "num_workers": s.workers, "use_odirect": direct}, l1),
        }
        try:
            mp_pair("a", label, size, s, l1, src, dst, make)
        except SetupError:
            raise
        except Exception as e:
            traceback.print_exc()
            error_rows("a", names, f"{type(e).__name__}: {e}")
        finally:
            CLEANUP.run_one(rm)


def section_b(s: Settings, l1, size: int, src: list, dst: list, redis: Optional[RedisServer], why: str) -> None:
    names = [f"b redis {size_name(size)} {op}" for op in ("store", "lookup", "load")]
    if redis is None:
        error_rows("b", names, why, "SKIP")
        return
    print(f"  b) redis {size_name(size)}: kvhost redis pool_size={s.workers} vs resp num_workers={s.workers} "
          f"on 127.0.0.1:{redis.port}", flush=True)
    opts = {"url": f"redis://127.0.0.1:{redis.port}", "pool_size": s.workers}
    make = {
        "kvhost": lambda: build(native_plugin_spec(kvhost_chain("redis", "kvhost_redis", "redis", opts, s), s), l1),
        "lmcache": lambda: build({"type": "resp", "host": "127.0.0.1", "port": redis.port,
                                  "num_workers": s.workers}, l1),
    }
    try:
        mp_pair("b", "redis", size, s, l1, src, dst, make, after_rep=redis.flushall)
    except SetupError:
        raise
    except Exception as e:
        traceback.print_exc()
        error_rows("b", names, f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------------
# c) In-process: StoragePlugin vs LocalDiskBackend through LMCache's StorageManager.


def kv_shape(size: int) -> tuple:
    """(layers, 2, 256 tokens, heads, 64) in bf16 making `size` bytes per chunk."""
    per_layer_head = 2 * 256 * 64 * 2  # K and V, 256 tokens, head size 64, bf16
    units = size // per_layer_head
    assert units * per_layer_head == size and units >= 1, size
    heads = 4 if units % 4 == 0 and units >= 16 else 1
    return (units // heads, 2, 256, heads, 64)


def storage_manager(extra: dict, size: int, n: int, local_disk: Optional[str] = None,
                    disk_gb: float = 0.0, plugins: Optional[list] = None) -> tuple:
    cfg = {"chunk_size": 256, "local_cpu": False,
           # the allocator pool: the source chunks, the loaded ones, and room to spare
           "max_local_cpu_size": (2 * n * size + 128 * MIB) / 2**30,
           "extra_config": extra}
    if plugins:
        cfg["storage_plugins"] = plugins
    if local_disk:
        cfg["local_disk"] = f"file://{local_disk}/"
        cfg["max_local_disk_size"] = disk_gb
    md = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                         kv_dtype=torch.bfloat16, kv_shape=kv_shape(size), role="worker")
    sm = StorageManager(LMCacheEngineConfig.from_dict(cfg), md, EventManager())
    return sm, md


def wait_all(state: Callable[[Any], str], keys: list, timeout: float) -> None:
    """Poll `state` key by key (in submission order) until every put has landed: "done", "pending", or
    "refused" (the backend dropped the put: fail at once rather than at the timeout)."""
    deadline = time.monotonic() + timeout
    i = 0
    while i < len(keys):
        st = state(keys[i])
        if st == "done":
            i += 1
            continue
        if st == "refused":
            raise RuntimeError(f"the backend dropped the put of {keys[i]} (neither stored nor in flight)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(keys) - i} of {len(keys)} puts did not land within {timeout} s")
        time.sleep(0.0002)


def section_c(s: Settings, odirect_ok: bool, odirect_why: str) -> None:
    modes = [("buffered", False), ("O_DIRECT", True)]
    for size in s.sizes:
        n = max(1, s.total_bytes // size)
        for mode, direct in modes:
            label = f"inproc fs {mode}"
            names = [f"c {label} {size_name(size)} {op}" for op in ("store", "lookup", "load")]
            if direct and not odirect_ok:
                error_rows("c", names, f"O_DIRECT not usable under {s.parent}: {odirect_why}", "SKIP")
                continue
            root = tempfile.mkdtemp(prefix="kvhost-bench-c-", dir=s.parent)
            rm = CLEANUP.add(f"dir {root}", lambda r=root: shutil.rmtree(r, ignore_errors=True))
            print(f"  c) {label} {size_name(size)}: StoragePlugin(fs io_threads={s.workers}) vs LocalDiskBackend "
                  f"(disk_io_threads={s.workers}) in {root}", flush=True)
            sms: dict[str, Any] = {}
            try:
                chain = kvhost_chain("fs", "kvhost_fs", "fs", {
                    "path": os.path.join(root, "kvhost"), "io_threads": s.workers, "o_direct": direct,
                    "max_size_gib": max(1.0, 4 * n * size / 2**30)}, s)
                sms["kvhost"] = storage_manager({
                    "storage_plugin.kv.module_path": "kvhost.lmcache",
                    "storage_plugin.kv.class_name": "StoragePlugin",
                    "storage_plugin.kv.kvhost": chain,
                    "storage_plugin.kv.plugin_dirs": list(s.plugin_dirs)}, size, n, plugins=["kv"])[0]
                CLEANUP.add("kvhost StorageManager", sms["kvhost"].close)
                if "kv" not in sms["kvhost"].storage_backends:
                    # LMCache's launcher only logs a plugin's constructor error: construct it to see it.
                    try:
                        kvhost.lmcache.StoragePlugin(config=LMCacheEngineConfig.from_dict({
                            "chunk_size": 256, "local_cpu": False, "storage_plugins": ["kv"],
                            "extra_config": {"storage_plugin.kv.module_path": "kvhost.lmcache",
                                             "storage_plugin.kv.class_name": "StoragePlugin",
                                             "storage_plugin.kv.kvhost": chain,
                                             "storage_plugin.kv.plugin_dirs": list(s.plugin_dirs)}}))
                    except Exception as e:
                        raise SetupError(f"kvhost.lmcache.StoragePlugin did not start: {e}") from e
                    raise SetupError("kvhost.lmcache.StoragePlugin is not among the StorageManager's backends")
                disk_dir = os.path.join(root, "local_disk")
                os.makedirs(disk_dir, exist_ok=True)
                # LocalDiskBackend.remove() does not give back its capacity accounting (current_cache_size),
                # so the capacity must cover every rep, not one.
                sms["lmcache"] = storage_manager({"use_odirect": direct, "disk_io_threads": s.workers}, size, n,
                                                 local_disk=disk_dir,
                                                 disk_gb=(s.reps + 2) * n * size / 2**30 + 0.1)[0]
                CLEANUP.add("LocalDisk StorageManager", sms["lmcache"].close)
                backend = {"kvhost": sms["kvhost"].storage_backends["kv"],
                           "lmcache": sms["lmcache"].storage_backends["LocalDiskBackend"]}
                location = {"kvhost": "kv", "lmcache": "LocalDiskBackend"}
                def kv_state(k, b=backend["kvhost"]):
                    # A kvhost put is in flight from submit until its plugin completed.
                    return "pending" if b.exists_in_put_tasks(k) else "done"

                def disk_state(k, b=backend["lmcache"]):
                    # LocalDiskBackend registers a put task before submit returns; the key is indexed once
                    # the file is written. Neither: the put was dropped (e.g. no capacity).
                    if b.exists_in_put_tasks(k):
                        return "pending"
                    return "done" if b.contains(k) else "refused"

                landed = {"kvhost": kv_state, "lmcache": disk_state}
                srcs = {}
                for system, sm in sms.items():
                    layers, _, _, heads, head_size = kv_shape(size)
                    objs = sm.batched_allocate(torch.Size([2, layers, 256, heads * head_size]), torch.bfloat16, n,
                                               MemoryFormat.KV_2LTD)
                    if objs is None or len(objs) != n:
                        raise RuntimeError(f"{system}: could not allocate {n} source chunks")
                    fill_fast(objs, seed=size)
                    srcs[system] = objs
                res = {sys_: {"store": [], "lookup": [], "load": []} for sys_ in sms}
                nbytes = n * size
                for rep in range(s.reps):
                    order = ("kvhost", "lmcache") if rep % 2 == 0 else ("lmcache", "kvhost")
                    stored_keys = {}
                    for system in order:
                        sm, src, b, loc = sms[system], srcs[system], backend[system], location[system]
                        base = fresh_seed() << 24
                        keys = [CacheEngineKey(MODEL, 1, 0, base + i, torch.bfloat16) for i in range(n)]
                        stored_keys[system] = keys
                        for o in src:
                            o.ref_count_up()  # batched_put drops one reference: keep ours
                        settle()
                        with Timed() as t:
                            for i in range(0, n, s.batch):
                                sm.batched_put(keys[i:i + s.batch], src[i:i + s.batch])
                            wait_all(landed[system], keys, s.timeout)
                        t_store = t.seconds
                        settle()
                        got: list = []
                        t_lookup = 0.0
                        with Timed() as t:
                            for i in range(0, n, s.batch):
                                ks = keys[i:i + s.batch]
                                t0 = time.perf_counter()
                                mapping = sm.get_block_mapping([(k, j * 256, (j + 1) * 256) for j, k in enumerate(ks)])
                                t_lookup += time.perf_counter() - t0
                                hit = [k for k, _, _ in mapping.get(loc, [])]
                                got.extend(sm.batched_get(hit, location=loc) if hit else [])
                        t_load = t.seconds - t_lookup
                        equal = same_bytes(got, src)
                        for o in got:
                            if o is not None:
                                o.ref_count_down()
                        if len(got) != n or equal != n:
                            raise RuntimeError(f"{system}: loaded {len(got)} chunks, {equal} equal to the {n} stored")
                        res[system]["store"].append(nbytes / t_store / 1e9)
                        res[system]["lookup"].append(n / t_lookup / 1e6)
                        res[system]["load"].append(nbytes / t_load / 1e9)
                        print(f"    rep {rep} {system:7s} store {nbytes / t_store / 1e9:6.2f} GB/s  "
                              f"lookup {n / t_lookup / 1e6:6.3f} Mkeys/s  load {nbytes / t_load / 1e9:6.2f} GB/s",
                              flush=True)
                    for system in order:
                        sms[system].batched_remove(stored_keys[system], locations=[location[system]])
                ratio_row("c", names[0], "GB/s", res["kvhost"]["store"], res["lmcache"]["store"], True,
                          "until every put landed")
                ratio_row("c", names[1], "Mkeys/s", res["kvhost"]["lookup"], res["lmcache"]["lookup"], False,
                          "get_block_mapping")
                ratio_row("c", names[2], "GB/s", res["kvhost"]["load"], res["lmcache"]["load"], True,
                          "batched_get(location)")
                for objs in srcs.values():
                    for o in objs:
                        o.ref_count_down()
            except SetupError:
                raise
            except Exception as e:
                traceback.print_exc()
                error_rows("c", names, f"{type(e).__name__}: {e}")
            finally:
                for sm in sms.values():
                    CLEANUP.run_one(sm.close)
                CLEANUP.run_one(rm)


# --------------------------------------------------------------------------------------------------
# Boundary: NativeL2Client over `noop`, per batch of submit + drain.


class _StubClient:
    """The same calls into pure Python that does nothing: the loop's own floor, for reference."""

    def __init__(self) -> None:
        self._next = 0
        self._done: list = []

    def _submit(self, *args) -> int:
        self._next += 1
        self._done.append((self._next, True, "", None))
        return self._next

    submit_batch_exists = submit_batch_get = submit_batch_set = _submit

    def drain_completions(self) -> list:
        out, self._done = self._done, []
        return out

    def event_fd(self) -> int:
        return -1


def boundary_loop(client, op: str, keys: list, bufs: list, iters: int, timeout: float) -> float:
    """Seconds per batch of `op` + drain_completions until its completion is back."""
    fd = client.event_fd()
    poller = None
    if fd >= 0:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
    if op == "exists":
        submit = lambda: client.submit_batch_exists(keys)  # noqa: E731
    elif op == "get":
        submit = lambda: client.submit_batch_get(keys, bufs)  # noqa: E731
    else:
        submit = lambda: client.submit_batch_set(keys, bufs)  # noqa: E731
    drain = client.drain_completions
    deadline = time.monotonic() + timeout
    with Timed() as t:
        for _ in range(iters):
            fid = submit()
            got = drain()
            while not got or got[-1][0] != fid:
                # Asynchronous completion: wait for the eventfd (the noop plugin answers at once, so
                # this is not expected to run).
                if poller is None or not poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                    raise TimeoutError(f"boundary {op}: no completion within {timeout} s")
                got = drain()
    return t.seconds / iters


def section_boundary(s: Settings) -> None:
    cfg = kvhost_chain("noop", "kvhost_noop", "noop", {}, s)
    try:
        client = NativeL2Client(**cfg, plugin_dirs=list(s.plugin_dirs))
    except (kvhost.PluginLoadError, kvhost.ConfigError) as e:
        raise SetupError(f"kvhost could not load the noop plugin (check --plugin-dirs): {e}") from e
    CLEANUP.add("noop client", client.close)
    stub = _StubClient()
    print(f"  boundary: NativeL2Client(noop), {s.boundary_iters} batches x {s.boundary_reps} reps per row", flush=True)
    try:
        area = bytearray(16 * 4096)
        mv = memoryview(area)
        for nkeys in (1, 16):
            keys = [f"{MODEL.replace('/', '-')}@00000000@0@{i:032x}" for i in range(nkeys)]
            bufs = [mv[i * 4096:(i + 1) * 4096] for i in range(nkeys)]
            for op in ("exists", "get", "set"):
                boundary_loop(client, op, keys, bufs, min(2000, s.boundary_iters), s.timeout)  # warm up
                reps_k, reps_stub = [], []
                for _ in range(s.boundary_reps):
                    reps_k.append(boundary_loop(client, op, keys, bufs, s.boundary_iters, s.timeout) * 1e6)
                    reps_stub.append(boundary_loop(stub, op, keys, bufs, s.boundary_iters, s.timeout) * 1e6)
                us = med(reps_k)
                judged = nkeys == 1
                row = Row("boundary", f"boundary {op} {nkeys} key{'s' if nkeys > 1 else ''}", "us/batch",
                          kvhost=us, target="<= 5 us/batch" if judged else "info (<= 5 us/batch)", judged=judged,
                          kvhost_reps=reps_k, lmcache_reps=reps_stub,
                          note=f"{us / nkeys:.2f} us/key; Python loop floor {med(reps_stub):.2f} us/batch")
                row.verdict = ("PASS" if us <= 5.0 else "MISS") if judged else "info"
                ROWS.append(row)
                print(f"    {op:6s} {nkeys:2d} key(s): {us:6.2f} us/batch  {us / nkeys:6.2f} us/key  "
                      f"(Python stub client: {med(reps_stub):.2f} us/batch)", flush=True)
    finally:
        CLEANUP.run_one(client.close)


# --------------------------------------------------------------------------------------------------
# Report.


def fmt(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


SECTION_ORDER = {"a": 0, "b": 1, "c": 2, "boundary": 3}


def ordered_rows() -> list:
    return sorted(ROWS, key=lambda r: SECTION_ORDER.get(r.section, 9))  # stable: run order within a section


def print_table() -> None:
    rows = ordered_rows()
    head = ["row", "kvhost", "LMCache", "unit", "ratio", "rep-ratio", "target", "verdict"]
    lines = []
    for r in rows:
        if r.section == "boundary":
            lines.append([r.name, fmt(r.kvhost), "-", r.unit, "-", "-", r.target, r.verdict])
        else:
            d = 3 if r.unit == "Mkeys/s" else 2
            lines.append([r.name, fmt(r.kvhost, d), fmt(r.lmcache, d), r.unit,
                          "-" if r.ratio is None else f"{r.ratio:.3f}x",
                          "-" if r.rep_ratio is None else f"{r.rep_ratio:.3f}x", r.target, r.verdict])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    last = None
    for r, line in zip(rows, lines):
        if last is not None and r.section != last:
            print("-+-".join("-" * w for w in widths))
        last = r.section
        print(" | ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    notes = [r for r in rows if r.note and r.verdict in ("ERROR", "SKIP")]
    for r in notes:
        print(f"  {r.name}: {r.verdict}: {r.note}")
    for r in rows:
        if r.section == "boundary":
            print(f"  {r.name}: {r.note}")


def parse_args(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plugin-dirs", default=os.environ.get("KVHOST_PLUGIN_DIRS", ""),
                   help="directories holding the kvhost plugin libraries, ':'-separated")
    p.add_argument("--quick", action="store_true", help="~32 MiB per rep, 3 reps (CI smoke test)")
    p.add_argument("--json", metavar="PATH", help="write every row (with per-rep values) to PATH")
    p.add_argument("--reps", type=int, help="reps per row (default 5, --quick 3; at least 1)")
    p.add_argument("--total-mib", type=int, help="bytes per rep per system, MiB (default 256, --quick 32)")
    p.add_argument("--batch", type=int, default=16, help="keys per submitted task (default 16)")
    p.add_argument("--inflight", type=int, default=4, help="tasks outstanding at once per adapter (default 4)")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 2, 8),
                   help="I/O threads of every system (fs io_threads = fs_native num_workers = redis pool_size = "
                        "resp num_workers = disk_io_threads; default: cores)")
    p.add_argument("--sizes", default="256K,4M", help="chunk sizes (default 256K,4M)")
    p.add_argument("--dir", default=None, help="parent of the benchmark directories (default /var/tmp)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any one wait may take (default 120)")
    p.add_argument("--sections", default="a,b,c,boundary", help="which sections to run (default all)")
    p.add_argument("--boundary-iters", type=int, help="batches per boundary rep (default 20000, --quick 5000)")
    a = p.parse_args(argv)
    sizes = []
    for tok in a.sizes.split(","):
        tok = tok.strip().upper().removesuffix("IB").removesuffix("B")
        mult = {"K": KIB, "M": MIB}.get(tok[-1:], 1)
        sizes.append(int(tok[:-1] if mult > 1 else tok) * mult)
    parent = a.dir or ("/var/tmp" if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK)
                       else tempfile.gettempdir())
    return Settings(
        plugin_dirs=[d for d in a.plugin_dirs.split(os.pathsep) if d],
        sizes=sizes,
        total_bytes=(a.total_mib or (32 if a.quick else 256)) * MIB,
        reps=max(1, a.reps or (3 if a.quick else 5)),
        batch=max(1, a.batch),
        inflight=max(1, a.inflight),
        workers=max(1, a.workers),
        parent=parent,
        timeout=a.timeout,
        sections=a.sections,
        boundary_iters=a.boundary_iters or (5000 if a.quick else 20000),
        boundary_reps=3 if a.quick else 5,
        quick=a.quick,
    ), a.json


def main(argv=None) -> int:
    s, json_path = parse_args(argv)
    sections = {x.strip() for x in s.sections.split(",")}
    for d in s.plugin_dirs:
        if not os.path.isdir(d):
            die_setup(f"--plugin-dirs: {d} is not a directory")
    if not os.path.isdir(s.parent) or not os.access(s.parent, os.W_OK):
        die_setup(f"{s.parent} is not a writable directory (--dir)")
    odirect_ok, odirect_why = odirect_works(s.parent)
    tmp = tempfile.gettempdir()
    tmp_direct = odirect_works(tmp)[0] if os.path.realpath(tmp) != os.path.realpath(s.parent) else odirect_ok

    try:
        import importlib.metadata as md
        lmc_version = md.version("lmcache")
    except Exception:
        lmc_version = "?"
    redis, redis_why = None, ""
    if "b" in sections:
        try:
            redis = RedisServer()
        except SetupError as e:
            redis_why = str(e)
            SETUP_PROBLEMS.append(f"b) {e}")

    print("kvhost vs LMCache's own connectors: the same LMCache L2 workload, side by side")
    print(f"  kvhost {kvhost.__version__} ({os.path.dirname(kvhost.__file__)}), LMCache {lmc_version}, "
          f"torch {torch.__version__}, Python {platform.python_version()} ({sys.executable})")
    print(f"  machine: {os.cpu_count()} cores, {platform.platform()}")
    print("  a) kvhost fs via native_plugin (NativeL2Client)  vs  LMCache fs_native (C++), buffered and O_DIRECT")
    print("  b) kvhost redis via native_plugin                 vs  LMCache resp (C++), same redis-server")
    print("  c) kvhost.lmcache.StoragePlugin (fs)              vs  LMCache LocalDiskBackend, via StorageManager "
          "(local_cpu false)")
    print("  boundary: NativeL2Client over the noop plugin, submit_batch_* + drain_completions per batch")
    print(f"  sizes {', '.join(size_name(x) for x in s.sizes)}; {s.total_bytes // MIB} MiB per rep per system; "
          f"{s.reps} reps, alternating which system goes first; medians")
    print(f"  batch {s.batch} keys per task, {s.inflight} tasks in flight (a, b); c: {s.batch} keys per "
          f"batched_put / get_block_mapping + batched_get")
    print(f"  threads: {s.workers} everywhere (fs io_threads = fs_native num_workers = LocalDisk disk_io_threads; "
          f"redis pool_size = resp num_workers)")
    direct_note = "works" if odirect_ok else "NOT usable: " + odirect_why
    print(f"  directories under {s.parent} ({fs_type(s.parent)}; O_DIRECT {direct_note}); "
          f"{tmp} is {fs_type(tmp)} (O_DIRECT {'works' if tmp_direct else 'not usable'})")
    if redis:
        print(f"  redis: redis-server {redis.version} on 127.0.0.1:{redis.port} (no persistence)")
    else:
        print(f"  redis: {redis_why or 'not run'}")
    print(f"  plugin dirs: {':'.join(s.plugin_dirs) or '(kvhost package only)'}")
    print("  timing: perf_counter around the adapter calls, including waiting for completion; os.sync() "
          "and gc between phases (page cache not dropped); GB = 1e9 bytes")
    print(flush=True)

    interrupted = False
    try:
        if "boundary" in sections:
            # First, while the process has no other threads and no I/O is in flight.
            settle()
            section_boundary(s)
        l1 = None
        if sections & {"a", "b"}:
            need = max(max(1, s.total_bytes // z) * z for z in s.sizes)
            l1 = l2.l1_manager(2 * need + 64 * MIB)
            CLEANUP.add("L1 memory", l1.close)
        for size in s.sizes:
            if not sections & {"a", "b"}:
                break
            n = max(1, s.total_bytes // size)
            src = l2.allocate(l1, size, n)
            dst = l2.allocate(l1, size, n)
            fill_fast(src, seed=size)
            if "a" in sections:
                section_a(s, l1, size, src, dst, odirect_ok, odirect_why)
            if "b" in sections:
                section_b(s, l1, size, src, dst, redis, redis_why)
            for o in src + dst:
                o.ref_count_down()
        if "c" in sections:
            section_c(s, odirect_ok, odirect_why)
    except SetupError as e:
        SETUP_PROBLEMS.append(str(e))
    except KeyboardInterrupt as e:
        interrupted = True
        print(f"\ninterrupted ({e}); cleaning up", file=sys.stderr)
    finally:
        CLEANUP.run_all()

    if ROWS:
        print_table()
    misses = [r for r in ordered_rows() if r.judged and r.verdict != "PASS"]
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"settings": asdict(s), "lmcache_version": lmc_version, "kvhost_version": kvhost.__version__,
                       "setup_problems": SETUP_PROBLEMS, "rows": [asdict(r) for r in ordered_rows()],
                       "misses": [r.name for r in misses]}, f, indent=1)
        print(f"\nrows written to {json_path}")
    if SETUP_PROBLEMS or interrupted:
        for p in SETUP_PROBLEMS:
            print(f"setup error: {p}", file=sys.stderr)
        return SETUP_ERROR
    if misses:
        print(f"\n{len(misses)} judged row(s) missed their target:")
        for r in misses:
            extra = f" ({r.note})" if r.note else ""
            shown = f"{fmt(r.kvhost)} us/batch" if r.section == "boundary" else (
                "-" if r.ratio is None else f"{r.ratio:.3f}x")
            print(f"  {r.name}: {shown} vs target {r.target}: {r.verdict}{extra}")
        return 1
    print("\nevery judged row met its target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
