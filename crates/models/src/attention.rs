//! Causal self-attention over the KV cache (grouped-query, optional sliding window).
//! Over an f16 cache the numerics follow llama.cpp's non-flash path: Q rounded to f16 and
//! dotted with f16 keys, softmax in f32, weights rounded to f16 and multiplied with f16
//! values (the kernel is `Kernels::attend_f16`, up to 8 query rows of one KV head per call).
//! Over a Q8_0/Q4_0 cache they follow its flash-attention path for such caches
//! (`hearth_quant::kvquant`).

use hearth_quant::blocks::QK;
use hearth_quant::kvquant::{AttendQuant, KvBlock};
use hearth_quant::AttendF16;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::kv::KvLayer;

pub struct AttnShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Multiplies Q·K before softmax.
    pub scale: f32,
    /// Keys at least this far behind the query are masked (sliding-window layers).
    pub window: Option<usize>,
    /// Attention logit soft-capping (gemma2), `None` for off.
    pub softcap: Option<f32>,
}

/// The kernels' score buffers, owned by the caller and sized for the whole cache before any
/// task starts. A decode step's task `i` (KV head `i`) always takes buffer `i`, so whether
/// memory is allocated never depends on which thread runs which task: thread-local buffers
/// did, and a worker that a busy machine kept out of the first steps grew its own buffer
/// later, in the middle of decoding. Prompt chunks take any free buffer (one per thread).
#[derive(Default)]
pub struct AttnScratch {
    bufs: Vec<Mutex<Vec<f32>>>,
    /// A decoding token's attention split by keys and columns ([`attend_split`]): the
    /// scores by key part, the weights by row and the outputs by column part.
    split_scores: Vec<f32>,
    split_weights: Vec<f32>,
    split_out: Vec<f32>,
}

impl AttnScratch {
    /// At least `count` buffers, each `len` floats long.
    fn prepare(&mut self, count: usize, len: usize) {
        if self.bufs.len() < count {
            self.bufs.resize_with(count, Default::default);
        }
        for b in &mut self.bufs {
            let b = b.get_mut().unwrap_or_else(|e| e.into_inner());
            if b.len() < len {
                b.resize(len, 0.0);
            }
        }
    }

    /// Room for [`attend_split`] over `rows` cache rows (sized for the whole cache, so
    /// decoding never grows it).
    fn prepare_split(&mut self, s: &AttnShape, rows: usize) {
        let grow = |b: &mut Vec<f32>, len: usize| {
            if b.len() < len {
                b.resize(len, 0.0);
            }
        };
        // Key parts are padded to the same length (at most one key more per part), each
        // followed by its rows' queries; column parts are multiples of 16 columns.
        grow(
            &mut self.split_scores,
            s.n_head * (rows + MAX_PARTS * (1 + s.head_dim)),
        );
        grow(&mut self.split_weights, s.n_head * rows);
        grow(&mut self.split_out, 2 * s.n_head * s.head_dim);
    }

    fn get(&self, i: usize) -> MutexGuard<'_, Vec<f32>> {
        self.bufs[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free buffer (no more prompt tasks run at once than there are threads).
    fn take(&self) -> MutexGuard<'_, Vec<f32>> {
        for b in &self.bufs {
            if let Ok(g) = b.try_lock() {
                return g;
            }
        }
        self.get(0)
    }
}

/// Query rows per kernel call.
const ROWS: usize = 8;

