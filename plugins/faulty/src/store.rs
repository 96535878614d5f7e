//! The in-memory store behind the faults, with a checksum per chunk, and the per-item work of put and
//! get (where item-level faults are injected).

use crate::dice::Dice;
use crate::options::FaultPlan;
use kvhost_plugin_sdk::{Batch, ChunkMeta, Get, Put, Status};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

struct Stored {
    data: Vec<u8>,
    meta: ChunkMeta,
    checksum: u64,
}

/// The fault an item of a put or get gets, if any.
enum ItemFault {
    None,
    /// Left without a status.
    Unreported,
    /// Failed with IO.
    Failed,
}

/// Roll the item-level faults of `plan` (none unless `faulty`), counting what is injected.
fn item_fault(plan: &FaultPlan, dice: &Dice, injected: &Injected, faulty: bool) -> ItemFault {
    if faulty && dice.roll(plan.unreported_rate) {
        Injected::bump(&injected.unreported);
        ItemFault::Unreported
    } else if faulty && dice.roll(plan.error_rate) {
        Injected::bump(&injected.errors);
        ItemFault::Failed
    } else {
        ItemFault::None
    }
}

/// Counts of the faults injected (reported by `health`).
#[derive(Default)]
pub struct Injected {
    /// Items failed with IO.
    pub errors: AtomicU64,
    /// Requests hung.
    pub hangs: AtomicU64,
    /// Gets whose bytes were corrupted.
    pub corrupted: AtomicU64,
    /// Of those, caught by the checksum and reported CORRUPT.
    pub caught: AtomicU64,
    /// Items left without a status.
    pub unreported: AtomicU64,
}

impl Injected {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Chunks by canonical key, and the bytes they take.
#[derive(Default)]
pub struct Store {
    chunks: Mutex<(HashMap<String, Stored>, u64)>,
}

fn checksum(data: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(data)
}

impl Store {
    /// Chunks and bytes held.
    pub fn usage(&self) -> (usize, u64) {
        let g = self.chunks.lock();
        (g.0.len(), g.1)
    }

    /// The metadata of `key`, if held.
    pub fn meta(&self, key: &str) -> Option<ChunkMeta> {
        self.chunks.lock().0.get(key).map(|s| s.meta)
    }

    /// Remove `key`; whether it was held.
    pub fn remove(&self, key: &str) -> bool {
        let mut g = self.chunks.lock();
        match g.0.remove(key) {
            Some(s) => {
                g.1 -= s.data.len() as u64;
                true
            }
            None => false,
        }
    }

    /// Remove everything.
    pub fn clear(&self) {
        let mut g = self.chunks.lock();
        g.0.clear();
        g.1 = 0;
    }

    /// Store every item of `batch`, injecting item faults when `faulty`.
    pub fn put(
        &self,
        batch: &Batch<Put>,
        plan: &FaultPlan,
        dice: &Dice,
        injected: &Injected,
        faulty: bool,
    ) {
        for i in 0..batch.len() {
            match item_fault(plan, dice, injected, faulty) {
                ItemFault::None => {}
                ItemFault::Unreported => continue,
                ItemFault::Failed => {
                    batch.set_status(i, Status::IO);
                    continue;
                }
            }
            let data = batch.data(i);
            let key = batch.key(i).canonical().to_string();
            let mut g = self.chunks.lock();
            let old = g.0.get(&key).map_or(0, |s| s.data.len() as u64);
            if g.1 - old + data.len() as u64 > plan.capacity_bytes {
                drop(g);
                batch.set_status(i, Status::NO_SPACE);
                continue;
            }
            g.1 = g.1 - old + data.len() as u64;
            g.0.insert(
                key,
                Stored {
                    data: data.to_vec(),
                    meta: batch.meta(i),
                    checksum: checksum(data),
                },
            );
            drop(g);
            batch.set_status(i, Status::OK);
        }
    }

    /// Read every item of `batch`, injecting item faults when `faulty`.
    pub fn get(
        &self,
        batch: &mut Batch<Get>,
        plan: &FaultPlan,
        dice: &Dice,
        injected: &Injected,
        faulty: bool,
    ) {
        for i in 0..batch.len() {
            match item_fault(plan, dice, injected, faulty) {
                ItemFault::None => {}
                ItemFault::Unreported => continue,
                ItemFault::Failed => {
                    batch.set_status(i, Status::IO);
                    continue;
                }
            }
            let found = {
                let g = self.chunks.lock();
                let key = batch.key(i);
                g.0.get(key.canonical())
                    .map(|s| (s.data.clone(), s.meta, s.checksum))
            };
            let Some((mut data, meta, sum)) = found else {
                batch.set_status(i, Status::NOT_FOUND);
                continue;
            };
            if faulty && !data.is_empty() && dice.roll(plan.corrupt_rate) {
                // Wrong bytes, right length: flip a few bits of one byte.
                let at = (dice.word() % data.len() as u64) as usize;
                data[at] ^= 0x5a;
                Injected::bump(&injected.corrupted);
            }
            if plan.checksums && checksum(&data) != sum {
                Injected::bump(&injected.caught);
                batch.set_status(i, Status::CORRUPT);
                continue;
            }
            batch.fill(i, &data, meta);
        }
    }
}
