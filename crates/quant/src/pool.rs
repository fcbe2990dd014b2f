//! A persistent worker pool for the kernels: one job at a time, split into tasks that the
//! caller and the workers take from a shared counter.
//!
//! Why not rayon: a decode step runs ~250 small products; waking sleeping rayon workers and
//! splitting work recursively cost more than the products on a small model. Here workers
//! spin for a short while after each job (so the next one starts in well under a
//! microsecond) and then park until there is work again.
//!
//! `threads` counts the caller: `set_threads(2)` keeps one worker thread.

use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// A job's closure with its lifetime erased; only dereferenced while the job runs.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n_tasks: usize,
}

/// `Shared::ticket` is `epoch << 32 | CLOSED? | joined workers`.
const CLOSED: u64 = 1 << 31;
const JOINED: u64 = CLOSED - 1;

fn epoch_of(ticket: u64) -> u64 {
    ticket >> 32
}

struct Shared {
    /// The job's epoch (bumped once per job; publishes `job` and `next`), whether it is
    /// closed to late workers, and how many workers joined it and have not finished.
    ///
    /// Workers join a job only while it is open, and the caller waits only for those that
    /// joined: a worker the OS has not scheduled (another process busy on its core) does not
    /// hold up every product for a whole time slice — the caller does its share instead.
    ticket: AtomicU64,
    job: UnsafeCell<Job>,
    next: AtomicUsize,
    panicked: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

// SAFETY: `job` is written only by the caller holding `Pool::caller`, before the epoch bump
// (Release) that workers observe (Acquire) before reading it, and never while a worker that
// joined the previous epoch has not left it; the closure it points to is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

struct Workers {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    fn spawn(n: usize) -> Workers {
        fn noop(_: usize) {}
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(0),
            job: UnsafeCell::new(Job {
                f: &noop as &(dyn Fn(usize) + Sync) as *const _,
                n_tasks: 0,
            }),
            next: AtomicUsize::new(0),
            panicked: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let handles = (0..n)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("hearth-worker-{i}"))
                    .spawn(move || worker(&s))
                    .expect("spawning a worker thread")
            })
            .collect();
        Workers { shared, handles }
    }

    fn stop(self) {
        self.shared.shutdown.store(true, SeqCst);
        {
            let _g = self
                .shared
                .sleep_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles {
            let _ = h.join();
        }
    }
}

thread_local! {
    /// Set while this thread runs pool tasks: nested calls run inline.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

fn run_tasks(s: &Shared, job: Job) {
    loop {
        let i = s.next.fetch_add(1, Relaxed);
        if i >= job.n_tasks {
            return;
        }
        // SAFETY: the caller of `Pool::run` keeps the closure alive until every worker of this
        // epoch has left it, which happens after this call returns.
        let f = unsafe { &*job.f };
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
            *s.panicked.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
    }
}

fn worker(s: &Shared) {
    IN_POOL.with(|c| c.set(true));
    // Workers are spawned before the first job: epoch 0 is the one already seen (reading
    // the epoch here could miss a job published before this thread got to run).
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = epoch_of(s.ticket.load(Acquire));
            if e != seen {
                seen = e;
                break;
            }
            if s.shutdown.load(Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut g = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            while epoch_of(s.ticket.load(SeqCst)) == seen && !s.shutdown.load(SeqCst) {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, SeqCst);
        }
        if !join(s, seen) {
            continue; // the caller already finished this job alone
        }
        // SAFETY: written before the epoch bump we observed with Acquire; not written again
        // until every worker that joined this epoch has left it.
        let job = unsafe { *s.job.get() };
        run_tasks(s, job);
        s.ticket.fetch_sub(1, Release);
    }
}

