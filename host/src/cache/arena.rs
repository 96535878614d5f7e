//! The hot cache's memory: one anonymous mapping, made once, never grown or freed while the cache
//! lives. Streaming copies run at full memory bandwidth only inside one large mapped region (separate
//! heap allocations per chunk run at about a fifth of it), so every chunk lives in this arena.

use super::alloc::Block;
use memmap2::{MmapMut, MmapOptions, MmapRaw};

/// How to map the arena.
#[derive(Clone, Copy, Debug, Default)]
pub struct ArenaOptions {
    /// Ask for explicit huge pages (`MAP_HUGETLB`, 2 MiB) first; transparent huge pages are always
    /// requested with `madvise(MADV_HUGEPAGE)`.
    pub explicit_huge_pages: bool,
    /// Touch every page now (`MAP_POPULATE`) instead of on first use.
    pub prefault: bool,
}

/// The mapped region.
pub struct Arena {
    /// Raw: blocks are written through pointers from `&self`, which must not come from
    /// `MmapMut`'s read-only `Deref`.
    map: MmapRaw,
    huge_pages: &'static str,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("len", &self.map.len())
            .field("huge_pages", &self.huge_pages)
            .finish()
    }
}

/// An anonymous mapping of `len` bytes with transparent huge pages requested, touched now when
/// `prefault`; returns it and which huge pages it asked for.
///
/// The request comes before any page is touched: `MAP_POPULATE` faults every page in at `mmap`
/// time, before `madvise(MADV_HUGEPAGE)` can apply, so a populated mapping got 4 KiB pages only
/// (a prefaulted 1 GiB arena showed 0 kB of `AnonHugePages` in `smaps`).
pub(crate) fn map_anonymous(
    len: usize,
    prefault: bool,
) -> std::io::Result<(MmapMut, &'static str)> {
    let mut map = MmapOptions::new().len(len.max(1)).map_anon()?;
    let huge_pages = match map.advise(memmap2::Advice::HugePage) {
        Ok(()) => "transparent (MADV_HUGEPAGE)",
        Err(_) => "none",
    };
    if prefault {
        match map.advise(memmap2::Advice::PopulateWrite) {
            Ok(()) => {}
            // Kernels before 5.14 have no MADV_POPULATE_WRITE: touch every page instead.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                map.iter_mut().step_by(4096).for_each(|b| *b = 0);
            }
            // Out of memory (a cgroup limit, say): touching every page would only get the process
            // killed. Leave the pages to be faulted in on first use, as without `prefault`.
            Err(e) => tracing::warn!(
                target: "kvhost::cache",
                "could not prefault {len} bytes ({e}); pages will be faulted in on first use"
            ),
        }
    }
    Ok((map, huge_pages))
}

impl Arena {
    /// Map `len` bytes.
    pub fn new(len: usize, opts: ArenaOptions) -> std::io::Result<Arena> {
        let len = len.max(4096);
        if opts.explicit_huge_pages {
            let mut huge = MmapOptions::new();
            // A whole number of huge pages, or `munmap` at drop fails and leaks them.
            huge.len(len.next_multiple_of(2 << 20)).huge(Some(21));
            if opts.prefault {
                huge.populate();
            }
            if let Ok(map) = huge.map_anon() {
                return Ok(Arena {
                    map: MmapRaw::from(map),
                    huge_pages: "explicit 2 MiB (MAP_HUGETLB)",
                });
            }
            tracing::info!(target: "kvhost::cache", "no explicit huge pages available; using transparent huge pages");
        }
        let (map, huge_pages) = map_anonymous(len, opts.prefault)?;
        Ok(Arena {
            map: MmapRaw::from(map),
            huge_pages,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never true: an arena has at least one page.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Which huge pages the arena got.
    pub fn huge_pages(&self) -> &'static str {
        self.huge_pages
    }

    /// The start of the mapping.
    pub(crate) fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// The bytes of `block`, first `len` of them.
    ///
    /// # Safety
    /// `block` must lie inside the arena, and no one may write it while the slice lives (the cache
    /// guarantees this: a committed block is immutable until freed, and it is not freed while a handle
    /// to it exists).
    pub(crate) unsafe fn bytes(&self, block: Block, len: u64) -> &[u8] {
        debug_assert!(block.offset + len <= self.len() as u64 && len <= block.len);
        // SAFETY: inside the mapping (caller), immutable for the borrow (caller).
        unsafe { std::slice::from_raw_parts(self.base().add(block.offset as usize), len as usize) }
    }

    /// The whole of `block`, writable.
    ///
    /// # Safety
    /// `block` must lie inside the arena and be owned exclusively by the caller (an uncommitted block).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn bytes_mut(&self, block: Block) -> &mut [u8] {
        debug_assert!(block.offset + block.len <= self.len() as u64);
        // SAFETY: inside the mapping and exclusively owned (caller).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base().add(block.offset as usize),
                block.len as usize,
            )
        }
    }
}

// SAFETY: the arena is plain memory; access to each block is serialised by the cache's ownership rules.
unsafe impl Sync for Arena {}
