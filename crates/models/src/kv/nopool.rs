//! Where there is no `memfd` (not Linux), caches are not pooled: each owns its buffers.

use std::io;
use std::sync::Arc;

pub struct KvPool {}

/// Never made: [`KvPool::new`] refuses.
pub enum PoolRegion {}

impl KvPool {
    pub fn new(_n_slots: usize, _row_bytes: &[usize], _n_ctx: usize) -> io::Result<Arc<KvPool>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a shared KV pool needs Linux",
        ))
    }
    pub fn page_bytes(&self) -> usize {
        4096
    }
    /// Positions each slot holds.
    pub fn n_ctx(&self) -> usize {
        0
    }

    pub fn slots(&self) -> usize {
        0
    }
    pub fn pages_for(&self, _rows: usize) -> usize {
        0
    }
    /// Pages of `tokens` positions spread over sequences (a budget), each buffer rounded up
    /// once.
    pub fn pages_for_tokens(&self, tokens: usize) -> usize {
        let _ = tokens;
        0
    }

    pub fn pages_used(&self) -> usize {
        0
    }
    pub fn attach(self: &Arc<Self>, _slot: usize) -> io::Result<PoolRegion> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "no KV pool"))
    }
}

impl PoolRegion {
    pub fn slot(&self) -> usize {
        match *self {}
    }
    pub fn pool(&self) -> &Arc<KvPool> {
        match *self {}
    }
    pub fn buffer(&self, _b: usize) -> &[u16] {
        match *self {}
    }
    pub fn buffers_mut(&mut self, _a: usize, _b: usize) -> (&mut [u16], &mut [u16]) {
        match *self {}
    }
    pub fn release(&mut self, _rows: usize) -> io::Result<()> {
        match *self {}
    }
    pub fn share_from(&mut self, _donor: &PoolRegion, _rows: usize) -> io::Result<()> {
        match *self {}
    }
}
