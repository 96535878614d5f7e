//! LMCache's own client code (LMCache 0.5.6's `LMCServerConnector` and CPU backend) against
//! `kvhost serve`: what LMCache stores, it reads back exactly.
//!
//! LMCache is a multi-gigabyte install (torch), so it lives in a cached virtualenv
//! (`~/.cache/kvhost/lmcache-venv`, or `$KVHOST_LMCACHE_PYTHON`), which `.ci/run` creates. When it is
//! absent this test is reported *ignored* with the reason, unless `KVHOST_REQUIRE_LMCACHE=1` (set by
//! `.ci/test-all` once the virtualenv is ready), where it runs and fails.

use crate::chain::chain_with;
use kvhost::serve::{ServeConfig, Server};
use std::path::{Path, PathBuf};
use std::process::Command;

fn lmcache_python() -> Option<PathBuf> {
    let p = std::env::var_os("KVHOST_LMCACHE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/kvhost/lmcache-venv/bin/python")
        });
    p.is_file().then_some(p)
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/lmcache_client.py")
}

#[test]
#[cfg_attr(
    not(has_lmcache),
    ignore = "needs the LMCache virtualenv (~/.cache/kvhost/lmcache-venv or $KVHOST_LMCACHE_PYTHON; .ci/test-all creates it)"
)]
fn lmcache_client_round_trips_through_kvhost_serve() {
    // Without the virtualenv this test is ignored at build time (`has_lmcache`, tests/build.rs); run
    // anyway (KVHOST_REQUIRE_LMCACHE=1, or the venv removed since the build), it fails here.
    let python = lmcache_python().unwrap_or_else(|| {
        panic!(
            "no LMCache virtualenv: create it with `python3 -m venv ~/.cache/kvhost/lmcache-venv && \
             ~/.cache/kvhost/lmcache-venv/bin/pip install lmcache==0.5.6` (or run .ci/test-all)"
        )
    });
    // Hot cache plus the C mem plugin: LMCache's chunks go through the real chain.
    let srv = Server::start(
        chain_with("mem", 256, ""),
        "127.0.0.1:0".parse().unwrap(),
        ServeConfig::default(),
    )
    .unwrap();
    let port = srv.local_addr().port().to_string();
    for (size, count) in [("4096", "8"), ("1048576", "16"), ("8388608", "4")] {
        let out = Command::new(&python)
            .arg(script())
            .args(["127.0.0.1", &port, "roundtrip", size, count])
            .env("LMCACHE_LOG_LEVEL", "WARNING")
            .output()
            .expect("run LMCache's client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("\"ok\": true"),
            "LMCache's client failed against kvhost serve ({size} B x {count}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    srv.shutdown();
    srv.wait();
}