/// `q`: `[n_tok, n_head*head_dim]` for positions `pos0..pos0+n_tok`, whose keys and values
/// are already in `kv` (`[pos, n_kv_head*head_dim]`). Writes `out` like `q`.
///
/// Work is split by tokens (a block of tokens per task, so the heads sharing a KV head go
/// through the kernel together), or for a single token by KV head, or when that leaves
/// threads idle, by keys and columns ([`attend_split`], f16 cache) or by parts of a KV
/// head's query rows ([`row_parts`], quantized cache).
pub fn attention(
    q: &[f32],
    kv: KvLayer,
    pos0: usize,
    s: &AttnShape,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let hd = s.head_dim;
    let (qd, kv_dim) = (s.n_head * hd, s.n_kv_head * hd);
    let n_tok = q.len() / qd;
    // What a kernel call can need: queries and scores of `ROWS` rows over the whole cache.
    let len = ROWS * (hd + kv.rows(kv_dim) + 1);
    let quantized = !matches!(kv, KvLayer::F16 { .. });
    // Read once: the buffers below and the parts a token splits into agree on it.
    let threads = hearth_quant::pool::threads();
    let count = if n_tok == 1 && quantized {
        // As many as a second thread would take (as `may_split`): a model that can split
        // has its buffers from the first token, on one thread or more.
        s.n_kv_head * row_parts(s, threads.max(2))
    } else if n_tok == 1 {
        s.n_kv_head
    } else {
        threads
    };
    let group = s.n_head / s.n_kv_head;
    let kernels = hearth_quant::dispatch::kernels();
    // Keys position `pos` sees.
    let keys = |pos: usize| -> (usize, usize) {
        let first = match s.window {
            Some(w) if pos + 1 > w => pos + 1 - w,
            _ => 0,
        };
        (first, pos + 1)
    };
    // Runs a block of rows (offsets in q_c/out_c) over KV head `kvh`.
    let call = |b: &RowBlock, out_c: &mut [f32], kvh: usize, scratch: &mut Vec<f32>| match kv {
        KvLayer::F16 { k, v } => {
            let a = AttendF16 {
                q: b.q,
                at: b.at,
                rows: b.rows,
                keys: b.keys,
                k: &k[kvh * hd..],
                v: &v[kvh * hd..],
                kv_stride: kv_dim,
                head_dim: hd,
                scale: s.scale,
                softcap: s.softcap.unwrap_or(0.0),
            };
            (kernels.attend_f16)(&a, out_c, scratch);
        }
        KvLayer::Q8_0 { k, v } => attend_blocks(k, v, kvh, b, s, out_c, scratch),
        KvLayer::Q4_0 { k, v } => attend_blocks(k, v, kvh, b, s, out_c, scratch),
    };
    // Runs the rows `(offset in q_c/out_c, position)` of KV head `kvh`, ROWS at a time.
    let run = |q_c: &[f32],
               out_c: &mut [f32],
               kvh: usize,
               rows: &mut dyn Iterator<Item = (usize, usize)>,
               scratch: &mut Vec<f32>| {
        let mut b = RowBlock {
            q: q_c,
            at: [0; ROWS],
            keys: [(0, 0); ROWS],
            rows: 0,
        };
        for (offset, pos) in rows {
            b.at[b.rows] = offset;
            b.keys[b.rows] = keys(pos);
            b.rows += 1;
            if b.rows == ROWS {
                call(&b, out_c, kvh, scratch);
                b.rows = 0;
            }
        }
        if b.rows > 0 {
            call(&b, out_c, kvh, scratch);
        }
    };
    if n_tok == 1 {
        let (first, end) = keys(pos0);
        if let KvLayer::F16 { k, v } = kv {
            // Sized whether this token splits or not, so that a token past the threshold
            // (or a second thread on a model with one KV head) never allocates later.
            if may_split(s) {
                scratch.prepare_split(s, kv.rows(kv_dim));
            }
            if split_pays(s, end - first) {
                let ks = KeySpan { k, v, first, end };
                return attend_split(q, ks, s, out, scratch);
            }
        }
        // Buffers for the most tasks this model's token can take (`count`), whether this
        // token splits or not: decoding never allocates later.
        scratch.prepare(count.max(1), len);
        let scratch = &*scratch;
        // One task per KV head (its `group` heads are contiguous in q and out), or over a
        // quantized cache with idle threads and enough keys, per part of its heads.
        let parts =
            if quantized && SPLIT.load(Ordering::Relaxed) && end - first >= MIN_ROW_SPLIT_KEYS {
                row_parts(s, threads)
            } else {
                1
            };
        let per = group / parts;
        hearth_quant::pool::for_each_chunk(out, per * hd, |i, out_c| {
            let q_c = &q[i * per * hd..][..per * hd];
            let mut rows = (0..per).map(|r| (r * hd, pos0));
            run(q_c, out_c, i / parts, &mut rows, &mut scratch.get(i));
        });
        return;
    }
    scratch.prepare(count.max(1), len);
    let scratch = &*scratch;
    let tokens_per_task = (ROWS / group).max(1);
    hearth_quant::pool::for_each_chunk(out, tokens_per_task * qd, |ci, out_c| {
        let t0 = ci * tokens_per_task;
        let nt = out_c.len() / qd;
        let q_c = &q[t0 * qd..(t0 + nt) * qd];
        let mut buf = scratch.take();
        for kvh in 0..s.n_kv_head {
            let mut rows = (0..nt).flat_map(|t| {
                (kvh * group..(kvh + 1) * group).map(move |h| (t * qd + h * hd, pos0 + t0 + t))
            });
            run(q_c, out_c, kvh, &mut rows, &mut buf);
        }
    });
}

