"""Shared fixtures of the kvhost Python tests: where the built plugins are, chain configs, and a real
``redis-server`` on 127.0.0.1.

The plugins come from the workspace build: ``KVHOST_TEST_PLUGIN_DIRS`` (``os.pathsep``-separated; the
Rust test harness sets it to the profile it built), else ``target/release``. Fixture plugins (``hang``,
``create_fails``, …) come from ``KVHOST_TEST_FIXTURE_DIR``.

A test that needs something missing is *skipped* with the reason (pytest shows it in the summary),
unless ``KVHOST_REQUIRE_<THING>=1`` is set, where it fails instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The LMCache L2 harness is shared with the benchmark.
sys.path.insert(0, str(REPO / "python" / "bench"))


def plugin_dirs() -> list[str]:
    env = os.environ.get("KVHOST_TEST_PLUGIN_DIRS")
    if env:
        return [d for d in env.split(os.pathsep) if d]
    release = REPO / "target" / "release"
    return [str(release / "plugins"), str(release)]


def fixture_dir() -> Path | None:
    env = os.environ.get("KVHOST_TEST_FIXTURE_DIR")
    return Path(env) if env else None


def need(thing: str, why: str) -> None:
    """Skip (visibly) for a missing dependency, or fail when it is required."""
    if os.environ.get(f"KVHOST_REQUIRE_{thing.upper()}") == "1":
        pytest.fail(f"KVHOST_REQUIRE_{thing.upper()}=1 but {why}")
    pytest.skip(why)


def plugin_config(name: str, module: str, cls: str, options: dict | None = None, **top) -> dict:
    """A one-plugin chain config as a dict (the same keys as the YAML)."""
    extra = {
        f"storage_plugin.{name}.module_path": module,
        f"storage_plugin.{name}.class_name": cls,
    }
    for k, v in (options or {}).items():
        extra[f"storage_plugin.{name}.{k}"] = v
    cfg = {"chunk_size": 256, "local_cpu": False, "storage_plugins": [name], "extra_config": extra}
    cfg.update(top)
    return cfg


@pytest.fixture
def dirs() -> list[str]:
    return plugin_dirs()


@pytest.fixture
def fixtures() -> Path:
    d = fixture_dir()
    if d is None or not d.is_dir():
        need("fixtures", "KVHOST_TEST_FIXTURE_DIR does not name the built fixture plugins (run through cargo test)")
    return d


@pytest.fixture
def mem_config() -> dict:
    return plugin_config("mem", "kvhost_mem", "mem", {"capacity_bytes": 1 << 30})


@pytest.fixture
def fs_dir():
    d = tempfile.mkdtemp(prefix="kvhost-pytest-fs-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throw-away ``redis-server`` on 127.0.0.1 (no persistence), killed at teardown."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvhost-pytest-redis-")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_server():
    if shutil.which("redis-server") is None:
        need("redis", "redis-server is not installed (apt-get install redis-server)")
    server = RedisServer()
    yield server
    server.stop()
