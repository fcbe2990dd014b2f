//! Zero heap allocations per generated token: after a warm-up, decoding (forward pass on the
//! KV cache plus sampling) allocates nothing, counted by a global allocator.
//!
//! The warm-up runs on the calling thread alone and the counted steps on two threads: what
//! a busy machine does by chance (a worker the OS kept off the CPU during the first steps
//! joins later), done on purpose, so a buffer that belongs to a thread rather than to the
//! caller shows up as an allocation every time, not one run in four under load. The steps
//! see more than 1024 keys, so on two threads Gemma3 (one KV head) splits each token's
//! attention by keys and columns (f16 cache) or by query rows (Q8_0 cache).

mod common;

use hearth_engine::sampling::{Sampler, SamplingParams};
use hearth_models::{KvType, Model, Scratch};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Returns once the pool's worker thread has run a task: a new thread's own start-up
/// allocations (its name, its handle) are over before counting begins.
fn worker_has_started() {
    let joined = AtomicUsize::new(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    hearth_quant::pool::run(2, |_| {
        joined.fetch_add(1, Ordering::SeqCst);
        // Each task waits for the other, so the caller cannot run both.
        while joined.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
            std::hint::spin_loop();
        }
    });
    assert_eq!(joined.load(Ordering::SeqCst), 2, "the worker never ran");
}

fn decode_allocations(name: &str, kv: KvType) -> usize {
    let mut model = Model::load(common::open(name)).expect("model");
    model.set_kv_type(kv).expect("cache type");
    let mut cache = model.new_cache(1200);
    let (mut scratch, mut logits) = (Scratch::default(), Vec::new());
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        repeat_penalty: 1.1,
        seed: 3,
        ..SamplingParams::default()
    });
    let mut history: Vec<u32> = Vec::with_capacity(1200);
    // Past 1024 keys, so that Gemma3's counted steps on two threads split attention by keys.
    history.extend((0..1030).map(|i| 1 + i % 200));
    model
        .forward(&history, &mut cache, &mut scratch, &mut logits)
        .expect("prefill");
    let mut step = |count: bool, history: &mut Vec<u32>| {
        COUNTING.store(count, Ordering::SeqCst);
        let next = sampler.sample(&logits[..model.config.n_vocab], history);
        history.push(next);
        model
            .decode(next, &mut cache, &mut scratch, &mut logits)
            .expect("decode");
        COUNTING.store(false, Ordering::SeqCst);
    };
    hearth_quant::pool::set_threads(1);
    for _ in 0..4 {
        step(false, &mut history); // warm-up: buffers reach their size
    }
    hearth_quant::pool::set_threads(2);
    worker_has_started();
    ALLOCS.store(0, Ordering::SeqCst);
    for _ in 0..64 {
        step(true, &mut history);
    }
    ALLOCS.load(Ordering::SeqCst)
}

#[test]
fn decoding_allocates_nothing_per_token() {
    for (name, kv) in [
        ("smollm2", KvType::F16),
        ("gemma3", KvType::F16),
        ("gemma3", KvType::Q8_0),
    ] {
        let n = decode_allocations(name, kv);
        let kv = kv.name();
        assert_eq!(
            n, 0,
            "{name}, {kv} cache: {n} heap allocations in 64 decode steps"
        );
    }
}