/// Keys of a decoding token below which splitting them costs more (two more pool jobs and
/// copies) than the threads it keeps busy gain: Gemma3's shape on Zen 5, 2 threads,
/// `examples/decode_attention`: 1.00× at 512 keys, 1.02× at 1024, 1.10× at 2048, 1.44× at
/// 8192.
const MIN_SPLIT_KEYS: usize = 1024;

static SPLIT: AtomicBool = AtomicBool::new(true);

/// Turns the split of a decoding token's attention on or off — by keys and columns over an
/// f16 cache, by query rows over a quantized one (on by default; the same bits either
/// way): for the tests and the benchmarks that compare both.
pub fn set_split_attention(on: bool) {
    SPLIT.store(on, Ordering::Relaxed);
}

/// Whether a decoding token's attention over `n` keys is split by keys and columns: when
/// its KV heads alone would leave threads idle, and the heads fit the kernel. (Where every
/// thread has a KV head, splitting further did not pay: SmolLM2's 3 on 2 threads ran at
/// 0.72–0.91× of 2:1 by head from 1024 to 8192 keys; its attention is bound by memory, not
/// by the thread left waiting.)
fn split_pays(s: &AttnShape, n: usize) -> bool {
    may_split(s)
        && s.n_kv_head < hearth_quant::pool::threads()
        && SPLIT.load(Ordering::Relaxed)
        && n >= MIN_SPLIT_KEYS
}

/// Keys of a decoding token from which a quantized cache's query rows split (see
/// [`row_parts`]). Gemma3 with a Q8_0 cache on 2 threads, Zen 5, `hearth bench -p 0 -n 64`,
/// old and new binary interleaved: avx512 +3–7% at 512 keys, +7–8% at 2048, +15–18% at
/// 8192; avx2 +8–11% at 2048; at 0 keys the token has nothing to split.
const MIN_ROW_SPLIT_KEYS: usize = 512;

/// Into how many parts a decoding token's query rows of one KV head split over a quantized
/// cache on `threads` threads, so that threads a KV head each would leave idle take some
/// (Gemma3: one KV head, four query heads, two parts on 2 threads). Each part reads all the
/// keys and values, and the kernel's arithmetic for a row does not depend on the other
/// rows, so the bits are the same. The largest divisor of the heads per KV head up to the
/// threads' share; 1 when every thread has a KV head. (The f16 cache splits by keys
/// instead, [`attend_split`].)
fn row_parts(s: &AttnShape, threads: usize) -> usize {
    let group = s.n_head / s.n_kv_head;
    if s.n_kv_head >= threads {
        return 1;
    }
    let want = threads.div_ceil(s.n_kv_head);
    (1..=want.min(group))
        .rev()
        .find(|p| group.is_multiple_of(*p))
        .unwrap_or(1)
}

/// Whether a model's attention can ever be split on this pool (at least 2 threads counted,
/// so a model with one KV head keeps its buffers from the start): the split's buffers are
/// only made for these.
fn may_split(s: &AttnShape) -> bool {
    s.n_kv_head < hearth_quant::pool::threads().max(2)
        && s.head_dim.is_multiple_of(16)
        && s.n_head / s.n_kv_head <= ROWS
}

/// The f16 cache's keys and values and the keys a decoding token sees.
struct KeySpan<'a> {
    k: &'a [half::f16],
    v: &'a [half::f16],
    first: usize,
    end: usize,
}

