//! The control plane, on the `redis` crate: where the servers are (URL parsing, `CLUSTER SLOTS`), and
//! the commands that move no chunk data (`PING`, `INFO`, `SCAN`/`UNLINK` for `clear`).

use crate::layout::slot_of;
use crate::resp::Handshake;
use parking_lot::RwLock;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};
use std::sync::Arc;
use std::time::Duration;

/// Slots in a Redis Cluster.
const SLOTS: usize = 16384;

/// Which servers the plugin talks to.
#[derive(Clone, Debug)]
pub enum Target {
    /// One server (`url`).
    Single(String),
    /// A Redis Cluster, discovered from these seed nodes (`cluster_nodes`).
    Cluster(Vec<String>),
}

/// Timeouts for every connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// Every read and write of a command.
    pub command: Duration,
}

/// Parse `url` (`redis[s]://[[user]:password@]host[:port][/db]`) with the crate into an address, the
/// handshake (without TLS settings) and whether the scheme asks for TLS. Unix sockets are refused.
pub fn parse_url(url: &str) -> Result<(String, Handshake, bool), String> {
    let info = url
        .into_connection_info()
        .map_err(|e| format!("url `{}`: {e}", redact(url)))?;
    let (addr, tls) = match info.addr() {
        ConnectionAddr::Tcp(host, port) => (format!("{host}:{port}"), false),
        ConnectionAddr::TcpTls { host, port, .. } => (format!("{host}:{port}"), true),
        _ => {
            return Err(format!(
                "url `{}`: unix sockets are not supported; use redis://host:port",
                redact(url)
            ))
        }
    };
    let r = info.redis_settings();
    Ok((
        addr,
        Handshake {
            username: r.username().map(str::to_string),
            password: r.password().map(str::to_string),
            db: r.db(),
            tls: None,
        },
        tls,
    ))
}

/// `url` with any password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => format!("{}***{}", &url[..s + 3], &url[at..]),
            }
        }
        _ => url.to_string(),
    }
}

/// A crate connection to `addr` for control commands.
pub fn control_conn(
    addr: &str,
    hs: &Handshake,
    t: Timeouts,
) -> Result<redis::Connection, redis::RedisError> {
    let (host, port) = split_addr(addr);
    let mut settings = redis::RedisConnectionInfo::default().set_db(hs.db);
    if let Some(u) = &hs.username {
        settings = settings.set_username(u);
    }
    if let Some(p) = &hs.password {
        settings = settings.set_password(p);
    }
    let addr = match &hs.tls {
        None => ConnectionAddr::Tcp(host, port),
        Some(_) => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        },
    };
    let info: ConnectionInfo = addr.into_connection_info()?.set_redis_settings(settings);
    let client = match &hs.tls {
        None => redis::Client::open(info)?,
        Some(tls) => redis::Client::build_with_tls(info, tls.certificates())?,
    };
    let con = client.get_connection_with_timeout(t.connect)?;
    con.set_read_timeout(Some(t.command))?;
    con.set_write_timeout(Some(t.command))?;
    Ok(con)
}

fn split_addr(addr: &str) -> (String, u16) {
    match addr.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            p.parse().unwrap_or(6379),
        ),
        None => (addr.to_string(), 6379),
    }
}

/// Which node serves each slot.
#[derive(Debug)]
struct SlotMap {
    nodes: Vec<String>,
    owner: Box<[u16]>,
}

/// Where each chunk goes: one address, or a Redis Cluster slot map kept fresh from `CLUSTER SLOTS`.
#[derive(Debug)]
pub struct Topology {
    target: Target,
    hs: Handshake,
    t: Timeouts,
    map: RwLock<Arc<SlotMap>>,
}

const UNOWNED: u16 = u16::MAX;

