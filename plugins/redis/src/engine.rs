//! The operations: pipelines per node over pooled data connections, retries after `MOVED` or a
//! failover, fail-fast while a node is down.

use crate::control::{self, Topology};
use crate::layout::{part_head, Head, Names, HEAD_LEN, PART_HEAD_LEN};
use crate::resp::{BulkInto, Conn, Reply};
use kvhost_plugin_sdk::log;
use kvhost_plugin_sdk::{Batch, ChunkMeta, Error, Get, Put, Status};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A request is retried on a fresh slot map at most this many times (after `MOVED`, `ASK`,
/// `READONLY`, or a lost connection in a cluster).
const MAX_PASSES: usize = 3;
/// Bytes of GET replies (at most one part each) kept in flight per connection.
const GET_WINDOW_BYTES: usize = 8 << 20;

/// Settings of the data path.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Key prefix.
    pub prefix: String,
    /// Values longer than this are split into parts of this size.
    pub part_size: usize,
    /// `EX` seconds on every key (0: none).
    pub ttl_s: u64,
    /// How long a node that failed stays marked down (calls to it fail at once meanwhile).
    pub down_for: Duration,
    /// Idle connections kept per node.
    pub idle_per_node: usize,
}

/// The outcome of one item in one pass.
#[derive(Clone, Debug)]
enum Verdict {
    Done(Status),
    /// Try again after refreshing the slot map.
    Retry,
}

/// Why a node could not be used.
#[derive(Debug)]
struct NodeError {
    status: Status,
    message: String,
    /// The connection broke (worth a slot-map refresh in a cluster).
    connection: bool,
}

/// The engine shared by the worker threads and the host's synchronous calls.
#[derive(Debug)]
pub struct Engine {
    topo: Topology,
    s: Settings,
    idle: Mutex<HashMap<String, Vec<Conn>>>,
    down: Mutex<HashMap<String, (Instant, String)>>,
    gen: AtomicU64,
}

fn io_status(e: &io::Error) -> Status {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Status::TIMEOUT,
        io::ErrorKind::InvalidData => Status::IO,
        _ => Status::UNAVAILABLE,
    }
}

/// A server error reply, classified.
fn classify(topo: &Topology, err: &str) -> Verdict {
    let mut words = err.split_whitespace();
    match words.next().unwrap_or("") {
        "MOVED" => {
            if let (Some(slot), Some(addr)) =
                (words.next().and_then(|s| s.parse().ok()), words.next())
            {
                topo.moved(slot, addr);
            }
            Verdict::Retry
        }
        "ASK" | "TRYAGAIN" | "READONLY" | "MASTERDOWN" | "LOADING" if topo.is_cluster() => {
            Verdict::Retry
        }
        "OOM" => Verdict::Done(Status::NO_SPACE),
        "CLUSTERDOWN" | "LOADING" | "MASTERDOWN" | "BUSY" => Verdict::Done(Status::UNAVAILABLE),
        _ => Verdict::Done(Status::IO),
    }
}

impl Engine {
    /// An engine over `topo`.
    pub fn new(topo: Topology, s: Settings) -> Engine {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((std::process::id() as u64) << 32);
        Engine {
            topo,
            s,
            idle: Mutex::new(HashMap::new()),
            down: Mutex::new(HashMap::new()),
            gen: AtomicU64::new(seed),
        }
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.s
    }

    fn names(&self, key_hash: u64, canonical: &str) -> Names {
        Names::new(&self.s.prefix, key_hash, canonical)
    }

    fn next_gen(&self, key_hash: u64) -> u64 {
        let n = self.gen.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        xxhash_rust::xxh3::xxh3_64_with_seed(&key_hash.to_le_bytes(), n)
    }

