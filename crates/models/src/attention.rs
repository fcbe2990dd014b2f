//! Causal self-attention over the KV cache (grouped-query, optional sliding window).
//! Over an f16 cache the numerics follow llama.cpp's non-flash path: Q rounded to f16 and
//! dotted with f16 keys, softmax in f32, weights rounded to f16 and multiplied with f16
//! values (the kernel is `Kernels::attend_f16`, up to 8 query rows of one KV head per call).
//! Over a Q8_0/Q4_0 cache they follow its flash-attention path for such caches
//! (`hearth_quant::kvquant`).

use hearth_quant::blocks::QK;
use hearth_quant::kvquant::{AttendQuant, KvBlock};
use hearth_quant::AttendF16;
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
/// through the kernel together), or for a single token by KV head.
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
    let count = if n_tok == 1 {
        s.n_kv_head
    } else {
        hearth_quant::pool::threads()
    };
    scratch.prepare(count.max(1), len);
    let scratch = &*scratch;
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
        // One task per KV head: its `group` heads are contiguous in q and out.
        hearth_quant::pool::for_each_chunk(out, group * hd, |kvh, out_c| {
            let q_c = &q[kvh * group * hd..][..group * hd];
            let mut rows = (0..group).map(|i| (i * hd, pos0));
            run(q_c, out_c, kvh, &mut rows, &mut scratch.get(kvh));
        });
        return;
    }
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
