//! One KV pool per served model (Linux): the full-attention layers' keys and values of
//! every slot live in one memory file (`memfd`), and sequences whose prompts start alike
//! share the pages of that prefix — a common system prompt is stored once, not once per slot.
//!
//! Each slot owns a fixed region of the file (its layers' buffers, page-aligned, one after
//! another) and maps it once, so its buffers are contiguous and attention reads them as
//! before. Sharing maps the donor's whole pages of the prefix over the same places of the
//! taker's region (the same page twice in one address space, as vAttention does, instead
//! of teaching every attention kernel to follow page lists); the page holding the last
//! shared row is copied, so a sequence only ever writes its own pages. Memory is taken as
//! pages are written and given back (hole punched) when a sequence is cut short, so the
//! pool's cost is the pages sequences hold, counted once however many map them
//! ([`KvPool::pages_used`]). The process's RSS counts a page once per mapping; the memory
//! cgroup and PSS count it once.
//!
//! Invariant: a page mapped into another slot's region is never written. A slot writes
//! only at and after its length; before its length shrinks ([`KvPool::release`]), every
//! slot that maps its pages from there on gets its own copy first.
//!
//! The only `unsafe` of this crate lives here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

/// A slot's region: its full-attention layers' K and V buffers, each page-aligned.
pub struct KvPool {
    fd: OwnedFd,
    page: usize,
    /// Each buffer's byte offset in a region and its bytes per row.
    buffers: Vec<(usize, usize)>,
    /// Bytes of one slot's region (a whole number of pages).
    region: usize,
    n_ctx: usize,
    state: Mutex<Vec<SlotMap>>,
}

struct SlotMap {
    /// The region's address while a cache maps it (0 otherwise).
    base: usize,
    /// For each page of the region, the slot whose file page is mapped there.
    src: Vec<u16>,
}

/// A slot's mapped region, held by its [`crate::KvCache`]; unmapped when dropped.
pub struct PoolRegion {
    pool: Arc<KvPool>,
    slot: usize,
    base: *mut u8,
}

// SAFETY: the region is plain memory owned by this value (other slots only read pages it
// no longer writes, see the module invariant); moving it to another thread is fine.
unsafe impl Send for PoolRegion {}
// SAFETY: shared references only read the region.
unsafe impl Sync for PoolRegion {}

impl KvPool {
    /// A pool of `n_slots` regions, each holding `n_ctx` rows of buffers of `row_bytes`
    /// bytes per row (every full-attention layer's K, then V).
    pub fn new(n_slots: usize, row_bytes: &[usize], n_ctx: usize) -> io::Result<Arc<KvPool>> {
        let too_big = || io::Error::other("the KV pool would exceed the address space");
        if n_slots == 0 || n_slots > u16::MAX as usize {
            return Err(io::Error::other("a KV pool needs 1 to 65535 slots"));
        }
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let mut buffers = Vec::with_capacity(row_bytes.len());
        let mut region = 0usize;
        for &rb in row_bytes {
            let bytes = rb.checked_mul(n_ctx).ok_or_else(too_big)?;
            buffers.push((region, rb));
            region = region
                .checked_add(bytes.div_ceil(page) * page)
                .ok_or_else(too_big)?;
        }
        let file = region
            .checked_mul(n_slots)
            .filter(|&b| b <= i64::MAX as usize / 2)
            .ok_or_else(too_big)?;
        // SAFETY: the name is a valid C string; the returned descriptor is checked.
        let raw = unsafe { libc::memfd_create(c"hearth-kv".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain system call on our descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), file as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let pages = region / page;
        let state = (0..n_slots)
            .map(|s| SlotMap {
                base: 0,
                src: vec![s as u16; pages],
            })
            .collect();
        Ok(Arc::new(KvPool {
            fd,
            page,
            buffers,
            region,
            n_ctx,
            state: Mutex::new(state),
        }))
    }

    pub fn page_bytes(&self) -> usize {
        self.page
    }

    /// Positions each slot holds.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn slots(&self) -> usize {
        self.lock().len()
    }