/// One decoding token's attention over an f16 cache in three pool jobs, with the bits of
/// the whole kernel (`Kernels::attend_f16_steps`): each KV head's scores in parts of its
/// keys, each row's softmax, each KV head's outputs in parts of its columns.
fn attend_split(q: &[f32], ks: KeySpan, s: &AttnShape, out: &mut [f32], scratch: &mut AttnScratch) {
    let AttnScratch {
        split_scores,
        split_weights,
        split_out,
        ..
    } = scratch;
    let steps = hearth_quant::dispatch::kernels().attend_f16_steps;
    let (hd, group) = (s.head_dim, s.n_head / s.n_kv_head);
    let n = ks.end - ks.first;
    // Two tasks per thread in each job.
    let per_head = (2 * hearth_quant::pool::threads()).div_ceil(s.n_kv_head);
    // The kernel call for KV head `kvh`'s rows (queries at `q`), seeing keys `keys`.
    let call = |kvh: usize, keys: (usize, usize)| AttendF16 {
        q: &q[kvh * group * hd..][..group * hd],
        at: std::array::from_fn(|r| r * hd),
        rows: group,
        keys: [keys; 8],
        k: &ks.k[kvh * hd..],
        v: &ks.v[kvh * hd..],
        kv_stride: s.n_kv_head * hd,
        head_dim: hd,
        scale: s.scale,
        softcap: s.softcap.unwrap_or(0.0),
    };
    // Scores: `parts` parts of `part` keys per KV head; a part's chunk holds its rows'
    // scores, then room for their queries.
    let parts = per_head.clamp(1, MAX_PARTS).min(n);
    let part = n.div_ceil(parts);
    let chunk_len = group * (part + hd);
    let scores = &mut split_scores[..s.n_kv_head * parts * chunk_len];
    hearth_quant::pool::for_each_chunk(scores, chunk_len, |i, chunk| {
        let (kvh, p) = (i / parts, i % parts);
        let k0 = ks.first + (p * part).min(n);
        let k1 = (k0 + part).min(ks.end);
        if k0 < k1 {
            let (ps, qs) = chunk.split_at_mut(group * part);
            (steps.scores)(&call(kvh, (k0, k1)), &mut ps[..group * (k1 - k0)], qs);
        }
    });
    let scores = &*scores;
    // Weights: each row's scores gathered from the parts, then its softmax.
    let weights = &mut split_weights[..s.n_head * n];
    hearth_quant::pool::for_each_chunk(weights, n, |row, w| {
        let (kvh, r) = (row / group, row % group);
        for p in 0..parts {
            let k0 = (p * part).min(n);
            let m = part.min(n - k0);
            // Part `p`'s chunk holds its rows' `m` scores each.
            let from = (kvh * parts + p) * chunk_len + r * m;
            w[k0..k0 + m].copy_from_slice(&scores[from..from + m]);
        }
        (steps.weights)(&call(kvh, (ks.first, ks.end)), r, w);
    });
    let weights = &*weights;
    // Outputs: `cols` parts of `width` columns (a multiple of 16) per KV head.
    let width = (hd / 16).div_ceil(per_head.clamp(1, hd / 16)) * 16;
    let cols = hd.div_ceil(width);
    let outs = &mut split_out[..s.n_kv_head * cols * group * width];
    hearth_quant::pool::for_each_chunk(outs, group * width, |i, o| {
        let (kvh, c) = (i / cols, i % cols);
        let c0 = c * width;
        let w = width.min(hd - c0);
        let a = call(kvh, (ks.first, ks.end));
        (steps.values)(
            &a,
            &weights[kvh * group * n..][..group * n],
            c0,
            &mut o[..group * w],
        );
    });
    for kvh in 0..s.n_kv_head {
        for c in 0..cols {
            let c0 = c * width;
            let w = width.min(hd - c0);
            let from = &outs[(kvh * cols + c) * group * width..][..group * w];
            for r in 0..group {
                out[(kvh * group + r) * hd + c0..][..w].copy_from_slice(&from[r * w..][..w]);
            }
        }
    }
}

/// Parts of its keys one KV head's scores are split into at most.
const MAX_PARTS: usize = 16;

/// Up to `ROWS` query rows of one KV head: row `r` at `q[at[r]..]`, seeing keys `keys[r]`.
struct RowBlock<'a> {
    q: &'a [f32],
    at: [usize; ROWS],
    keys: [(usize, usize); ROWS],
    rows: usize,
}

/// The rows of `b` over KV head `kvh` of a quantized cache.
fn attend_blocks<B: KvBlock>(
    k: &[B],
    v: &[B],
    kvh: usize,
    b: &RowBlock,
    s: &AttnShape,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let nb = s.head_dim / QK;
    let a = AttendQuant {
        q: b.q,
        at: b.at,
        rows: b.rows,
        keys: b.keys,
        k: &k[kvh * nb..],
        v: &v[kvh * nb..],
        kv_stride: s.n_kv_head * nb,
        head_dim: s.head_dim,
        scale: s.scale,
        softcap: s.softcap.unwrap_or(0.0),
    };
    B::attend(hearth_quant::dispatch::kernels())(&a, out, scratch);
}
