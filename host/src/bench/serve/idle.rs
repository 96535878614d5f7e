//! The idle-connections row of `kvhost bench --suite serve`: a `kvhost serve` process holds 10,000
//! idle connections while fresh clients are timed from connect to HEALTH reply. Target: under 10 ms.
//!
//! The server runs as a child process (this binary's `serve`), so each side needs only its own
//! descriptors; the soft file limit is raised to the hard one first (`prlimit`), and the row says
//! SKIPPED, not met, when the hard limit is too low to hold the connections.

use super::super::micro::Row;
use crate::serve::client::LmClient;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Idle connections held open during the measurement.
pub const IDLE_CONNECTIONS: usize = 10_000;
/// Fresh clients timed.
const SAMPLES: usize = 200;
/// The target for the median fresh client, connect to reply.
const TARGET: Duration = Duration::from_millis(10);

/// Kills the child server on every path out.
struct ChildServer(Child);

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The hard limit on open files of this process.
fn nofile_hard_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    match line.split_whitespace().nth(4)? {
        "unlimited" => Some(u64::MAX),
        v => v.parse().ok(),
    }
}

/// Raise this process's soft file limit (inherited by the child server) to `n`.
fn raise_nofile(n: u64) -> Result<(), String> {
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={n}:{n}"),
        ])
        .output()
        .map_err(|e| format!("cannot run prlimit: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "prlimit --nofile={n}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn start_server() -> Result<(ChildServer, SocketAddr, std::path::PathBuf), String> {
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?;
    let config =
        std::env::temp_dir().join(format!("kvhost-bench-idle-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        "chunk_size: 16\nmax_local_cpu_size: 0.05\nlocal_cpu_prefault: false\n",
    )
    .map_err(|e| format!("write {}: {e}", config.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &addr.to_string()])
        .env_remove("LMCACHE_CONFIG_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start kvhost serve: {e}"))?;
    let mut child = ChildServer(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.0.try_wait() {
            return Err(format!("kvhost serve exited with {status}"));
        }
        if Instant::now() > deadline {
            return Err("kvhost serve did not listen within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, addr, config))
}

/// Measure; `Err` says why the row could not be measured.
fn measure(progress: &mut dyn FnMut(&str)) -> Result<Vec<Duration>, String> {
    let hard = nofile_hard_limit().ok_or("cannot read the file limit")?;
    let need = IDLE_CONNECTIONS as u64 + 1024;
    if hard < need {
        return Err(format!(
            "the hard file limit is {hard}, {IDLE_CONNECTIONS} connections need {need}"
        ));
    }
    raise_nofile(hard.min(1 << 20))?;
    let (_server, addr, config) = start_server()?;
    progress(&format!("opening {IDLE_CONNECTIONS} idle connections"));
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for i in 0..IDLE_CONNECTIONS {
        idle.push(TcpStream::connect(addr).map_err(|e| format!("idle connection {i}: {e}"))?);
    }
    // Connections are accepted in order: once the last one answers, all of them are held.
    let mut last = LmClient::connect(addr).map_err(|e| e.to_string())?;
    if !last
        .health()
        .map_err(|e| format!("health with idle connections open: {e}"))?
    {
        return Err("HEALTH failed".into());
    }
    progress("timing fresh clients");
    let mut times = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let t = Instant::now();
        let mut c = LmClient::connect(addr).map_err(|e| format!("fresh client {i}: {e}"))?;
        c.stream()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        if !c
            .health()
            .map_err(|e| format!("fresh client {i} not served: {e}"))?
        {
            return Err(format!("fresh client {i}: HEALTH failed"));
        }
        times.push(t.elapsed());
    }
    drop(idle);
    let _ = std::fs::remove_file(config);
    times.sort();
    Ok(times)
}

/// The rows: median (judged against the target) and p99 (reported), or one SKIPPED row.
pub fn rows(progress: &mut dyn FnMut(&str)) -> Vec<Row> {
    let name =
        format!("serve: new client, connect to reply, {IDLE_CONNECTIONS} idle connections open");
    match measure(progress) {
        Ok(times) => {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let median = times[times.len() / 2];
            let p99 = times[times.len() * 99 / 100];
            vec![
                Row {
                    name: format!("{name} (median of {SAMPLES})"),
                    value: ms(median),
                    unit: "ms".into(),
                    baseline: None,
                    ratio: None,
                    target: format!("< {} ms", TARGET.as_millis()),
                    met: Some(median < TARGET),
                },
                Row {
                    name: format!("  p99 of {SAMPLES}"),
                    value: ms(p99),
                    unit: "ms".into(),
                    baseline: None,
                    ratio: None,
                    target: "report".into(),
                    met: None,
                },
            ]
        }
        Err(why) => vec![Row {
            name,
            value: f64::NAN,
            unit: "ms".into(),
            baseline: None,
            ratio: None,
            target: format!("SKIPPED: {why}"),
            met: None,
        }],
    }
}
