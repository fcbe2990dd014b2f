//! Read-only file mapping. The only `unsafe` of this crate lives here.

use std::fs::File;

/// The bytes of a model file: mapped from disk, or owned (tests, small files).
pub enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    pub fn map(file: &File) -> std::io::Result<Self> {
        // SAFETY: the mapping is read-only and private to this process. If another process
        // truncates the file while it is mapped, reads past the new end fault (SIGBUS); hearth
        // validates all offsets against the size seen at open, maps only files too big to
        // copy (`read_into_memory`), and SECURITY.md documents that such files must be
        // replaced by rename, not rewritten in place, while they are served.
        let map = unsafe { memmap2::MmapOptions::new().map(file)? };
        Ok(Bytes::Mapped(map))
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}