impl Topology {
    /// Connect to the target once (to fail `create` with a clear error), and read the slot map.
    pub fn open(target: Target, hs: Handshake, t: Timeouts) -> Result<Topology, String> {
        let topo = Topology {
            target,
            hs,
            t,
            map: RwLock::new(Arc::new(SlotMap {
                nodes: Vec::new(),
                owner: vec![UNOWNED; SLOTS].into_boxed_slice(),
            })),
        };
        match &topo.target {
            Target::Single(addr) => {
                let mut con = control_conn(addr, &topo.hs, t)
                    .map_err(|e| format!("cannot reach redis at {addr}: {e}"))?;
                redis::cmd("PING")
                    .query::<String>(&mut con)
                    .map_err(|e| format!("redis at {addr}: PING failed: {e}"))?;
                let mode = info_field(&mut con, "server", "redis_mode").unwrap_or_default();
                if mode == "cluster" {
                    return Err(format!(
                        "redis at {addr} is a Redis Cluster node: configure it with `cluster_nodes`, not `url`"
                    ));
                }
            }
            Target::Cluster(_) => topo.refresh()?,
        }
        Ok(topo)
    }

    /// The handshake for data connections.
    pub fn handshake(&self) -> &Handshake {
        &self.hs
    }

    /// Connection timeouts.
    pub fn timeouts(&self) -> Timeouts {
        self.t
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// The node that serves `slot_key`'s slot, if known.
    pub fn node_for(&self, slot_key: &[u8]) -> Option<String> {
        match &self.target {
            Target::Single(addr) => Some(addr.clone()),
            Target::Cluster(_) => {
                let map = self.map.read().clone();
                let owner = map.owner[slot_of(slot_key) as usize];
                map.nodes.get(owner as usize).cloned()
            }
        }
    }

    /// Every master (the one server, for a single node).
    pub fn masters(&self) -> Vec<String> {
        match &self.target {
            Target::Single(addr) => vec![addr.clone()],
            Target::Cluster(_) => self.map.read().nodes.clone(),
        }
    }

    /// A `MOVED slot addr` reply: the slot now lives at `addr`.
    pub fn moved(&self, slot: u16, addr: &str) {
        if !self.is_cluster() || slot as usize >= SLOTS {
            return;
        }
        let mut guard = self.map.write();
        let mut map = SlotMap {
            nodes: guard.nodes.clone(),
            owner: guard.owner.clone(),
        };
        let idx = match map.nodes.iter().position(|n| n == addr) {
            Some(i) => i,
            None => {
                map.nodes.push(addr.to_string());
                map.nodes.len() - 1
            }
        };
        map.owner[slot as usize] = idx as u16;
        *guard = Arc::new(map);
    }

    /// Re-read the slot map from the first node that answers (known masters first, then seeds).
    pub fn refresh(&self) -> Result<(), String> {
        let Target::Cluster(seeds) = &self.target else {
            return Ok(());
        };
        let mut candidates = self.map.read().nodes.clone();
        candidates.extend(seeds.iter().cloned());
        candidates.dedup();
        let hs = Handshake {
            db: 0,
            ..self.hs.clone()
        };
        let mut errors = Vec::new();
        for addr in &candidates {
            let slots = control_conn(addr, &hs, self.t)
                .and_then(|mut c| redis::cmd("CLUSTER").arg("SLOTS").query::<Value>(&mut c));
            match slots
                .map_err(|e| e.to_string())
                .and_then(|v| parse_slots(&v))
            {
                Ok(map) => {
                    *self.map.write() = Arc::new(map);
                    return Ok(());
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(format!(
            "cannot read the Redis Cluster slot map from any node ({})",
            errors.join("; ")
        ))
    }

    /// Whether every slot has an owner (the cluster can serve every key).
    pub fn covered(&self) -> bool {
        !self.is_cluster() || self.map.read().owner.iter().all(|&o| o != UNOWNED)
    }
}

fn parse_slots(v: &Value) -> Result<SlotMap, String> {
    let Value::Array(ranges) = v else {
        return Err(format!("CLUSTER SLOTS: unexpected reply {v:?}"));
    };
    let mut map = SlotMap {
        nodes: Vec::new(),
        owner: vec![UNOWNED; SLOTS].into_boxed_slice(),
    };
    for r in ranges {
        let Value::Array(f) = r else {
            return Err("CLUSTER SLOTS: a range is not an array".into());
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (f.first(), f.get(1), f.get(2))
        else {
            return Err(format!("CLUSTER SLOTS: malformed range {r:?}"));
        };
        let host = match master.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => return Err(format!("CLUSTER SLOTS: malformed node {master:?}")),
        };
        let Some(Value::Int(port)) = master.get(1) else {
            return Err(format!("CLUSTER SLOTS: malformed node {master:?}"));
        };
        if !(0..SLOTS as i64).contains(start) || !(*start..SLOTS as i64).contains(end) {
            return Err(format!("CLUSTER SLOTS: bad range {start}-{end}"));
        }
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let idx = match map.nodes.iter().position(|n| *n == addr) {
            Some(i) => i,
            None => {
                map.nodes.push(addr);
                map.nodes.len() - 1
            }
        };
        for s in *start..=*end {
            map.owner[s as usize] = idx as u16;
        }
    }
    if map.nodes.is_empty() {
        return Err("CLUSTER SLOTS: no slot is assigned (is the cluster created?)".into());
    }
    Ok(map)
}

/// One `field:value` of `INFO section`.
pub fn info_field(con: &mut redis::Connection, section: &str, field: &str) -> Option<String> {
    let text: String = redis::cmd("INFO").arg(section).query(con).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Remove every key under `pattern` on the node `addr` (SCAN + UNLINK), returning how many went.
pub fn unlink_matching(
    addr: &str,
    hs: &Handshake,
    t: Timeouts,
    pattern: &str,
) -> Result<u64, String> {
    let mut con = control_conn(addr, hs, t).map_err(|e| format!("redis {addr}: {e}"))?;
    let mut cursor: u64 = 0;
    let mut removed = 0u64;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(&mut con)
            .map_err(|e| format!("redis {addr}: SCAN: {e}"))?;
        if !keys.is_empty() {
            // One UNLINK per key: in a cluster, keys of different slots cannot share a command.
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("UNLINK").arg(k);
            }
            let counts: Vec<u64> = pipe
                .query(&mut con)
                .map_err(|e| format!("redis {addr}: UNLINK: {e}"))?;
            removed += counts.iter().sum::<u64>();
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_credentials_and_db() {
        let (addr, hs, tls) = parse_url("redis://alice:s3cret@127.0.0.1:7000/3").unwrap();
        assert_eq!(addr, "127.0.0.1:7000");
        assert!(!tls);
        assert_eq!(hs.username.as_deref(), Some("alice"));
        assert_eq!(hs.password.as_deref(), Some("s3cret"));
        assert_eq!(hs.db, 3);
        let (addr, hs, tls) = parse_url("rediss://:pw@h:1").unwrap();
        assert_eq!(
            (addr.as_str(), hs.password.as_deref(), tls),
            ("h:1", Some("pw"), true)
        );
        let e = parse_url("redis+unix:///tmp/redis.sock").unwrap_err();
        assert!(e.contains("unix sockets"), "{e}");
        assert!(parse_url("not a url").is_err());
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://:pw@h:1"), "redis://:***@h:1");
    }

    #[test]
    fn slot_map_parses_and_rejects_garbage() {
        let node = |p: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(p),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let v = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(8191), node(7000)]),
            Value::Array(vec![Value::Int(8192), Value::Int(16383), node(7001)]),
        ]);
        let m = parse_slots(&v).unwrap();
        assert_eq!(m.nodes, ["127.0.0.1:7000", "127.0.0.1:7001"]);
        assert_eq!(m.owner[8191], 0);
        assert_eq!(m.owner[8192], 1);
        let bad = Value::Array(vec![Value::Array(vec![
            Value::Int(5),
            Value::Int(99999),
            node(1),
        ])]);
        assert!(parse_slots(&bad).is_err());
        assert!(parse_slots(&Value::Int(1)).is_err());
        assert!(parse_slots(&Value::Array(vec![])).is_err());
    }
}