/// Joins job `epoch` if it is still open.
fn join(s: &Shared, epoch: u64) -> bool {
    let mut cur = s.ticket.load(Acquire);
    loop {
        if epoch_of(cur) != epoch || cur & CLOSED != 0 {
            return false;
        }
        match s
            .ticket
            .compare_exchange_weak(cur, cur + 1, AcqRel, Acquire)
        {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
}

pub struct Pool {
    /// Held for the whole of a job (one job at a time) and while resizing.
    caller: Mutex<Option<Workers>>,
    threads: AtomicUsize,
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        Pool {
            caller: Mutex::new(Some(Workers::spawn(threads - 1))),
            threads: AtomicUsize::new(threads),
        }
    }

    fn resize(&self, threads: usize) {
        let threads = threads.max(1);
        let mut g = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        if self.threads.load(Relaxed) == threads {
            return;
        }
        if let Some(w) = g.take() {
            w.stop();
        }
        *g = Some(Workers::spawn(threads - 1));
        self.threads.store(threads, Relaxed);
    }

    /// Calls `f(i)` for every `i` in `0..n_tasks`, spread over the pool; returns when all
    /// are done. Nested calls (from inside a task) run inline.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks <= 1 || self.threads.load(Relaxed) == 1 || IN_POOL.with(|c| c.get()) {
            (0..n_tasks).for_each(f);
            return;
        }
        let g = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = g.as_ref() else {
            (0..n_tasks).for_each(f);
            return;
        };
        let s = &*w.shared;
        // SAFETY: no worker reads `job` now: the previous epoch was closed and every worker
        // that joined it had left when the previous call returned, and the new epoch is not
        // yet published. The pointer's lifetime is erased; it is dereferenced only by the
        // workers that join this epoch, and only until the last of them leaves it (awaited
        // below, while `f` is still borrowed by this call).
        unsafe {
            let f: *const (dyn Fn(usize) + Sync + '_) = f;
            *s.job.get() = Job {
                f: std::mem::transmute::<
                    *const (dyn Fn(usize) + Sync + '_),
                    *const (dyn Fn(usize) + Sync + 'static),
                >(f),
                n_tasks,
            };
        }
        s.next.store(0, Relaxed);
        // Open the next epoch with nobody joined (0 is the workers' initial "seen").
        let epoch = (epoch_of(s.ticket.load(Relaxed)) + 1) & 0xffff_ffff;
        s.ticket.store(epoch.max(1) << 32, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _l = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        IN_POOL.with(|c| c.set(true));
        // SAFETY: as for the workers: `f` outlives this call.
        run_tasks(s, unsafe { *s.job.get() });
        IN_POOL.with(|c| c.set(false));
        // Every task is taken: close the job to late workers, then wait for the joined ones.
        s.ticket.fetch_or(CLOSED, AcqRel);
        let mut spins = 0u32;
        while s.ticket.load(Acquire) & JOINED != 0 {
            spins = spins.wrapping_add(1);
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let panic = s.panicked.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(g);
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }
}

static POOL: OnceLock<Pool> = OnceLock::new();

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The process-wide pool (created with every available CPU unless [`set_threads`] ran first).
pub fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(default_threads()))
}

/// Sets the number of threads the kernels use, counting the calling thread.
pub fn set_threads(n: usize) {
    let p = POOL.get_or_init(|| Pool::new(n));
    p.resize(n);
}

/// Threads the kernels use, counting the calling thread.
pub fn threads() -> usize {
    pool().threads.load(Relaxed)
}

/// Calls `f(i)` for `i` in `0..n_tasks` on the pool.
pub fn run(n_tasks: usize, f: impl Fn(usize) + Sync) {
    pool().run(n_tasks, &f);
}

/// Splits `data` into chunks of `chunk` elements and calls `f(chunk_index, chunk)` for each,
/// in parallel.
pub fn for_each_chunk<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let len = data.len();
    let n_chunks = len.div_ceil(chunk);
    let base = SendPtr(data.as_mut_ptr());
    run(n_chunks, |i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        let p = &base;
        // SAFETY: chunk `i` covers `start..end` inside `data`; chunks are disjoint and each
        // index runs exactly once, and `data` stays mutably borrowed for the whole call.
        let part = unsafe { std::slice::from_raw_parts_mut(p.0.add(start), end - start) };
        f(i, part);
    });
}

/// Rows of an output matrix handed to pool tasks by row range, for tasks whose row ranges
/// are disjoint but not known to `for_each_chunk` (blocks of uneven size).
pub struct OutRows<'a, T> {
    ptr: SendPtr<T>,
    rows: usize,
    width: usize,
    taken: Vec<std::sync::atomic::AtomicBool>,
    _data: std::marker::PhantomData<&'a mut [T]>,
}

