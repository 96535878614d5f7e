"""SGLang HiCache storage backend over a kvhost chain of native plugins.

:class:`HiCacheStorage` is an L3 backend for SGLang's hierarchical cache (HiCache), loaded through
SGLang's ``dynamic`` storage backend. Pages move between SGLang's host KV pool and the plugins with
no copy: the plugins read and write the pool's tensor memory directly. Start the server with::

    --enable-hierarchical-cache
    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name":"kvhost","module_path":"kvhost.sglang","class_name":"HiCacheStorage","interface_v1":1,"kvhost_config":"/path/kvhost.yaml"}'

Keys of the extra config read here (SGLang itself needs ``backend_name``, ``module_path`` and
``class_name``, and reads ``interface_v1``):

- ``kvhost_config``: path of a kvhost/LMCache-style YAML config (the chain's plugins and options); or
- ``kvhost``: the same config inline, as a JSON object, e.g.
  ``{"storage_plugins":["fs"],"extra_config":{"storage_plugin.fs.module_path":"kvhost_fs",
  "storage_plugin.fs.class_name":"fs","storage_plugin.fs.path":"/mnt/nvme/kv-{tp_rank}"}}``.
  Exactly one of the two. In both, ``{tp_rank}``, ``{tp_size}``, ``{pp_rank}``, ``{pp_size}``,
  ``{dp_rank}`` and ``{attn_cp_rank}`` are replaced by this rank's values (in the path of
  ``kvhost_config``, and in every string of ``kvhost``; not inside the YAML file): each rank is a
  process of its own, and a per-process plugin such as ``fs`` needs a directory of its own, e.g.
  ``/mnt/nvme/kv-tp{tp_rank}`` (add ``-pp{pp_rank}`` with pipeline parallelism and ``-dp{dp_rank}``
  with DP attention, where TP ranks are counted within each DP group).
- ``kvhost_plugin_dirs`` (optional): a list of directories (or one ``os.pathsep``-separated string)
  where the plugin ``.so`` files are, searched before the config's own ``plugin_dir``.
- ``interface_v1`` (SGLang's, strongly recommended): ``1`` selects the zero-copy page path
  (``batch_set_v1``/``batch_get_v1``). Without it SGLang copies each page into a flat tensor and calls
  the legacy ``batch_set``/``batch_get``; that works too, under keys of its own.
- ``kvhost_skip_existing`` (optional, default ``true``): before a write, ask the chain which parts it
  already holds and store only the others (keys are content hashes, so a held part is the same bytes).

The chain is built without kvhost's CPU hot cache: SGLang's host pool already is the CPU tier.

Keys. SGLang names a page by a 64-hex-digit SHA-256 chained over the token ids. Each page is stored as
one kvhost chunk per pointer that the host pool reports for it (``get_page_buffer_meta``: K and V for
MHA ``page_first``, K and V of every layer for ``layer_first``, one for MLA), under the key
``{model}@{tp_size}@{tp_rank}@{hash64:x}@{dtype}@layout%{layout}[@pp%R.S][@cp%R.S][@dcp%R.S.P]@hash%{page hash}@part%{j}``.
MLA pages are the same on every TP rank, so their keys say ``1@0`` instead of the TP size and rank
(as SGLang's own ``HiCacheFile`` shares them); for them, use a plugin that every rank reaches (e.g.
``redis``): only one rank writes MLA pages. The legacy methods store a page's flat tensor under
``part%flat``.

Failures on the data path (a plugin error, a timeout, a closed chain) are logged and reported as
``False``/``0``/``None``; they are never raised into SGLang's storage threads. A bad config raises
:class:`kvhost.ConfigError` or :class:`kvhost.PluginLoadError` at construction (or, for a host pool
without zero-copy page buffers under ``interface_v1``, at ``register_mem_pool_host``, which fails
SGLang's attach).

Timeouts: a plugin that does not complete within the chain's ``blocking_timeout_secs`` (default 10 s)
fails the call, but keeps the pool memory it was lent until it completes: a late load still writes
into the pages, and a late store still reads them, after SGLang has been told the call failed. Keep
the timeout well above the plugins' worst latency.

Not supported: the v2 interface (``batch_*_v2``; hybrid models with Mamba/SWA/indexer side pools) and
head splitting across heterogeneous TP sizes (``tp_lcm_size``): pages are then keyed per TP rank as
usual, so ranks of a different TP size do not share them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from bisect import bisect_right
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage as _SglangHiCacheStorage
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig, HiCacheStorageExtraInfo

import kvhost

__all__ = ["HiCacheStorage"]

logger = logging.getLogger(__name__)

_HEX = re.compile(r"[0-9a-f]+\Z")


def _escape(text: str) -> str:
    """A key field value without `@` (the field separator) or NUL; injective."""
    return text.replace("%", "%25").replace("@", "%40").replace("\0", "%00")


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def _substitute(obj: Any, values: Dict[str, str]) -> Any:
    """`{tp_rank}` and friends replaced in every string of a JSON-like value."""
    if isinstance(obj, str):
        for name, value in values.items():
            obj = obj.replace("{" + name + "}", value)
        return obj
    if isinstance(obj, dict):
        return {k: _substitute(v, values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_substitute(v, values) for v in obj]
    return obj


class _Owner:
    """One CPU tensor storage of the host pool, as a flat byte tensor the plugins can address."""

    __slots__ = ("base", "end", "tensor")

    def __init__(self, base: int, nbytes: int, tensor: torch.Tensor):
        self.base = base
        self.end = base + nbytes
        self.tensor = tensor


class HiCacheStorage(_SglangHiCacheStorage):
    """SGLang HiCache L3 storage on a kvhost chain (see the module docstring for the config).

    SGLang builds it as ``HiCacheStorage(storage_config, kwargs)``, then calls
    :meth:`register_mem_pool_host` with its host KV pool. Thread-safe: SGLang's backup and prefetch
    threads call it concurrently.
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {})
        self.zero_copy = _as_bool(extra.get("interface_v1", 0))
        self.skip_existing = _as_bool(extra.get("kvhost_skip_existing", True))
        self.metrics_enabled = bool(getattr(storage_config, "enable_storage_metrics", False))

        cfg = self._chain_config(storage_config, extra)
        plugin_dirs = extra.get("kvhost_plugin_dirs") or []
        if isinstance(plugin_dirs, str):
            plugin_dirs = [d for d in plugin_dirs.split(os.pathsep) if d]
        if not isinstance(plugin_dirs, (list, tuple)):
            raise kvhost.ConfigError(
                f"kvhost_plugin_dirs must be a list of directories, got {type(plugin_dirs).__name__}"
            )
        self.chain = kvhost.Chain(
            cfg, key_format="engine", plugin_dirs=[str(d) for d in plugin_dirs], hot_cache=False
        )

        sc = storage_config
        self._is_mla = bool(sc.is_mla_model)
        model = sc.model_name or "sglang"
        world, worker = (1, 0) if self._is_mla else (int(sc.tp_size), int(sc.tp_rank))
        self._key_head = f"{_escape(model)}@{world}@{worker}@"
        tags = []
        if sc.pp_size > 1:
            tags.append(f"@pp%{sc.pp_rank}.{sc.pp_size}")
        if sc.attn_cp_size > 1:
            tags.append(f"@cp%{sc.attn_cp_rank}.{sc.attn_cp_size}")
        if getattr(sc, "dcp_size", 1) > 1:
            tags.append(f"@dcp%{sc.dcp_rank}.{sc.dcp_size}.{sc.logical_page_size}")
        self._rank_tags = "".join(tags)
        if getattr(sc, "should_split_heads", False):
            logger.warning(
                "kvhost HiCacheStorage: tp_lcm_size head splitting is not supported; pages are keyed "
                "per TP rank (tp_size=%s), so ranks of another TP size will not share them",
                sc.tp_size,
            )
        if self._is_mla and sc.tp_size > 1:
            logger.info(
                "kvhost HiCacheStorage: MLA pages are shared by all %s TP ranks and written by one; "
                "the chain's plugins must be reachable from every rank (e.g. redis), or the other "
                "ranks never hit",
                sc.tp_size,
            )

        # Set by register_mem_pool_host.
        self.mem_pool_host = None
        self._key_tail: Optional[str] = None
        self._parts: Optional[int] = None
        self._owner_index: Tuple[List[int], List[_Owner]] = ([], [])
        self._bytes_per_page = 0

        self._lock = threading.Lock()
        self._closed = False
        self._metrics: Dict[str, List[float]] = {
            "prefetch_pgs": [],
            "backup_pgs": [],
            "prefetch_bandwidth": [],
            "backup_bandwidth": [],
        }
        logger.info(
            "kvhost HiCacheStorage: chain %s, %s, model %r, rank %s/%s%s",
            " -> ".join(self.chain.tier_names()[1:]),
            "zero-copy v1 pages" if self.zero_copy else "legacy flat pages",
            model,
            sc.tp_rank,
            sc.tp_size,
            " (MLA, shared keys)" if self._is_mla else "",
        )

    @staticmethod
    def _chain_config(sc: HiCacheStorageConfig, extra: dict) -> Any:
        values = {
            "tp_rank": str(sc.tp_rank),
            "tp_size": str(sc.tp_size),
            "pp_rank": str(sc.pp_rank),
            "pp_size": str(sc.pp_size),
            "dp_rank": str(getattr(sc, "dp_rank", 0)),
            "attn_cp_rank": str(sc.attn_cp_rank),
        }
        path = extra.get("kvhost_config")
        inline = extra.get("kvhost")
        if path is not None and inline is not None:
            raise kvhost.ConfigError(
                "give either `kvhost_config` (a YAML path) or `kvhost` (an inline config) in the "
                "HiCache storage extra config, not both"
            )
        if path is not None:
            if not isinstance(path, (str, os.PathLike)) or not str(path):
                raise kvhost.ConfigError(f"kvhost_config must be a path, got {path!r}")
            return _substitute(os.fspath(path), values)
        if inline is not None:
            if not isinstance(inline, dict):
                raise kvhost.ConfigError(
                    f"kvhost must be a JSON object (the chain config), got {type(inline).__name__}"
                )
            return _substitute(inline, values)
        raise kvhost.ConfigError(
            "the HiCache storage extra config has neither `kvhost_config` (path of a kvhost YAML "
            "config) nor `kvhost` (the config inline), e.g. --hicache-storage-backend-extra-config "
            '\'{"backend_name":"kvhost","module_path":"kvhost.sglang","class_name":"HiCacheStorage",'
            '"interface_v1":1,"kvhost_config":"/path/kvhost.yaml"}\''
        )

    # ---- host pool -------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Keep the host pool, find its buffers, and learn how many chunks a page has."""
        super().register_mem_pool_host(mem_pool_host)
        dtype = str(getattr(mem_pool_host, "dtype", "raw")).replace("torch.", "")
        layout = str(getattr(mem_pool_host, "layout", "unknown"))
        self._key_tail = f"@{_escape(dtype)}@layout%{_escape(layout)}{self._rank_tags}@hash%"
        self._scan_owners()
        if not self.zero_copy:
            return
        page = int(getattr(mem_pool_host, "page_size", 1) or 1)
        try:
            ptrs, sizes = mem_pool_host.get_page_buffer_meta(torch.arange(page, dtype=torch.int64))
        except Exception as e:
            raise kvhost.ConfigError(
                f"the host pool {type(mem_pool_host).__name__} (layout {layout}) has no zero-copy "
                f"page buffers ({e}); remove `interface_v1` from the extra config to use the "
                "legacy page path"
            ) from e
        if not ptrs:
            raise kvhost.ConfigError(
                f"the host pool {type(mem_pool_host).__name__} reports no page buffers"
            )
        for p, n in zip(ptrs, sizes):
            if self._owner_of(p, n) is None:
                raise kvhost.ConfigError(
                    f"the host pool {type(mem_pool_host).__name__} reports a page buffer at {p:#x} "
                    "outside its CPU tensors"
                )
        self._parts = len(ptrs)
        self._bytes_per_page = int(sum(sizes))
        logger.info(
            "kvhost HiCacheStorage: host pool %s layout %s, %d chunk(s) and %d bytes per page",
            type(mem_pool_host).__name__,
            layout,
            self._parts,
            self._bytes_per_page,
        )

    def _scan_owners(self) -> None:
        """Every CPU tensor storage the pool holds directly, as byte tensors sorted by address."""
        found: Dict[int, _Owner] = {}
        for value in vars(self.mem_pool_host).values():
            if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
                continue
            try:
                storage = value.untyped_storage()
                base, nbytes = storage.data_ptr(), storage.nbytes()
            except Exception:  # sparse or otherwise storage-less tensors
                continue
            if nbytes == 0 or base in found:
                continue
            flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))
            found[base] = _Owner(base, nbytes, flat)
        owners = sorted(found.values(), key=lambda o: o.base)
        self._owner_index = ([o.base for o in owners], owners)  # one assignment: readers see either

    def _owner_of(self, ptr: int, nbytes: int) -> Optional[_Owner]:
        for attempt in range(2):
            bases, owners = self._owner_index
            i = bisect_right(bases, ptr) - 1
            if i >= 0 and ptr + nbytes <= owners[i].end:
                return owners[i]
            if attempt == 0 and self.mem_pool_host is not None:
                self._scan_owners()  # the pool may have (re)allocated a buffer
        return None

    # ---- keys ------------------------------------------------------------------------------

    def _stem(self, key: str) -> str:
        """`model@world@worker@hash64@dtype@layout%..[@rank tags]@hash%<key>` of a page key."""
        if self._key_tail is None:
            raise RuntimeError("no host pool registered yet (register_mem_pool_host)")
        if not isinstance(key, str) or not key:
            raise ValueError(f"a page key must be a non-empty str, got {key!r}")
        if _HEX.match(key):
            return f"{self._key_head}{int(key[-16:], 16):x}{self._key_tail}{key}"
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
        return f"{self._key_head}{h:x}{self._key_tail}{_escape(key)}"

    def _part_keys(self, keys: Sequence[str], parts: int) -> List[str]:
        out = []
        for key in keys:
            stem = self._stem(key)
            out.extend(f"{stem}@part%{j}" for j in range(parts))
        return out

    def _flat_keys(self, keys: Sequence[str]) -> List[str]:
        return [f"{self._stem(k)}@part%flat" for k in keys]

    # ---- zero-copy pages (interface_v1) ----------------------------------------------------

    def _regions(
        self, keys: List[str], host_indices: torch.Tensor
    ) -> Tuple[List[str], List[Tuple[_Owner, int, int]], int]:
        """Per-part keys and (owner, offset, length) for the pages at `host_indices`."""
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        n = len(keys)
        if n == 0 or len(ptrs) % n != 0 or len(sizes) != len(ptrs):
            raise ValueError(
                f"{len(keys)} page keys but the host pool gave {len(ptrs)} buffers for "
                f"{host_indices.numel()} slots"
            )
        parts = len(ptrs) // n
        if self._parts is not None and parts != self._parts:
            raise ValueError(
                f"the host pool gave {parts} buffers per page, {self._parts} at registration"
            )
        regions = []
        for p, s in zip(ptrs, sizes):
            owner = self._owner_of(p, s)
            if owner is None:
                raise ValueError(f"page buffer at {p:#x} ({s} bytes) is outside the host pool")
            regions.append((owner, p - owner.base, s))
        return self._part_keys(keys, parts), regions, parts

    def _by_owner(self, idx: Sequence[int], regions) -> Dict[int, Tuple[_Owner, List[int]]]:
        groups: Dict[int, Tuple[_Owner, List[int]]] = {}
        for i in idx:
            owner = regions[i][0]
            groups.setdefault(owner.base, (owner, []))[1].append(i)
        return groups

    def batch_set_v1(
        self,
        keys: List[str],
        host_indices: torch.Tensor,
        extra_info: Optional[HiCacheStorageExtraInfo] = None,
    ) -> List[bool]:
        """Store pages straight from the host pool; per page whether all its chunks are stored."""
        n = len(keys)
        if n == 0:
            return []
        started = time.perf_counter()
        try:
            part_keys, regions, parts = self._regions(keys, host_indices)
            todo = list(range(len(part_keys)))
            if self.skip_existing:
                held = self.chain.contains(part_keys)
                todo = [i for i in todo if not held[i]]
            ok = [True] * len(part_keys)
            written = 0
            for owner, idx in self._by_owner(todo, regions).values():
                stored = self._put_regions(
                    [part_keys[i] for i in idx],
                    owner,
                    [regions[i][1] for i in idx],
                    [regions[i][2] for i in idx],
                )
                for i, s in zip(idx, stored):
                    ok[i] = s
                    written += regions[i][2] if s else 0
            pages = [all(ok[p * parts : (p + 1) * parts]) for p in range(n)]
        except Exception as e:
            self._log_failure("batch_set_v1", n, e)
            return [False] * n
        self._after_set(keys, pages, written, started)
        return pages

    def _put_regions(self, keys, owner, offsets, lens) -> List[bool]:
        try:
            return self.chain.put_regions(keys, owner.tensor, offsets, lens)
        except kvhost.PluginError as e:  # every chunk failed
            logger.warning("kvhost HiCacheStorage: put of %d chunk(s) failed: %s", len(keys), e)
            return [False] * len(keys)

    def batch_get_v1(
        self,
        keys: List[str],
        host_indices: torch.Tensor,
        extra_info: Optional[HiCacheStorageExtraInfo] = None,
    ) -> List[bool]:
        """Load pages straight into the host pool; per page whether all its chunks arrived whole."""
        n = len(keys)
        if n == 0:
            return []
        started = time.perf_counter()
        try:
            part_keys, regions, parts = self._regions(keys, host_indices)
            ok = [False] * len(part_keys)
            for owner, idx in self._by_owner(range(len(part_keys)), regions).values():
                got = self._get_regions(
                    [part_keys[i] for i in idx],
                    owner,
                    [regions[i][1] for i in idx],
                    [regions[i][2] for i in idx],
                )
                for i, g in zip(idx, got):
                    ok[i] = g
            pages = [all(ok[p * parts : (p + 1) * parts]) for p in range(n)]
        except Exception as e:
            self._log_failure("batch_get_v1", n, e)
            return [False] * n
        if self.metrics_enabled:
            hits = sum(pages)
            self._record("prefetch", hits, hits * self._bytes_per_page, started)
        return pages

    def _get_regions(self, keys, owner, offsets, lens) -> List[bool]:
        """Whether each chunk arrived with exactly its length. A chunk of another size fails alone."""
        try:
            got = self.chain.get_regions(keys, owner.tensor, offsets, lens)
        except kvhost.PluginError as e:  # every chunk failed
            logger.warning("kvhost HiCacheStorage: get of %d chunk(s) failed: %s", len(keys), e)
            return [False] * len(keys)
        except ValueError as e:
            # A stored chunk larger than its region fails the whole call: retry one by one.
            if len(keys) == 1:
                logger.warning("kvhost HiCacheStorage: %s", e)
                return [False]
            return [
                self._get_regions([k], owner, [o], [n])[0] for k, o, n in zip(keys, offsets, lens)
            ]
        return [g == n for g, n in zip(got, lens)]

    # ---- lookup --------------------------------------------------------------------------

    def batch_exists(
        self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None
    ) -> int:
        """How many leading pages are stored whole (every chunk of each)."""
        if not keys:
            return 0
        try:
            if self.zero_copy:
                parts = self._parts or 1
                return self.chain.lookup(self._part_keys(keys, parts)) // parts
            return self.chain.lookup(self._flat_keys(keys))
        except Exception as e:
            self._log_failure("batch_exists", len(keys), e)
            return 0

    def exists(self, key: str) -> bool:
        """Whether the page is stored whole (its chunks in the mode SGLang uses: v1 or flat)."""
        return self.batch_exists([key]) == 1

    # ---- legacy tensor interface (SGLang without interface_v1) ----------------------------

    def batch_set(
        self,
        keys: List[str],
        values: Optional[Any] = None,
        target_locations: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> bool:
        """Store flat page tensors (`values[i]` for `keys[i]`); True if all were stored."""
        n = len(keys)
        if n == 0:
            return True
        started = time.perf_counter()
        try:
            if values is None or len(values) != n:
                raise ValueError(f"{n} keys but {0 if values is None else len(values)} values")
            flat_keys = self._flat_keys(keys)
            bufs = [v.contiguous() if isinstance(v, torch.Tensor) else v for v in values]
            todo = list(range(n))
            if self.skip_existing:
                held = self.chain.contains(flat_keys)
                todo = [i for i in todo if not held[i]]
            ok = [True] * n
            written = 0
            if todo:
                try:
                    stored = self.chain.put([flat_keys[i] for i in todo], [bufs[i] for i in todo])
                except kvhost.PluginError as e:
                    logger.warning("kvhost HiCacheStorage: put of %d page(s) failed: %s", len(todo), e)
                    stored = [False] * len(todo)
                for i, s in zip(todo, stored):
                    ok[i] = s
                    written += _nbytes(bufs[i]) if s else 0
        except Exception as e:
            self._log_failure("batch_set", n, e)
            return False
        self._after_set(keys, ok, written, started)
        return all(ok)

    def set(
        self,
        key: str,
        value: Optional[Any] = None,
        target_location: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> bool:
        """Store one flat page tensor (or any contiguous buffer)."""
        if value is None:
            logger.warning("kvhost HiCacheStorage: set(%r) without a value", key)
            return False
        return self.batch_set([key], [value])

    def batch_get(
        self,
        keys: List[str],
        target_locations: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> List[Optional[torch.Tensor]]:
        """Load flat pages into `target_locations[i]` (CPU tensors, filled in place); per key the
        tensor, or None when the page is missing or its size differs. Without targets, new uint8
        tensors of the stored size are returned."""
        n = len(keys)
        if n == 0:
            return []
        started = time.perf_counter()
        try:
            flat_keys = self._flat_keys(keys)
            if target_locations is None:
                targets = self._new_targets(flat_keys)
            else:
                if len(target_locations) != n:
                    raise ValueError(f"{n} keys but {len(target_locations)} target locations")
                targets = list(target_locations)
            out: List[Optional[torch.Tensor]] = [None] * n
            todo = [i for i in range(n) if targets[i] is not None]
            dsts = {i: _dst(targets[i]) for i in todo}
            got = self._get_into([flat_keys[i] for i in todo], [dsts[i] for i in todo])
            for i, g in zip(todo, got):
                if g is not None and g == _nbytes(dsts[i]):
                    if dsts[i] is not targets[i]:
                        targets[i].copy_(dsts[i])
                    out[i] = targets[i]
        except Exception as e:
            self._log_failure("batch_get", n, e)
            return [None] * n
        if self.metrics_enabled:
            hits = [t for t in out if t is not None]
            self._record("prefetch", len(hits), sum(_nbytes(t) for t in hits), started)
        return out

    def _new_targets(self, flat_keys: List[str]) -> List[Optional[torch.Tensor]]:
        metas = self.chain.meta(flat_keys)
        return [None if m is None else torch.empty(m[0], dtype=torch.uint8) for m in metas]

    def _get_into(self, keys: List[str], dsts: List[torch.Tensor]) -> List[Optional[int]]:
        if not keys:
            return []
        try:
            return self.chain.get_into(keys, dsts)
        except kvhost.PluginError as e:
            logger.warning("kvhost HiCacheStorage: get of %d page(s) failed: %s", len(keys), e)
            return [None] * len(keys)
        except ValueError as e:  # a stored page larger than its target: the others alone
            if len(keys) == 1:
                logger.warning("kvhost HiCacheStorage: %s", e)
                return [None]
            return [self._get_into([k], [d])[0] for k, d in zip(keys, dsts)]

    def get(
        self,
        key: str,
        target_location: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> Optional[torch.Tensor]:
        """Load one flat page into `target_location` (or a new uint8 tensor); None if missing."""
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    # ---- management ------------------------------------------------------------------------

    def clear(self) -> None:
        """Empty every tier of the chain that can clear (``fs``, ``mem``, ``redis``…; see each
        plugin's capabilities in ``kvhost plugins``)."""
        try:
            self.chain.clear()
            logger.info("kvhost HiCacheStorage: cleared the chain")
        except Exception as e:
            self._log_failure("clear", 0, e)

    def close(self) -> None:
        """Close the chain: puts in flight finish, then the plugins are destroyed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            report = self.chain.close()
            if report.get("unfinished") or report.get("stuck"):
                logger.warning("kvhost HiCacheStorage: close left work unfinished: %s", report)
        except Exception as e:
            self._log_failure("close", 0, e)

    def get_stats(self):
        """SGLang ``StorageMetrics`` of the calls since the last call (pages per load/store call and
        GB/s), when SGLang enabled storage metrics; None otherwise. The chain's own per-tier
        counters are ``self.chain.stats()``."""
        if not self.metrics_enabled:
            return None
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except Exception:  # pragma: no cover - older or trimmed SGLang
            return None
        m = StorageMetrics()
        with self._lock:
            for name, values in self._metrics.items():
                getattr(m, name).extend(values)
                values.clear()
        return m

    # ---- helpers -----------------------------------------------------------------------------

    def _after_set(self, keys: List[str], ok: List[bool], written: int, started: float) -> None:
        if self.metrics_enabled:
            self._record("backup", sum(ok), written, started)

    def _record(self, what: str, pages: int, nbytes: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        with self._lock:
            self._metrics[f"{what}_pgs"].append(pages)
            if elapsed > 0 and nbytes > 0:
                self._metrics[f"{what}_bandwidth"].append(nbytes / elapsed / (1 << 30))

    def _log_failure(self, op: str, n: int, e: BaseException) -> None:
        if isinstance(e, kvhost.ChainClosed):
            logger.warning("kvhost HiCacheStorage: %s of %d page(s) after close", op, n)
        elif isinstance(e, kvhost.KvhostError):
            logger.warning("kvhost HiCacheStorage: %s of %d page(s) failed: %s", op, n, e)
        else:
            logger.exception("kvhost HiCacheStorage: %s of %d page(s) failed", op, n)

    def __repr__(self) -> str:
        return f"kvhost.sglang.HiCacheStorage({self.chain!r})"


def _nbytes(buf: Any) -> int:
    if isinstance(buf, torch.Tensor):
        return buf.numel() * buf.element_size()
    return memoryview(buf).nbytes


def _dst(target: Any) -> Any:
    """A destination the chain can write: the tensor itself if contiguous, else a staging copy."""
    if isinstance(target, torch.Tensor) and not target.is_contiguous():
        return torch.empty_like(target, memory_format=torch.contiguous_format)
    return target
