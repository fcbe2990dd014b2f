//! Read-only file mapping. The only `unsafe` of this crate lives here.
//!
//! A mapped file that another process truncates or rewrites in place (a model re-downloaded
//! over itself while `hearth serve` runs) would make the next read of a vanished page kill
//! the process with SIGBUS. On Linux a mapping is therefore guarded by a read lease
//! (`fcntl(F_SETLEASE)`): the kernel holds the writer's `open`/`truncate` back and tells us
//! (SIGIO); a watcher thread then copies the mapping's bytes into anonymous memory moved over
//! the same addresses (`mremap`) and only then lets the lease go, so
//! the writer goes on and the served model keeps the weights it was loaded with. Until a
//! writer comes, the pages are the page cache's: shared with other readers, and dropped and
//! read again under memory pressure instead of swapped.

use std::fs::File;
#[cfg(target_os = "linux")]
use std::sync::{Mutex, OnceLock};

/// The bytes of a model file: mapped from disk, or owned (tests, small files).
pub enum Bytes {
    Mapped(Mapping),
    Owned(Vec<u8>),
}

/// A read-only mapping of a whole file, and (guarded) the file holding its lease.
pub struct Mapping {
    map: memmap2::Mmap,
    #[cfg(target_os = "linux")]
    lease: Option<File>,
}

impl Bytes {
    /// Maps `file` without a guard: rewriting it in place while mapped can SIGBUS (see
    /// SECURITY.md); used only when a lease cannot be had and the file is too big to copy,
    /// or where leases do not exist.
    pub fn map(file: &File) -> std::io::Result<Self> {
        // SAFETY: the mapping is read-only and private to this process; hearth validates all
        // offsets against the size seen at open. A truncation by another process is the
        // documented risk of this unguarded path.
        let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(file)? };
        Ok(Bytes::Mapped(Mapping {
            map,
            #[cfg(target_os = "linux")]
            lease: None,
        }))
    }

    /// Maps `file` guarded by a read lease (see the module comment). Fails where a lease
    /// cannot be taken (a file another process has open for writing, one we do not own,
    /// some network filesystems, other systems); the caller then copies the file instead.
    #[cfg(target_os = "linux")]
    pub fn map_guarded(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let watcher = watcher()?;
        let file = File::open(path)?;
        let fd = file.as_raw_fd();
        // SAFETY: plain fcntl calls on our own descriptor.
        unsafe {
            // A lease break is signalled with SIGIO (no F_SETSIG).
            if libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: as in `map`; the lease (held by `file`, which lives as long as the
        // mapping) keeps writers out until the watcher has made every page a private copy.
        let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file)? };
        let mut guarded = watcher.lock().unwrap_or_else(|e| e.into_inner());
        guarded.push(Guarded {
            fd,
            addr: map.as_ptr() as usize,
            len: map.len(),
        });
        Ok(Bytes::Mapped(Mapping {
            map,
            lease: Some(file),
        }))
    }

    #[cfg(not(target_os = "linux"))]
    pub fn map_guarded(_path: &std::path::Path) -> std::io::Result<Self> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "file leases need Linux",
        ))
    }

    /// Whether these bytes are a mapping guarded by a lease.
    pub fn is_guarded_mapping(&self) -> bool {
        match self {
            #[cfg(target_os = "linux")]
            Bytes::Mapped(m) => m.lease.is_some(),
            _ => false,
        }
    }

    /// Gives back the pages wholly inside `range` (bytes nothing will read again: a tensor
    /// kept in another layout), so they no longer count towards this process's memory.
    /// Owned bytes and other systems keep theirs.
    pub fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(target_os = "linux")]
        if let Bytes::Mapped(m) = self {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
            let base = m.map.as_ptr() as usize;
            let (start, end) = (
                (base + range.start).next_multiple_of(page),
                (base + range.end.min(m.map.len())) / page * page,
            );
            if start >= end {
                return;
            }
            // Not while the lease watcher copies the mapping (it reads every page).
            let _guard = WATCHER
                .get()
                .and_then(|w| w.as_ref().ok())
                .map(|w| w.lock().unwrap_or_else(|e| e.into_inner()));
            // SAFETY: the span lies inside our mapping (clamped to its length above, page
            // aligned inward). Its pages are file-backed and read-only, so a later read
            // faults the file's bytes back in; after a lease break they are our private
            // copy and read back as zeros — the caller vouches that nothing reads them.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = range;
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self, Bytes::Mapped(_))
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => &m.map,
            Bytes::Owned(v) => v,
        }
    }
}

#[cfg(target_os = "linux")]
impl Drop for Mapping {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        if let (Some(file), Some(w)) = (&self.lease, WATCHER.get().and_then(|w| w.as_ref().ok())) {
            // Taken out before the mapping goes, so the watcher never touches it after.
            let mut guarded = w.lock().unwrap_or_else(|e| e.into_inner());
            guarded.retain(|g| g.fd != file.as_raw_fd());
        }
    }
}

/// A guarded mapping the watcher knows: its lease's descriptor and its pages.
#[cfg(target_os = "linux")]
struct Guarded {
    fd: i32,
    addr: usize,
    len: usize,
}

#[cfg(target_os = "linux")]
type Watcher = Mutex<Vec<Guarded>>;

#[cfg(target_os = "linux")]
static WATCHER: OnceLock<std::io::Result<Watcher>> = OnceLock::new();
/// Write end of the pipe the SIGIO handler writes to (-1 before the watcher starts).
#[cfg(target_os = "linux")]
static WAKE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

