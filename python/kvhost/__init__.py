"""kvhost in-process: chains of native KV-cache storage plugins (C, C++ or Rust ``.so`` files behind
one stable C ABI) for LMCache and SGLang, with no server, no socket and no extra copy.

- :class:`Chain`: a kvhost chain (optional CPU hot cache, then plugins) from a kvhost/LMCache-style
  YAML path or dict. Buffers (``memoryview``, ``bytearray``, numpy arrays, CPU torch tensors) are lent
  to the plugins without a copy; the GIL is released around every native call.
- :mod:`kvhost.lmcache`: ``NativeL2Client`` (LMCache's multi-process ``native_plugin`` L2 adapter) and
  ``StoragePlugin`` (LMCache's in-process ``storage_plugins``).
- :mod:`kvhost.sglang`: ``HiCacheStorage`` for SGLang's ``dynamic`` HiCache backend.

Importing :mod:`kvhost` imports neither LMCache nor SGLang.
"""

from ._native import (
    Chain,
    ChainClosed,
    ConfigError,
    KvhostError,
    OperationTimeout,
    PluginError,
    PluginLoadError,
    __version__,
)

__all__ = [
    "Chain",
    "ChainClosed",
    "ConfigError",
    "KvhostError",
    "OperationTimeout",
    "PluginError",
    "PluginLoadError",
    "__version__",
]