    /// Run `f` on a pooled connection to `node`. No lock is held while `f` runs. A node that failed is
    /// not retried for `down_for`: calls fail at once with its last error.
    fn with_conn<R>(
        &self,
        node: &str,
        f: impl FnOnce(&mut Conn) -> io::Result<R>,
    ) -> Result<R, NodeError> {
        if let Some((until, why)) = self.down.lock().get(node) {
            let now = Instant::now();
            if now < *until {
                return Err(NodeError {
                    status: Status::UNAVAILABLE,
                    message: format!(
                        "redis {node} is down ({why}); next attempt in {} ms",
                        (*until - now).as_millis()
                    ),
                    connection: true,
                });
            }
        }
        let pooled = self.idle.lock().get_mut(node).and_then(Vec::pop);
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let t = self.topo.timeouts();
                match Conn::connect(node, t.connect, t.command, self.handshake()) {
                    Ok(c) => c,
                    Err(e) => {
                        let message = format!("cannot connect to redis {node}: {e}");
                        self.mark_down(node, &e.to_string());
                        let status = if e.kind() == io::ErrorKind::PermissionDenied {
                            Status::IO
                        } else {
                            Status::UNAVAILABLE
                        };
                        return Err(NodeError {
                            status,
                            message,
                            connection: true,
                        });
                    }
                }
            }
        };
        match f(&mut conn) {
            Ok(r) => {
                self.down.lock().remove(node);
                let mut idle = self.idle.lock();
                let list = idle.entry(node.to_string()).or_default();
                if list.len() < self.s.idle_per_node {
                    list.push(conn);
                }
                Ok(r)
            }
            Err(e) => {
                // The stream's state is unknown: the connection is dropped, and so are its idle
                // siblings (a restarted server closed them all).
                self.idle.lock().remove(node);
                self.mark_down(node, &e.to_string());
                Err(NodeError {
                    status: io_status(&e),
                    message: e.to_string(),
                    connection: true,
                })
            }
        }
    }

    fn handshake(&self) -> &crate::resp::Handshake {
        self.topo.handshake()
    }

    fn mark_down(&self, node: &str, why: &str) {
        if self.s.down_for.is_zero() {
            return;
        }
        self.down.lock().insert(
            node.to_string(),
            (Instant::now() + self.s.down_for, why.to_string()),
        );
    }

    /// Run `session` per node over `names`, retrying what asks for it on a fresh slot map. Returns each
    /// item's final status and the first error message.
    fn drive(
        &self,
        names: &[Names],
        mut session: impl FnMut(&mut Conn, &[usize], &mut [Option<Verdict>]) -> io::Result<()>,
    ) -> (Vec<Status>, Option<String>) {
        let n = names.len();
        let mut done: Vec<Option<Status>> = vec![None; n];
        let mut first_error: Option<String> = None;
        let mut todo: Vec<usize> = (0..n).collect();
        for pass in 0..MAX_PASSES {
            let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            let mut retry = Vec::new();
            for &i in &todo {
                match self.topo.node_for(names[i].slot_key()) {
                    Some(node) => groups.entry(node).or_default().push(i),
                    None => retry.push(i),
                }
            }
            let mut refresh = !retry.is_empty();
            for (node, items) in groups {
                let mut verdicts: Vec<Option<Verdict>> = vec![None; n];
                match self.with_conn(&node, |c| session(c, &items, &mut verdicts)) {
                    Ok(()) => {
                        for &i in &items {
                            match verdicts[i].take() {
                                Some(Verdict::Done(s)) => done[i] = Some(s),
                                Some(Verdict::Retry) => {
                                    refresh = true;
                                    retry.push(i)
                                }
                                None => done[i] = Some(Status::INTERNAL),
                            }
                        }
                    }
                    Err(e) => {
                        log::debug!("{}", e.message);
                        if self.topo.is_cluster() && e.connection && pass + 1 < MAX_PASSES {
                            refresh = true;
                            retry.extend_from_slice(&items);
                        } else {
                            first_error.get_or_insert(e.message);
                            items.iter().for_each(|&i| done[i] = Some(e.status));
                        }
                    }
                }
            }
            if retry.is_empty() {
                break;
            }
            if refresh && self.topo.is_cluster() {
                if let Err(e) = self.topo.refresh() {
                    first_error.get_or_insert(e);
                }
            }
            todo = retry;
        }
        let statuses = done
            .into_iter()
            .map(|s| {
                s.unwrap_or_else(|| {
                    first_error.get_or_insert_with(|| {
                        "redis cluster: slots kept moving (or stayed unowned) over 3 attempts"
                            .into()
                    });
                    Status::UNAVAILABLE
                })
            })
            .collect();
        (statuses, first_error)
    }

    /// Store the chunks of a put request; sets every item's status. Returns an error message to report
    /// with the completion, if any item failed for a reason beyond the item itself.
    pub fn put(&self, p: &Batch<Put>) -> Option<String> {
        let names: Vec<Names> = (0..p.len())
            .map(|i| {
                let k = p.key(i);
                self.names(k.key_hash(), k.canonical())
            })
            .collect();
        let heads: Vec<Head> = (0..p.len())
            .map(|i| {
                let len = p.data(i).len();
                let split = len > self.s.part_size;
                Head {
                    len: len as u64,
                    parts: if split {
                        len.div_ceil(self.s.part_size) as u32
                    } else {
                        0
                    },
                    part_size: if split { self.s.part_size as u32 } else { 0 },
                    gen: self.next_gen(p.key(i).key_hash()),
                    meta: ChunkMeta {
                        length: len as u64,
                        ..p.meta(i)
                    },
                }
            })
            .collect();
        let ttl = self.s.ttl_s;
        let topo = &self.topo;
        let (statuses, err) = self.drive(&names, |c, items, verdicts| {
            // Phase 1: inline values, and every part of split ones.
            for &i in items {
                let h = &heads[i];
                let data = p.data(i);
                if h.parts == 0 {
                    c.push_set(&names[i].manifest(), &h.encode(), data, ttl, false)?;
                } else {
                    for part in 0..h.parts {
                        let ph = part_head(h.gen, part);
                        c.push_set(
                            &names[i].part(h.gen, part),
                            &ph,
                            &data[h.part_range(part)],
                            ttl,
                            false,
                        )?;
                    }
                }
            }
            c.flush()?;
            let mut manifests = Vec::new();
            for &i in items {
                let replies = heads[i].parts.max(1);
                let mut verdict = Verdict::Done(Status::OK);
                for _ in 0..replies {
                    match c.read_reply()? {
                        Reply::Simple(_) => {}
                        Reply::Error(e) => {
                            if matches!(verdict, Verdict::Done(Status::OK)) {
                                log::debug!("redis put {}: {e}", p.key(i).canonical());
                                verdict = classify(topo, &e);
                            }
                        }
                        other => {
                            verdict = Verdict::Done(Status::IO);
                            log::warn!(
                                "redis put {}: unexpected reply {other:?}",
                                p.key(i).canonical()
                            );
                        }
                    }
                }
                match verdict {
                    Verdict::Done(Status::OK) if heads[i].parts > 0 => manifests.push(i),
                    Verdict::Done(Status::OK) => verdicts[i] = Some(verdict),
                    v => {
                        if heads[i].parts > 0 {
                            // The parts of this write that made it are referenced by nothing: drop
                            // them. An older manifest and its parts are untouched and stay readable.
                            for part in 0..heads[i].parts {
                                c.push(&[b"UNLINK", &names[i].part(heads[i].gen, part)]);
                            }
                            c.flush()?;
                            for _ in 0..heads[i].parts {
                                c.read_reply()?;
                            }
                        }
                        verdicts[i] = Some(v);
                    }
                }
            }
            // Phase 2: manifests, only after every part of their chunk was acknowledged.
            // `GET` returns the manifest replaced, whose parts are then unlinked.
            for &i in &manifests {
                c.push_set(&names[i].manifest(), &heads[i].encode(), &[], ttl, true)?;
            }
            c.flush()?;
            let mut garbage = Vec::new();
            for &i in &manifests {
                verdicts[i] = Some(match c.read_reply()? {
                    Reply::Nil => Verdict::Done(Status::OK),
                    Reply::Bulk(old) => {
                        if let Ok(h) = Head::decode(&old) {
                            if h.parts > 0 && h.gen != heads[i].gen {
                                garbage.extend((0..h.parts).map(|part| names[i].part(h.gen, part)));
                            }
                        }
                        Verdict::Done(Status::OK)
                    }
                    Reply::Error(e) => classify(topo, &e),
                    _ => Verdict::Done(Status::IO),
                });
            }
            for key in &garbage {
                c.push(&[b"UNLINK", key]);
            }
            c.flush()?;
            for _ in &garbage {
                c.read_reply()?;
            }
            Ok(())
        });
        for (i, s) in statuses.into_iter().enumerate() {
            p.set_status(i, s);
        }
        err
    }

    /// Read the chunks of a get request into the host's buffers; sets every item's status.
    pub fn get(&self, p: &mut Batch<Get>) -> Option<String> {
        let names: Vec<Names> = (0..p.len())
            .map(|i| {
                let k = p.key(i);
                self.names(k.key_hash(), k.canonical())
            })
            .collect();
        let topo = &self.topo;
        let window = (GET_WINDOW_BYTES / self.s.part_size).clamp(2, 64);
        let (statuses, err) = self.drive(&names, |c, items, verdicts| {
            // A window of GETs in flight: deep enough to hide the round trip, shallow enough that the
            // server does not build a long reply list of large values for this connection (which
            // costs it a copy and an allocation per reply).
            for &i in items.iter().take(window) {
                c.push(&[b"GET", &names[i].manifest()]);
            }
            c.flush()?;
            let mut split: Vec<(usize, Head)> = Vec::new();
            let mut head = [0u8; HEAD_LEN];
            for (j, &i) in items.iter().enumerate() {
                if let Some(&next) = items.get(j + window) {
                    c.push(&[b"GET", &names[next].manifest()]);
                    c.flush()?;
                }
                let got = c.read_bulk_into(&mut head, p.dst(i))?;
                verdicts[i] = Some(match got {
                    BulkInto::Nil => Verdict::Done(Status::NOT_FOUND),
                    BulkInto::Error(e) => classify(topo, &e),
                    BulkInto::Unexpected(r) => {
                        log::warn!("redis get {}: unexpected reply {r:?}", p.key(i).canonical());
                        Verdict::Done(Status::NOT_FOUND)
                    }
                    BulkInto::Misfit { len } if len >= HEAD_LEN => {
                        p.set_too_small(i, len - HEAD_LEN);
                        Verdict::Done(Status::BUFFER_TOO_SMALL)
                    }
                    BulkInto::Misfit { len } => {
                        log::warn!(
                            "redis get {}: {len}-byte value is not a kvhost chunk (ignored)",
                            p.key(i).canonical()
                        );
                        Verdict::Done(Status::NOT_FOUND)
                    }
                    BulkInto::Read { len } => match Head::decode(&head) {
                        Err(why) => {
                            log::warn!("redis get {}: {why} (ignored)", p.key(i).canonical());
                            Verdict::Done(Status::NOT_FOUND)
                        }
                        Ok(h) if h.parts == 0 && len as u64 == HEAD_LEN as u64 + h.len => {
                            p.set_found(i, h.len as usize, h.meta);
                            Verdict::Done(Status::OK)
                        }
                        Ok(h) if h.parts > 0 && len == HEAD_LEN => {
                            if h.len as usize > p.capacity(i) {
                                p.set_too_small(i, h.len as usize);
                                Verdict::Done(Status::BUFFER_TOO_SMALL)
                            } else {
                                // Decided by its parts, below.
                                split.push((i, h));
                                continue;
                            }
                        }
                        Ok(h) => {
                            log::warn!(
                                "redis get {}: value of {len} bytes does not match its header ({} bytes, {} parts)",
                                p.key(i).canonical(),
                                h.len,
                                h.parts
                            );
                            Verdict::Done(Status::NOT_FOUND)
                        }
                    },
                });
            }
            // Split chunks: every part straight into its place in the host's buffer.
            let part_keys: Vec<Vec<u8>> = split
                .iter()
                .flat_map(|(i, h)| (0..h.parts).map(|part| names[*i].part(h.gen, part)))
                .collect();
            for key in part_keys.iter().take(window) {
                c.push(&[b"GET", key]);
            }
            c.flush()?;
            let mut ph = [0u8; PART_HEAD_LEN];
            let mut sent = window.min(part_keys.len());
            for (i, h) in &split {
                let mut whole = true;
                for part in 0..h.parts {
                    if let Some(key) = part_keys.get(sent) {
                        c.push(&[b"GET", key]);
                        c.flush()?;
                        sent += 1;
                    }
                    let range = h.part_range(part);
                    let want = range.len();
                    let got = c.read_bulk_into(&mut ph, &mut p.dst(*i)[range])?;
                    let ok = matches!(got, BulkInto::Read { len } if len == PART_HEAD_LEN + want)
                        && ph == part_head(h.gen, part);
                    if whole && !ok {
                        log::debug!(
                            "redis get {}: part {part} of {} missing or from another write: a miss",
                            p.key(*i).canonical(),
                            h.parts
                        );
                    }
                    whole &= ok;
                }
                verdicts[*i] = Some(if whole {
                    p.set_found(*i, h.len as usize, h.meta);
                    Verdict::Done(Status::OK)
                } else {
                    Verdict::Done(Status::NOT_FOUND)
                });
            }
            Ok(())
        });
        for (i, s) in statuses.into_iter().enumerate() {
            // Hits and too-small items already carry their lengths.
            if s != Status::OK && s != Status::BUFFER_TOO_SMALL {
                p.set_status(i, s);
            }
        }
        err
    }

    /// `contains`: the manifest header of each key (`GETRANGE 0 63`). `None` for absent keys.
    pub fn contains(
        &self,
        keys: &[(u64, &str)],
    ) -> (Vec<Result<Option<ChunkMeta>, Status>>, Option<String>) {
        let names: Vec<Names> = keys.iter().map(|(h, c)| self.names(*h, c)).collect();
        let mut found: Vec<Option<ChunkMeta>> = vec![None; keys.len()];
        let topo = &self.topo;
        let end = (HEAD_LEN - 1).to_string();
        let (statuses, err) = self.drive(&names, |c, items, verdicts| {
            for &i in items {
                c.push(&[b"GETRANGE", &names[i].manifest(), b"0", end.as_bytes()]);
            }
            c.flush()?;
            for &i in items {
                verdicts[i] = Some(match c.read_reply()? {
                    Reply::Bulk(b) if b.is_empty() => Verdict::Done(Status::NOT_FOUND),
                    Reply::Bulk(b) => match Head::decode(&b) {
                        Ok(h) => {
                            found[i] = Some(h.meta);
                            Verdict::Done(Status::OK)
                        }
                        Err(_) => Verdict::Done(Status::NOT_FOUND),
                    },
                    Reply::Nil => Verdict::Done(Status::NOT_FOUND),
                    Reply::Error(e) => classify(topo, &e),
                    _ => Verdict::Done(Status::IO),
                });
            }
            Ok(())
        });
        let out = statuses
            .into_iter()
            .zip(found)
            .map(|(s, m)| match s {
                Status::OK => Ok(m),
                Status::NOT_FOUND => Ok(None),
                s => Err(s),
            })
            .collect();
        (out, err)
    }

    /// `remove`: the manifest first (the chunk disappears at once), then its parts.
    pub fn remove(&self, keys: &[(u64, &str)]) -> (Vec<Status>, Option<String>) {
        let names: Vec<Names> = keys.iter().map(|(h, c)| self.names(*h, c)).collect();
        let topo = &self.topo;
        let end = (HEAD_LEN - 1).to_string();
        self.drive(&names, |c, items, verdicts| {
            for &i in items {
                c.push(&[b"GETRANGE", &names[i].manifest(), b"0", end.as_bytes()]);
                c.push(&[b"UNLINK", &names[i].manifest()]);
            }
            c.flush()?;
            let mut parts = Vec::new();
            for &i in items {
                let head = c.read_reply()?;
                let unlinked = c.read_reply()?;
                verdicts[i] = Some(match unlinked {
                    Reply::Int(1) => {
                        if let Reply::Bulk(b) = head {
                            if let Ok(h) = Head::decode(&b) {
                                parts.push((i, h.parts, h.gen));
                            }
                        }
                        Verdict::Done(Status::OK)
                    }
                    Reply::Int(_) => Verdict::Done(Status::NOT_FOUND),
                    Reply::Error(e) => classify(topo, &e),
                    _ => Verdict::Done(Status::IO),
                });
            }
            let mut replies = 0;
            for (i, n, gen) in &parts {
                for part in 0..*n {
                    c.push(&[b"UNLINK", &names[*i].part(*gen, part)]);
                    replies += 1;
                }
            }
            c.flush()?;
            for _ in 0..replies {
                c.read_reply()?;
            }
            Ok(())
        })
    }

    /// `clear`: every key under the prefix, on every master.
    pub fn clear(&self) -> Result<u64, Error> {
        let pattern = format!("{}*", glob_escape(&self.s.prefix));
        let mut removed = 0;
        for node in self.topo.masters() {
            removed += control::unlink_matching(
                &node,
                self.topo.handshake(),
                self.topo.timeouts(),
                &pattern,
            )
            .map_err(|e| Error::new(Status::UNAVAILABLE, e))?;
        }
        Ok(removed)
    }

    /// `health`: PING every master; a line naming each and its state.
    pub fn health(&self) -> Result<String, Error> {
        if self.topo.is_cluster() {
            let _ = self.topo.refresh();
        }
        let mut parts = Vec::new();
        let mut bad = Vec::new();
        for node in self.topo.masters() {
            let r = control::control_conn(&node, self.topo.handshake(), self.topo.timeouts())
                .and_then(|mut c| {
                    redis::cmd("PING").query::<String>(&mut c)?;
                    Ok(control::info_field(&mut c, "memory", "used_memory_human")
                        .unwrap_or_default())
                });
            match r {
                Ok(mem) => parts.push(format!("{node} up (used_memory {mem})")),
                Err(e) => bad.push(format!("{node} down: {e}")),
            }
        }
        if !self.topo.covered() {
            bad.push("some cluster slots have no master".into());
        }
        if bad.is_empty() {
            Ok(parts.join("; "))
        } else {
            Err(Error::new(
                Status::UNAVAILABLE,
                format!("{}; {}", bad.join("; "), parts.join("; ")),
            ))
        }
    }
}

/// Escape Redis glob metacharacters so a prefix matches only itself.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