    /// Pages of `rows` rows in every buffer (rounded up per buffer): what a sequence of that
    /// length holds.
    pub fn pages_for(&self, rows: usize) -> usize {
        let rows = rows.min(self.n_ctx);
        self.buffers
            .iter()
            .map(|&(_, rb)| (rows * rb).div_ceil(self.page))
            .sum()
    }

    /// Pages of `tokens` positions spread over sequences (a budget), each buffer rounded up
    /// once.
    pub fn pages_for_tokens(&self, tokens: usize) -> usize {
        self.buffers
            .iter()
            .map(|&(_, rb)| tokens.saturating_mul(rb).div_ceil(self.page))
            .sum()
    }

    /// Pages the file holds now (each counted once, however many slots map it).
    pub fn pages_used(&self) -> usize {
        // SAFETY: fstat writes only into `st`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the descriptor is ours.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } != 0 {
            return 0;
        }
        (st.st_blocks as usize * 512) / self.page
    }

    /// Maps slot `slot`'s region (its own pages) for a cache.
    pub fn attach(self: &Arc<Self>, slot: usize) -> io::Result<PoolRegion> {
        let mut state = self.lock();
        let Some(map) = state.get_mut(slot) else {
            return Err(io::Error::other(format!("no KV pool slot {slot}")));
        };
        if map.base != 0 {
            return Err(io::Error::other(format!("KV pool slot {slot} is in use")));
        }
        // SAFETY: a fresh shared mapping of our file's range for this slot, which lies
        // inside the file (`new` sized it); the kernel picks the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.region.max(self.page),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                (slot * self.region) as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        map.base = base as usize;
        map.src.iter_mut().for_each(|s| *s = slot as u16);
        Ok(PoolRegion {
            pool: self.clone(),
            slot,
            base: base.cast(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<SlotMap>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps pages `pages` of slot `dst`'s region to slot `src`'s file pages there.
    fn map_pages(
        &self,
        state: &[SlotMap],
        dst: usize,
        pages: std::ops::Range<usize>,
        src: usize,
    ) -> io::Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        let at = state[dst].base + pages.start * self.page;
        let offset = src * self.region + pages.start * self.page;
        // SAFETY: the range lies inside `dst`'s mapped region (pages < region pages), which
        // this pool mapped and owns; MAP_FIXED replaces only that range, with pages of our
        // own file inside its size.
        let got = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                pages.len() * self.page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Gives slot `dst` its own copy of page `p` (which maps another slot's page now).
    fn privatize(&self, state: &mut [SlotMap], dst: usize, p: usize) -> io::Result<()> {
        let at = (state[dst].base + p * self.page) as *mut u8;
        let mut copy = vec![0u8; self.page];
        // SAFETY: `at` is a mapped page of `dst`'s region, readable.
        unsafe { std::ptr::copy_nonoverlapping(at, copy.as_mut_ptr(), self.page) };
        self.map_pages(state, dst, p..p + 1, dst)?;
        // SAFETY: the page is mapped again (now to `dst`'s own file page), writable.
        unsafe { std::ptr::copy_nonoverlapping(copy.as_ptr(), at, self.page) };
        state[dst].src[p] = dst as u16;
        Ok(())
    }

    /// Slot `slot` keeps its first `rows` rows and may write from there on: every other slot
    /// that maps its pages from there gets its own copy, the slot's own mappings come back
    /// there, and the pages after its rows go back to the system.
    fn release(&self, slot: usize, rows: usize) -> io::Result<()> {
        let mut state = self.lock();
        for &(offset, rb) in &self.buffers {
            let end = (offset + rb * self.n_ctx).div_ceil(self.page);
            let first = (offset + rows * rb) / self.page;
            let partial = !(offset + rows * rb).is_multiple_of(self.page);
            for other in 0..state.len() {
                if other == slot || state[other].base == 0 {
                    continue;
                }
                for p in first..end {
                    if state[other].src[p] as usize == slot {
                        self.privatize(&mut state, other, p)?;
                    }
                }
            }
            for p in first..end {
                if state[slot].src[p] as usize != slot {
                    if p == first && partial {
                        self.privatize(&mut state, slot, p)?;
                    } else {
                        self.map_pages(&state, slot, p..p + 1, slot)?;
                        state[slot].src[p] = slot as u16;
                    }
                }
            }
            let free = first + partial as usize;
            if free < end {
                // SAFETY: plain system call on our descriptor, inside the file.
                let r = unsafe {
                    libc::fallocate(
                        self.fd.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        (slot * self.region + free * self.page) as libc::off_t,
                        ((end - free) * self.page) as libc::off_t,
                    )
                };
                if r != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    /// Slot `to` (emptied first) takes slot `from`'s first `rows` rows: the whole pages are
    /// mapped from wherever `from` has them, the rest of the last page is copied.
    fn share(&self, to: usize, from: usize, rows: usize) -> io::Result<()> {
        self.release(to, 0)?;
        let mut state = self.lock();
        if state[from].base == 0 {
            return Err(io::Error::other("the donor slot is not mapped"));
        }
        for &(offset, rb) in &self.buffers {
            let first = offset / self.page;
            let whole = first + rows * rb / self.page;
            // Runs of pages with the same source, one mapping each.
            let mut p = first;
            while p < whole {
                let src = state[from].src[p];
                let mut q = p + 1;
                while q < whole && state[from].src[q] == src {
                    q += 1;
                }
                self.map_pages(&state, to, p..q, src as usize)?;
                state[to].src[p..q].iter_mut().for_each(|s| *s = src);
                p = q;
            }
            let tail = rows * rb % self.page;
            if tail > 0 {
                let (src, dst) = (state[from].base, state[to].base);
                // SAFETY: both are mapped regions of this pool with page `whole` inside; `to`
                // maps its own page there (released above), `from` any page: distinct memory.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (src + whole * self.page) as *const u8,
                        (dst + whole * self.page) as *mut u8,
                        tail,
                    )
                };
            }
        }
        Ok(())
    }
}

impl PoolRegion {
    pub fn slot(&self) -> usize {
        self.slot
    }

    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// Buffer `b` (`n_ctx` rows) as `u16` units.
    pub fn buffer(&self, b: usize) -> &[u16] {
        let (offset, rb) = self.pool.buffers[b];
        // SAFETY: the buffer lies inside the mapped region, page-aligned (so u16-aligned);
        // shared references never coexist with `buffers_mut` (it takes `&mut self`), and
        // the pages other slots map here are only read (module invariant).
        unsafe {
            std::slice::from_raw_parts(
                self.base.add(offset) as *const u16,
                rb * self.pool.n_ctx / 2,
            )
        }
    }

    /// Buffers `a` and `b` (distinct), writable.
    pub fn buffers_mut(&mut self, a: usize, b: usize) -> (&mut [u16], &mut [u16]) {
        assert_ne!(a, b, "two views of one buffer");
        let view = |i: usize| {
            let (offset, rb) = self.pool.buffers[i];
            // SAFETY: as in `buffer`; `a != b` and buffers do not overlap, so the two slices
            // are disjoint, and `&mut self` excludes every other view of this region.
            unsafe {
                std::slice::from_raw_parts_mut(
                    self.base.add(offset) as *mut u16,
                    rb * self.pool.n_ctx / 2,
                )
            }
        };
        (view(a), view(b))
    }

    /// Keeps the first `rows` rows (see [`KvPool::release`]).
    pub fn release(&mut self, rows: usize) -> io::Result<()> {
        self.pool.release(self.slot, rows)
    }

    /// Takes `donor`'s first `rows` rows (see [`KvPool::share`]).
    pub fn share_from(&mut self, donor: &PoolRegion, rows: usize) -> io::Result<()> {
        if !Arc::ptr_eq(&self.pool, &donor.pool) || donor.slot == self.slot {
            return Err(io::Error::other("KV regions of different pools"));
        }
        self.pool.share(self.slot, donor.slot, rows)
    }
}

impl Drop for PoolRegion {
    fn drop(&mut self) {
        // Others keep their copies; this slot's pages go back to the system.
        let _ = self.pool.release(self.slot, 0);
        let mut state = self.pool.lock();
        // SAFETY: unmaps exactly the region `attach` mapped; no view of it outlives `self`.
        unsafe { libc::munmap(self.base.cast(), self.pool.region.max(self.pool.page)) };
        state[self.slot].base = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(r: &mut PoolRegion, rows: std::ops::Range<usize>, tag: u16) {
        let (k, v) = r.buffers_mut(0, 1);
        for row in rows {
            k[row * 3..row * 3 + 3].fill(tag + row as u16);
            v[row * 3..row * 3 + 3].fill(tag + row as u16 + 1);
        }
    }

    /// A shared prefix reads the same in both slots, is stored once, and stays intact when
    /// either slot writes on or the donor starts over.
    #[test]
    fn shared_prefix_is_stored_once_and_never_written_through() {
        // 6-byte rows: pages of 4096 bytes end mid-row, as real rows do.
        let n_ctx = 5000;
        let pool = KvPool::new(3, &[6, 6], n_ctx).unwrap();
        let mut a = pool.attach(0).unwrap();
        let mut b = pool.attach(1).unwrap();
        assert_eq!(pool.pages_used(), 0);
        fill(&mut a, 0..3000, 0);
        let alone = pool.pages_used();
        assert_eq!(alone, pool.pages_for(3000));
        b.share_from(&a, 2500).unwrap();
        // Only the page holding the last shared row was copied, per buffer.
        assert_eq!(pool.pages_used(), alone + 2);
        assert_eq!(b.buffer(0)[..2500 * 3], a.buffer(0)[..2500 * 3]);
        fill(&mut b, 2500..2600, 10_000);
        fill(&mut a, 3000..3100, 20_000);
        let want = |row: usize, tag: u16| tag + row as u16;
        assert_eq!(b.buffer(0)[2499 * 3], want(2499, 0));
        assert_eq!(b.buffer(0)[2500 * 3], want(2500, 10_000));
        assert_eq!(a.buffer(0)[2500 * 3], want(2500, 0));
        // The donor starts over: the taker keeps its prefix.
        a.release(10).unwrap();
        fill(&mut a, 10..3000, 30_000);
        for row in [0, 11, 700, 2499] {
            assert_eq!(b.buffer(0)[row * 3], want(row, 0), "row {row}");
            assert_eq!(b.buffer(1)[row * 3], want(row, 1), "row {row}");
        }
        // A third slot shares from the taker (whose prefix pages are now its own copies).
        let mut c = pool.attach(2).unwrap();
        c.share_from(&b, 2550).unwrap();
        assert_eq!(c.buffer(1)[2549 * 3], want(2549, 10_001));
        drop(b);
        assert_eq!(c.buffer(0)[100 * 3], want(100, 0));
        drop(a);
        drop(c);
        assert_eq!(pool.pages_used(), 0);
    }

    #[test]
    fn release_gives_pages_back() {
        let pool = KvPool::new(2, &[6, 6], 4096).unwrap();
        let mut a = pool.attach(0).unwrap();
        assert!(pool.attach(0).is_err(), "a slot maps once");
        fill(&mut a, 0..4096, 1);
        assert_eq!(pool.pages_used(), pool.pages_for(4096));
        a.release(100).unwrap();
        assert_eq!(pool.pages_used(), pool.pages_for(100));
        assert_eq!(a.buffer(1)[99 * 3], 101);
        drop(a);
        assert_eq!(pool.pages_used(), 0);
        assert!(
            pool.attach(0).is_ok(),
            "a dropped region's slot is free again"
        );
    }
}
