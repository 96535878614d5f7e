"""kvhost for LMCache: native plugins behind LMCache's two plugin interfaces.

**Multi-process mode** (``lmcache server``), as an L2 adapter::

    --l2-adapter '{"type": "native_plugin", "module_path": "kvhost.lmcache",
                   "class_name": "NativeL2Client",
                   "adapter_params": {"config": "/etc/kvhost/l2.yaml"}}'

``adapter_params`` is either ``{"config": PATH}`` or the chain's keys inline
(``{"storage_plugins": [...], "extra_config": {...}}``); ``hot_cache`` (default false: LMCache's L1
already is a CPU cache), ``plugin_dirs`` and ``key_format`` are optional.

**In-process mode** (``LMCacheEngineConfig``), as a storage plugin::

    storage_plugins: [kvhost]
    extra_config:
      storage_plugin.kvhost.module_path: kvhost.lmcache
      storage_plugin.kvhost.class_name: StoragePlugin
      storage_plugin.kvhost.kvhost_config: /etc/kvhost/chain.yaml

``NativeL2Client`` needs nothing of LMCache; ``StoragePlugin`` imports LMCache when first used.
"""

from __future__ import annotations

from ._native import NativeL2Client

__all__ = ["NativeL2Client", "StoragePlugin"]


def __getattr__(name: str):
    # LMCache's base class is imported only when the in-process plugin is asked for.
    if name == "StoragePlugin":
        try:
            from ._lmcache_plugin import StoragePlugin
        except ImportError as e:
            raise ImportError(
                f"kvhost.lmcache.StoragePlugin subclasses LMCache's StoragePluginInterface and needs "
                f"LMCache installed (pip install lmcache): {e}"
            ) from e

        globals()["StoragePlugin"] = StoragePlugin
        return StoragePlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