impl<'a, T: Send> OutRows<'a, T> {
    /// `data` as rows of `width` values.
    pub fn new(data: &'a mut [T], width: usize) -> Self {
        let rows = data.len() / width.max(1);
        Self {
            ptr: SendPtr(data.as_mut_ptr()),
            rows,
            width,
            taken: (0..rows)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            _data: std::marker::PhantomData,
        }
    }

    /// Calls `f` with rows `first..first + count`. Panics if any of them was handed out
    /// before (each row goes to one task, once).
    pub fn with<R>(&self, first: usize, count: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
        assert!(first + count <= self.rows, "rows out of range");
        for t in &self.taken[first..first + count] {
            assert!(!t.swap(true, AcqRel), "row handed out twice");
        }
        // SAFETY: the rows are inside `data` (checked above) and were never handed out
        // before (the flags above), so this is the only reference to them; `data` stays
        // mutably borrowed for `'a`.
        let part = unsafe {
            std::slice::from_raw_parts_mut(self.ptr.0.add(first * self.width), count * self.width)
        };
        f(part)
    }
}

/// A token-major result (`n_tok` rows of `width` values: one row per token, one column
/// per weight row) handed to pool tasks by ranges of columns, so a task that computes some
/// weight rows for every token writes its results in place, with no row-major copy to
/// transpose afterwards.
pub struct OutColumns<'a> {
    ptr: SendPtr<f32>,
    n_tok: usize,
    width: usize,
    taken: Vec<std::sync::atomic::AtomicBool>,
    _data: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> OutColumns<'a> {
    /// `data` as `n_tok` rows of `width` values.
    pub fn new(data: &'a mut [f32], n_tok: usize, width: usize) -> Self {
        assert!(
            data.len() >= n_tok * width,
            "result smaller than {n_tok}x{width}"
        );
        Self {
            ptr: SendPtr(data.as_mut_ptr()),
            n_tok,
            width,
            taken: (0..width)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            _data: std::marker::PhantomData,
        }
    }

    /// Calls `f` with columns `first..first + count` of every token. Panics if any of them
    /// was handed out before (each column goes to one task, once).
    pub fn with<R>(&self, first: usize, count: usize, f: impl FnOnce(&mut Columns) -> R) -> R {
        assert!(first + count <= self.width, "columns out of range");
        for t in &self.taken[first..first + count] {
            assert!(!t.swap(true, AcqRel), "column handed out twice");
        }
        f(&mut Columns {
            // Only dereferenced through `token`, for a token that exists.
            ptr: self.ptr.0.wrapping_add(first),
            stride: self.width,
            n_tok: self.n_tok,
            width: count,
            _data: std::marker::PhantomData,
        })
    }
}

/// Columns `c0..c0 + width` of every token of an [`OutColumns`], for one task.
pub struct Columns<'b> {
    ptr: *mut f32,
    stride: usize,
    n_tok: usize,
    width: usize,
    _data: std::marker::PhantomData<&'b mut [f32]>,
}

impl Columns<'_> {
    pub fn n_tok(&self) -> usize {
        self.n_tok
    }

    /// Columns (weight rows) of each token held here.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Token `t`'s values in these columns.
    pub fn token(&mut self, t: usize) -> &mut [f32] {
        assert!(t < self.n_tok, "token {t} of {}", self.n_tok);
        // SAFETY: token `t`'s row has `stride` values from `ptr - c0`, of which
        // `c0..c0 + width` are these columns (`c0 + width <= stride`, checked by `with`);
        // no other task holds them (`with`'s flags) and `&mut self` makes this the only
        // reference here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(t * self.stride), self.width) }
    }

    /// Runs a kernel that writes row-major results (`width` rows of `n_tok`, added into
    /// zeros) and puts them in these columns.
    pub fn from_row_major(&mut self, kernel: impl FnOnce(&mut [f32])) {
        let (n_tok, width) = (self.n_tok, self.width);
        let mut rows = vec![0f32; width * n_tok];
        kernel(&mut rows);
        for t in 0..n_tok {
            for (r, v) in self.token(t).iter_mut().enumerate() {
                *v = rows[r * n_tok + t];
            }
        }
    }
}

pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: used only to hand disjoint parts of a `&mut [T]` (T: Send) to pool tasks
// (`for_each_chunk`, `OutRows`, `OutColumns`, and the AMX products' disjoint output
// blocks).
unsafe impl<T: Send> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_published_before_the_worker_starts_is_not_missed() {
        for _ in 0..50 {
            let p = Pool::new(2);
            let n = AtomicUsize::new(0);
            p.run(2, &|_| {
                n.fetch_add(1, Relaxed);
            });
            assert_eq!(n.load(Relaxed), 2);
        }
    }

    #[test]
    fn every_task_runs_once() {
        let p = Pool::new(3);
        for n in [0, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            p.run(n, &|i| {
                hits[i].fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1));
        }
    }

    /// Many tiny jobs back to back, with more workers than cores: late workers that find a
    /// job closed must neither run its tasks twice nor miss the next one.
    #[test]
    fn tiny_jobs_with_late_workers_run_every_task_once() {
        let p = Pool::new(4);
        let total = AtomicUsize::new(0);
        for job in 0..20_000usize {
            let n = 2 + job % 5;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            p.run(n, &|i| {
                hits[i].fetch_add(1, Relaxed);
                total.fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "job {job}");
        }
        assert_eq!(total.load(Relaxed), (0..20_000).map(|j| 2 + j % 5).sum());
    }

    #[test]
    fn chunks_cover_the_slice() {
        let mut v = vec![0usize; 1003];
        for_each_chunk(&mut v, 10, |c, part| {
            for (j, x) in part.iter_mut().enumerate() {
                *x = c * 10 + j;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| i == x));
    }

    #[test]
    fn survives_idle_parking_and_resizing() {
        let p = Pool::new(2);
        let sum = AtomicUsize::new(0);
        p.run(4, &|i| {
            sum.fetch_add(i, Relaxed);
        });
        std::thread::sleep(SPIN * 3); // workers park
        p.run(4, &|i| {
            sum.fetch_add(i, Relaxed);
        });
        p.resize(3);
        p.run(4, &|i| {
            sum.fetch_add(i, Relaxed);
        });
        assert_eq!(sum.load(Relaxed), 18);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_keeps_working() {
        let p = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            p.run(8, &|i| assert!(i != 5, "task 5 fails"));
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        p.run(8, &|_| {
            n.fetch_add(1, Relaxed);
        });
        assert_eq!(n.load(Relaxed), 8);
    }

    #[test]
    fn nested_calls_run_inline() {
        let p = Pool::new(2);
        let n = AtomicUsize::new(0);
        p.run(4, &|_| {
            pool().run(3, &|_| {
                n.fetch_add(1, Relaxed);
            });
        });
        assert_eq!(n.load(Relaxed), 12);
    }

    #[test]
    fn out_columns_hand_each_task_its_columns_of_every_token_once() {
        let (n_tok, width) = (3, 10);
        let mut data = vec![0f32; n_tok * width];
        let columns = OutColumns::new(&mut data, n_tok, width);
        let p = Pool::new(2);
        p.run(2, &|c| {
            let (c0, n) = if c == 0 { (0, 4) } else { (4, 6) };
            columns.with(c0, n, |o| {
                assert_eq!((o.n_tok(), o.width()), (n_tok, n));
                for t in 0..n_tok {
                    for (i, v) in o.token(t).iter_mut().enumerate() {
                        *v = (t * 100 + c0 + i) as f32;
                    }
                }
            })
        });
        let twice = catch_unwind(AssertUnwindSafe(|| columns.with(3, 2, |_| ())));
        assert!(twice.is_err(), "column 3 was handed out twice");
        drop(columns);
        for t in 0..n_tok {
            for r in 0..width {
                assert_eq!(data[t * width + r], (t * 100 + r) as f32);
            }
        }
        let mut row_major = vec![0f32; 2 * 4];
        let columns = OutColumns::new(&mut row_major, 4, 2);
        columns.with(0, 2, |o| {
            o.from_row_major(|rows| {
                rows.iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v += i as f32)
            })
        });
        drop(columns);
        // Row r, token t was r * 4 + t; token-major now.
        assert_eq!(row_major, [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]);
    }
}
