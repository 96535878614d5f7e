"""LMCache's in-process storage plugin (``StoragePluginInterface``) backed by a kvhost chain.

- Puts are zero-copy: each ``MemoryObj``'s bytes are lent to the plugins. LMCache drops its reference
  as soon as ``batched_submit_put_task`` returns, so the plugin takes its own (``ref_count_up``) and
  gives it back when every plugin has finished, then calls ``on_complete_callback``.
- Gets allocate the ``MemoryObj`` from LMCache's allocator with the stored shape, dtype and format,
  and the plugins read straight into it.
- One completion thread per instance (not per request) runs LMCache's callbacks; the data never
  passes through Python.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import threading
from concurrent.futures import Future
from typing import Any, Callable, List, Optional, Sequence

import torch
from lmcache.v1.memory_management import MemoryFormat, MemoryObj
from lmcache.v1.protocol import DTYPE_TO_INT, INT_TO_DTYPE
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from ._native import Chain, ConfigError, KvhostError, NativeL2Client

logger = logging.getLogger("kvhost.lmcache")

# Names under which LMCache may import this class.
_EXPORTED_AS = {"kvhost.lmcache"}


def _key_text(key: Any) -> str:
    return key.to_string() if hasattr(key, "to_string") else str(key)


def _own_name(cls: type, config: Any) -> str:
    """The ``storage_plugins`` entry whose module_path/class_name name ``cls`` (the launcher does not
    say which entry it is constructing)."""
    extra = getattr(config, "extra_config", None) or {}
    names = list(getattr(config, "storage_plugins", None) or [])
    modules = {cls.__module__} | (_EXPORTED_AS if cls is StoragePlugin else set())
    mine = [
        n
        for n in names
        if extra.get(f"storage_plugin.{n}.module_path") in modules
        and extra.get(f"storage_plugin.{n}.class_name") == cls.__name__
    ]
    if not mine:
        raise ConfigError(
            f"kvhost: no entry of storage_plugins {names} has module_path in {sorted(modules)} and "
            f"class_name {cls.__name__!r} in extra_config"
        )
    if len(mine) > 1:
        raise ConfigError(
            f"kvhost: storage_plugins entries {mine} all name {cls.__module__}.{cls.__name__}, and "
            "LMCache does not tell a plugin which entry it is; give each its own class, e.g. "
            "`class Tier2(kvhost.lmcache.StoragePlugin): pass` in your module"
        )
    return mine[0]


class StoragePlugin(StoragePluginInterface):
    """A kvhost chain as an LMCache storage plugin. Options, under ``storage_plugin.<name>.``:

    - ``kvhost_config``: a kvhost YAML path; or ``kvhost``: the chain's keys inline (a dict, or a
      JSON string);
    - ``plugin_dirs``: extra directories to find plugin libraries in (a list or ``:``-separated);
    - ``hot_cache``: keep kvhost's own CPU hot cache too (default false: LMCache has one).
    """

    def __init__(
        self,
        dst_device: str = "cpu",
        config: Any = None,
        metadata: Any = None,
        local_cpu_backend: Any = None,
        loop: Optional[asyncio.AbstractEventLoop] = None,
    ):
        super().__init__(
            dst_device=dst_device,
            config=config,
            metadata=metadata,
            local_cpu_backend=local_cpu_backend,
            loop=loop,
        )
        if config is None:
            raise ConfigError("kvhost.lmcache.StoragePlugin needs LMCache's engine config")
        self.name = _own_name(type(self), config)
        prefix = f"storage_plugin.{self.name}."
        extra = config.extra_config or {}
        opts = {k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)}
        chain_config: Any = opts.get("kvhost_config")
        if chain_config is None and "kvhost" in opts:
            chain_config = opts["kvhost"]
            if isinstance(chain_config, str):
                try:
                    chain_config = json.loads(chain_config)
                except ValueError as e:
                    raise ConfigError(f"kvhost: {prefix}kvhost is not a JSON object: {e}") from None
        if chain_config is None:
            raise ConfigError(
                f"kvhost: set {prefix}kvhost_config (a kvhost YAML path) or {prefix}kvhost (the chain's "
                "keys inline) in extra_config"
            )
        dirs = opts.get("plugin_dirs") or []
        if isinstance(dirs, str):
            dirs = [d for d in dirs.split(os.pathsep) if d]
        hot = str(opts.get("hot_cache", "false")).lower() in ("1", "true", "yes")
        self._chain = Chain(chain_config, key_format="auto", plugin_dirs=list(dirs), hot_cache=hot)
        self._client = NativeL2Client.for_chain(self._chain)
        self._pending: dict[int, Callable[[bool, str, Optional[List[bool]]], None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._completer = threading.Thread(
            target=self._complete_loop, name=f"kvhost-{self.name}-completions", daemon=True
        )
        self._completer.start()
        logger.info("kvhost storage plugin %r: %r", self.name, self._chain)

    def __str__(self) -> str:
        return self.name

    # ---- completions -------------------------------------------------------------------------------

    def _submit(self, submit: Callable[[], int], on_done: Callable[[bool, str, Optional[List[bool]]], None]) -> None:
        # Registered under the lock: a plugin that completes inside submit posts before the id is known.
        with self._lock:
            self._pending[submit()] = on_done

    def _complete_loop(self) -> None:
        poller = select.poll()
        poller.register(self._client.event_fd(), select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            self._dispatch()
        self._dispatch()

    def _dispatch(self) -> None:
        for fid, ok, error, per_key in self._client.drain_completions():
            with self._lock:
                on_done = self._pending.pop(fid, None)
            if on_done is None:
                logger.warning("kvhost: completion of unknown operation %d", fid)
                continue
            try:
                on_done(ok, error, per_key)
            except Exception:  # a callback of LMCache's must not kill the completion thread
                logger.exception("kvhost: completion callback of operation %d failed", fid)

    # ---- metadata ----------------------------------------------------------------------------------

    @staticmethod
    def _meta(obj: MemoryObj):
        m = obj.metadata
        return (int(m.fmt.value), DTYPE_TO_INT[m.dtype], tuple(m.shape))

    def _allocate(self, meta) -> Optional[MemoryObj]:
        length, fmt, dtype, shape = meta
        torch_dtype = INT_TO_DTYPE.get(dtype)
        if torch_dtype is None or not shape:
            logger.warning("kvhost: stored chunk has no LMCache shape/dtype (%r); skipped", meta)
            return None
        obj = self.local_cpu_backend.allocate(
            torch.Size(shape), torch_dtype, MemoryFormat(fmt), busy_loop=False
        )
        if obj is not None and obj.get_size() != length:
            logger.warning(
                "kvhost: stored chunk is %d bytes but its shape %s %s needs %d", length, shape, torch_dtype, obj.get_size()
            )
            obj.ref_count_down()
            return None
        return obj

    # ---- StoragePluginInterface --------------------------------------------------------------------

    def contains(self, key, pin: bool = False) -> bool:
        if pin:
            return self.pin(key)
        try:
            return self._chain.contains([key])[0]
        except KvhostError as e:
            logger.warning("kvhost contains: %s", e)
            return False

    def batched_contains(self, keys, pin: bool = False) -> int:
        try:
            hits = self._chain.lookup(keys)
        except KvhostError as e:
            logger.warning("kvhost lookup: %s", e)
            return 0
        if pin:
            for k in keys[:hits]:
                self.pin(k)
        return hits

    def exists_in_put_tasks(self, key) -> bool:
        return self._chain.put_in_flight(key)

    def batched_submit_put_task(
        self,
        keys: Sequence[Any],
        objs: List[MemoryObj],
        transfer_spec: Any = None,
        on_complete_callback: Optional[Callable[[Any], None]] = None,
    ):
        keys, objs = list(keys), list(objs)
        if not keys:
            return None
        for o in objs:
            o.ref_count_up()  # LMCache drops its own reference when this returns
        metas = [self._meta(o) for o in objs]
        bufs = [o.byte_array for o in objs]

        def done(ok: bool, error: str, per_key: Optional[List[bool]]) -> None:
            for o in objs:
                o.ref_count_down()
            if not ok:
                logger.warning("kvhost put of %d chunk(s): %s", len(keys), error)
            if on_complete_callback is not None:
                for k, stored in zip(keys, per_key or [ok] * len(keys)):
                    if stored:
                        on_complete_callback(k)

        self._submit(lambda: self._client.submit_batch_set(keys, bufs, metas), done)
        return None

    def batched_get_blocking(self, keys) -> List[Optional[MemoryObj]]:
        keys = list(keys)
        out: List[Optional[MemoryObj]] = [None] * len(keys)
        try:
            metas = self._chain.meta(keys)
        except KvhostError as e:
            logger.warning("kvhost lookup: %s", e)
            return out
        want = []
        for i, m in enumerate(metas):
            if m is not None and (obj := self._allocate(m)) is not None:
                out[i] = obj
                want.append(i)
        if not want:
            return out
        try:
            lens = self._chain.get_into([keys[i] for i in want], [out[i].byte_array for i in want])
        except KvhostError as e:
            logger.warning("kvhost get: %s", e)
            lens = [None] * len(want)
        for i, n in zip(want, lens):
            if n is None:
                out[i].ref_count_down()
                out[i] = None
        return out

    def get_blocking(self, key) -> Optional[MemoryObj]:
        return self.batched_get_blocking([key])[0]

    def get_non_blocking(self, key, location: Optional[str] = None) -> Optional[Future]:
        """A future of the chunk (or None when it is not stored), loaded by the plugins in the
        background."""
        future: Future = Future()
        try:
            meta = self._chain.meta([key])[0]
        except KvhostError as e:
            logger.warning("kvhost lookup: %s", e)
            return None
        obj = self._allocate(meta) if meta is not None else None
        if obj is None:
            return None

        def done(ok: bool, error: str, per_key: Optional[List[bool]]) -> None:
            if ok:
                future.set_result(obj)
            else:
                obj.ref_count_down()
                logger.warning("kvhost get: %s", error)
                future.set_result(None)

        self._submit(lambda: self._client.submit_batch_get([key], [obj.byte_array]), done)
        return future

    def submit_prefetch_task(self, key) -> Optional[Future]:
        """Load ``key`` in the background (the name older LMCache versions use)."""
        return self.get_non_blocking(key)

    async def batched_async_contains(self, lookup_id: str, keys, pin: bool = False) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._chain.lookup, list(keys), lookup_id if pin else None)

    async def batched_get_non_blocking(self, lookup_id: str, keys, transfer_spec: Any = None) -> List[MemoryObj]:
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, self.batched_get_blocking, list(keys))
        self._chain.unpin(lookup_id)
        out = []
        for obj in got:  # the prefix that arrived
            if obj is None:
                break
            out.append(obj)
        for obj in got[len(out):]:
            if obj is not None:
                obj.ref_count_down()
        return out

    def pin(self, key) -> bool:
        return self._chain.lookup([key], f"pin:{_key_text(key)}") == 1

    def unpin(self, key) -> bool:
        return self._chain.unpin(f"pin:{_key_text(key)}") > 0

    def remove(self, key, force: bool = True) -> bool:
        return self._chain.remove([key])[0]

    def batched_remove(self, keys, force: bool = True) -> int:
        return sum(self._chain.remove(list(keys)))

    def get_allocator_backend(self):
        return self.local_cpu_backend

    def stats(self) -> dict:
        """Per-tier counters and latencies of the chain."""
        return self._chain.stats()

    def close(self) -> None:
        self._client.close()  # drains puts, destroys the plugins: every operation completes
        self._stop.set()
        self._completer.join(timeout=10)
        self._chain.close()