#[cfg(target_os = "linux")]
extern "C" fn on_sigio(_: libc::c_int) {
    let fd = WAKE.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) and errno are async-signal-safe; errno is restored so the
        // interrupted code sees its own.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(fd, [1u8].as_ptr().cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

/// Starts (once) the thread that answers lease breaks.
#[cfg(target_os = "linux")]
fn watcher() -> std::io::Result<&'static Watcher> {
    WATCHER
        .get_or_init(|| {
            let mut fds = [0i32; 2];
            // SAFETY: pipe2 writes two descriptors into `fds`.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let (read_end, write_end) = (fds[0], fds[1]);
            // The reader blocks; only the writer (in the handler) must never block.
            // SAFETY: fcntl on our own descriptor.
            unsafe { libc::fcntl(read_end, libc::F_SETFL, 0) };
            WAKE.store(write_end, std::sync::atomic::Ordering::Relaxed);
            // SAFETY: installs a handler that only writes to a pipe (async-signal-safe);
            // SIGIO is otherwise unused by hearth and its dependencies.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_sigio as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                if libc::sigaction(libc::SIGIO, &sa, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            std::thread::Builder::new()
                .name("hearth-lease".into())
                .spawn(move || watch(read_end))?;
            Ok(Mutex::new(Vec::new()))
        })
        .as_ref()
        .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))
}

#[cfg(target_os = "linux")]
fn watch(read_end: i32) {
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reads into our buffer from our pipe.
        let n = unsafe { libc::read(read_end, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            return;
        }
        let Some(Ok(w)) = WATCHER.get() else { continue };
        let guarded = w.lock().unwrap_or_else(|e| e.into_inner());
        for g in guarded.iter() {
            // SAFETY: fcntl on a descriptor the registry keeps open (removed before close).
            let lease = unsafe { libc::fcntl(g.fd, libc::F_GETLEASE) };
            if lease == libc::F_RDLCK {
                continue; // not the one being broken
            }
            if let Err(e) = privatize(g) {
                eprintln!("hearth: could not copy a model file being rewritten: {e}");
            }
            // SAFETY: as above; lets the writer go on.
            unsafe { libc::fcntl(g.fd, libc::F_SETLEASE, libc::F_UNLCK) };
        }
    }
}

/// Replaces a file mapping by an anonymous copy of its bytes, moved over it in one step
/// (readers see the same bytes before and after). A private copy-on-write page would not
/// do: truncating a file unmaps even those beyond the new end.
#[cfg(target_os = "linux")]
fn privatize(g: &Guarded) -> std::io::Result<()> {
    let addr = g.addr as *mut libc::c_void;
    // SAFETY: the range is a live mapping (the registry entry is removed, under the same
    // lock, before the mapping is dropped); the copy is a fresh mapping of the same length,
    // filled, made read-only, then moved over the old range, which it replaces atomically;
    // the mapping's owner later unmaps that range as before.
    unsafe {
        let copy = libc::mmap(
            std::ptr::null_mut(),
            g.len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if copy == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        std::ptr::copy_nonoverlapping(addr as *const u8, copy as *mut u8, g.len);
        libc::mprotect(copy, g.len, libc::PROT_READ);
        let moved = libc::mremap(
            copy,
            g.len,
            g.len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            addr,
        );
        if moved == libc::MAP_FAILED {
            let err = std::io::Error::last_os_error();
            libc::munmap(copy, g.len);
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file truncated and rewritten in place under a guarded mapping: the writer goes on
    /// (after the watcher copied the pages), and the mapping still reads the old bytes.
    #[test]
    fn guarded_mapping_survives_the_file_rewritten_in_place() {
        let path = std::env::temp_dir().join(format!("hearth-lease-{}", std::process::id()));
        let bytes: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let map = Bytes::map_guarded(&path).unwrap();
        assert!(map.is_guarded_mapping());
        assert_eq!(map[12345], bytes[12345]);
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&path)
                    .unwrap();
                f.write_all(&[0u8; 4096]).unwrap();
            })
        };
        writer.join().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        assert!(map[..] == bytes[..], "the mapping kept its bytes");
        drop(map);
        std::fs::remove_file(&path).unwrap();
    }

    /// Pages given back (a tensor kept in another layout) read the file's bytes again if
    /// touched, and the bytes around them are untouched (the span is page-aligned inward).
    #[test]
    fn released_pages_keep_the_files_bytes() {
        let path = std::env::temp_dir().join(format!("hearth-release-{}", std::process::id()));
        let bytes: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 13 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        for map in [
            Bytes::map_guarded(&path).unwrap(),
            Bytes::map(&std::fs::File::open(&path).unwrap()).unwrap(),
        ] {
            assert!(map[..] == bytes[..]);
            map.release(10_000..700_001);
            map.release(1_000_000..2_000_000); // past the end: clamped
            assert!(
                map[..] == bytes[..],
                "released pages read back the file's bytes"
            );
        }
        std::fs::remove_file(&path).unwrap();
    }
}

/// Asks the kernel to back `buf` with transparent huge pages (2 MiB) where it can: a large
/// buffer about to be written in full (a matrix regrouped at load) then takes one page
/// fault per 2 MiB instead of one per 4 KiB (64k faults for a 250 MB model). A hint only;
/// nothing on other systems.
pub fn advise_huge_pages(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let base = buf.as_mut_ptr() as usize;
        let (start, end) = (
            base.next_multiple_of(HUGE),
            (base + buf.len()) / HUGE * HUGE,
        );
        if start < end {
            // SAFETY: the span lies inside `buf` (aligned inward), which we hold mutably;
            // MADV_HUGEPAGE changes only how its pages are backed, never their contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}
