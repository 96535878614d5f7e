//! The CPU hot cache: one pre-allocated arena, an O(1) allocator over it, a sharded index and the
//! eviction policies LMCache offers.
//!
//! Allocation scheme (see [`alloc`]): two-level segregated fit (TLSF) over fixed units of the arena,
//! with all metadata outside the arena. Full chunks of one model all have the same size, so after
//! warm-up each allocation reuses a block of exactly that size (found in O(1) in its size class);
//! tail chunks are smaller and are split from, and coalesced back into, larger free blocks. Capacity
//! is accounted exactly, in bytes of allocated blocks.

pub mod alloc;
pub mod arena;
pub mod copy_pool;
mod hot;
mod index;
pub mod policy;

pub use alloc::{Allocator, Block};
pub use arena::ArenaOptions;
pub use copy_pool::CopyPool;
pub use hot::{
    CacheConfig, CacheCounters, CacheError, CacheSnapshot, ChunkHandle, EvictHook, HotCache,
    StagedBlock,
};
pub use policy::{Policy, PolicyKind};
