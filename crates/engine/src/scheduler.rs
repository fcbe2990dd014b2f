//! Continuous batching: one worker thread per model runs up to `parallel` sequences, each in
//! its own KV cache slot of up to the full context, through one batched forward pass per step.
//!
//! The slots' caches live in one KV pool (Linux; `hearth_models::kv::pool`): memory is taken
//! as positions are written and given back when a slot's sequence is cut short, and a
//! request whose prompt starts like what another slot holds — running or idle — takes those
//! positions from it, stored once for both. `kv_budget` bounds the tokens all running
//! sequences may reach (each counts its prompt plus its reply limit, so one admitted always
//! finishes); a request that does not fit waits at the head of the queue. Idle slots' cached
//! prompts are the prefix cache: kept while the pool has room, least recently used dropped
//! first when a new sequence needs the pages.
//!
//! Each step decodes one token for every generating sequence and spends what is left of the
//! batch on prompt chunks of newcomers (small chunks while others are decoding, so a long
//! prompt does not stall them). New requests join between steps. A request whose prompt
//! shares a prefix with what a free slot still holds (same system prompt, the next chat turn)
//! goes to that slot and skips the shared part. A request whose client has gone (its event
//! sink is closed) leaves its slot before the next step.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_models::{BatchSeq, KvCache, Part, Scratch, MAX_BATCH};
use hearth_tokenizer::TokenId;

use crate::constraint::Constraint;
use crate::{FinishReason, LoadedModel, Next, RequestState, SamplingParams};

/// Largest prompt chunk per step while other sequences are decoding.
const PREFILL_CHUNK_WHILE_DECODING: usize = 64;

/// Prompt tokens a prefix taken from another slot must add over what the request's own
/// slot holds (below that, mapping pages is not worth it).
const SHARE_MIN_GAIN: usize = 16;

/// Shared prompt tokens worth waiting for another request to compute.
const WAIT_FOR_PREFIX_MIN: usize = 64;

/// Two distinct elements of `v`, both writable.
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b);
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &mut lo[b])
    }
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences decoded together.
    pub parallel: usize,
    /// Context (KV cache) length of every slot.
    pub n_ctx: usize,
    /// Requests waiting for a slot before `submit` refuses more.
    pub max_queue: usize,
    /// How the slots' KV caches store keys and values (set on the model when it loads).
    pub kv_type: hearth_models::KvType,
    /// KV positions the running sequences may reach together (`None`: `parallel × n_ctx`).
    pub kv_budget: Option<usize>,
}

impl SchedulerConfig {
    pub fn budget(&self) -> usize {
        self.kv_budget
            .unwrap_or(self.parallel.max(1).saturating_mul(self.n_ctx))
    }
}

/// Where a request's output goes. `send` returns false once the receiver is gone.
pub trait EventSink: Send {
    fn send(&mut self, event: Event) -> bool;
    fn is_closed(&self) -> bool;
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The next piece of generated text (stop strings held back and cut).
    Text(String),
    Done(Summary),
    Error(String),
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens found in the slot's cache and not computed again.
    pub prompt_cached: usize,
    pub completion_tokens: usize,
    pub queue_time: Duration,
    pub prompt_time: Duration,
    pub generation_time: Duration,
}

pub struct Job {
    pub prompt: Vec<TokenId>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Output must match this grammar.
    pub constraint: Option<Constraint>,
    pub sink: Box<dyn EventSink>,
}

pub enum SubmitError {
    QueueFull(Box<Job>),
    Stopped(Box<Job>),
}

/// Live figures for `/metrics` and `/api/ps`.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    /// KV cache positions in use by active sequences, and in all slots.
    pub kv_used: AtomicUsize,
    pub kv_capacity: AtomicUsize,
    /// Pages of the KV pool holding keys and values now (each once, however many sequences
    /// share it), and pages the budget allows; both 0 without a pool.
    pub kv_pages_used: AtomicUsize,
    pub kv_pages_total: AtomicUsize,
    /// Requests that found part of their prompt in a cache (their slot's or, shared,
    /// another's), and the prompt tokens they did not compute.
    pub prefix_hits: AtomicU64,
    pub prefix_tokens: AtomicU64,
    /// Of those, requests that took their prefix from another slot.
    pub prefix_shared: AtomicU64,
    pub steps: AtomicU64,
    pub cancelled: AtomicU64,
    /// Requests that ran to their end (stop, length, a tool call) and got their summary.
    pub completed: AtomicU64,
}

pub struct Scheduler {
    tx: SyncSender<(Job, Instant)>,
    pub stats: Arc<SchedulerStats>,
    pub config: SchedulerConfig,
}

impl Scheduler {
    pub fn start(model: Arc<LoadedModel>, config: SchedulerConfig) -> Self {
        let (tx, rx) = sync_channel(config.max_queue.max(1));
        let stats = Arc::new(SchedulerStats::default());
        let budget = config.budget();
        stats.kv_capacity.store(budget, Ordering::Relaxed);
        let parallel = config.parallel.max(1);
        let pool = match model.model.new_pool(parallel, config.n_ctx) {
            Ok(pool) => Some(pool),
            Err(e) => {
                tracing::info!("KV caches are not pooled: {e}");
                None
            }
        };
        if let Some(pool) = &pool {
            let pages = pool.pages_for_tokens(budget);
            stats.kv_pages_total.store(pages, Ordering::Relaxed);
        }
        let worker = Worker {
            slots: (0..parallel).map(|_| Slot::default()).collect(),
            model,
            pool,
            budget,
            reserved: 0,
            pending: None,
            clock: 0,
            n_ctx: config.n_ctx,
            stats: stats.clone(),
            scratch: Scratch::default(),
            logits: Vec::new(),
            turn: 0,
        };
        std::thread::Builder::new()
            .name("hearth-scheduler".into())
            .spawn(move || worker.run(rx))
            .expect("spawn the scheduler thread");
        Self { tx, stats, config }
    }

    /// Queues a request; refuses at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send((job, Instant::now())) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full((job, _)) => SubmitError::QueueFull(Box::new(job)),
                    TrySendError::Disconnected((job, _)) => SubmitError::Stopped(Box::new(job)),
                })
            }
        }
    }
}

#[derive(Default)]
struct Slot {
    cache: Option<KvCache>,
    /// Tokens whose keys and values the cache holds.
    cached: Vec<TokenId>,
    active: Option<Active>,
    /// When the slot last started or ended a request (a tick of `Worker::clock`), for
    /// dropping the least recently used cached prompt first.
    used_at: u64,
}

struct Active {
    job: Job,
    enqueued: Instant,
    started: Instant,
    prefill_done: Option<Instant>,
    /// Prompt tokens in the cache so far.
    fed: usize,
    prompt_cached: usize,
    /// KV positions this request may reach (its part of the budget).
    reserved: usize,
    /// Another slot computing this prompt's first `rows` tokens, to take them from once
    /// they are in its cache (this request's prompt waits meanwhile).
    wait_for: Option<(usize, usize)>,
    /// The tokens to run at the next step: the sampled one and any a grammar forced after
    /// it (empty while prefilling).
    next: Vec<TokenId>,
    state: RequestState,
}

/// What one sequence contributes to a step.
#[derive(Clone, Copy)]
enum Work {
    Prefill { slot: usize, from: usize, to: usize },
    Decode { slot: usize },
}

struct Worker {
    slots: Vec<Slot>,
    model: Arc<LoadedModel>,
    /// The slots' shared KV pool (`None` where pooling is unavailable: each cache owns its
    /// buffers).
    pool: Option<Arc<hearth_models::KvPool>>,
    budget: usize,
    /// Sum of the running requests' `reserved`.
    reserved: usize,
    /// The request at the head of the queue, waiting for room in the budget.
    pending: Option<(Job, Instant)>,
    clock: u64,
    n_ctx: usize,
    stats: Arc<SchedulerStats>,
    scratch: Scratch,
    logits: Vec<f32>,
    /// Steps run, to rotate which slot's decode is planned first when they do not all fit.
    turn: usize,
}

impl Worker {
    fn run(mut self, rx: Receiver<(Job, Instant)>) {
        loop {
            // Admit waiting requests while there are free slots; sleep only when idle.
            while self.slots.iter().any(|s| s.active.is_none()) {
                let busy = self.slots.iter().any(|s| s.active.is_some());
                let next = if let Some(waiting) = self.pending.take() {
                    waiting
                } else if busy {
                    match rx.try_recv() {
                        Ok(m) => m,
                        Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
                    }
                } else {
                    match rx.recv() {
                        Ok(m) => m,
                        Err(_) => return, // the scheduler was dropped
                    }
                };
                // Alone, a request always starts (`admit` refuses one the budget cannot hold).
                if busy && self.reserved + self.reservation(&next.0) > self.budget {
                    self.pending = Some(next);
                    break;
                }
                // Counted as active before it leaves the queue's count, so /metrics never
                // shows a request in flight as neither queued nor active.
                self.admit(next.0, next.1);
                self.publish();
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            }
            self.drop_cancelled();
            // Published before the step too: a client that has seen its first token must
            // find its sequence counted.
            self.publish();
            if self.slots.iter().any(|s| s.active.is_some()) {
                self.step();
                self.publish();
            }
        }
    }

    fn publish(&self) {
        let active = self.slots.iter().filter(|s| s.active.is_some());
        self.stats
            .active
            .store(active.clone().count(), Ordering::SeqCst);
        let used = active.filter_map(|s| s.cache.as_ref()).map(|c| c.len).sum();
        self.stats.kv_used.store(used, Ordering::Relaxed);
        if let Some(pool) = &self.pool {
            self.stats
                .kv_pages_used
                .store(pool.pages_used(), Ordering::Relaxed);
        }
    }

    /// KV positions `job` may reach: its prompt and its reply limit, within the context.
    fn reservation(&self, job: &Job) -> usize {
        job.prompt
            .len()
            .saturating_add(job.max_tokens)
            .min(self.n_ctx)
    }

    /// A cache for slot `index`: in the pool when there is one.
    fn new_cache(&self, index: usize) -> KvCache {
        let model = &self.model.model;
        if let Some(pool) = &self.pool {
            match model.new_pooled_cache(pool, index) {
                Ok(cache) => return cache,
                Err(e) => tracing::warn!("slot {index} KV cache not pooled: {e}"),
            }
        }
        model.new_cache(self.n_ctx)
    }

    /// Drops idle slots' cached prompts, least recently used first, until `pages` more
    /// fit in the budget's pages (slots in `keep` are spared).
    fn make_room(&mut self, pages: usize, keep: &[usize]) {
        let Some(pool) = self.pool.clone() else {
            return;
        };
        let limit = pool.pages_for_tokens(self.budget) + self.slots.len() * pool.pages_for(1);
        while pool.pages_used() + pages > limit {
            let victim = self
                .slots
                .iter()
                .enumerate()
                .filter(|(i, s)| {
                    s.active.is_none()
                        && !keep.contains(i)
                        && s.cache.as_ref().is_some_and(|c| c.len > 0)
                })
                .min_by_key(|(_, s)| s.used_at)
                .map(|(i, _)| i);
            let Some(i) = victim else { break };
            let slot = &mut self.slots[i];
            if let Some(c) = slot.cache.as_mut() {
                c.truncate(0);
            }
            slot.cached.clear();
        }
    }

    fn admit(&mut self, mut job: Job, enqueued: Instant) {
        let n_ctx = self.n_ctx;
        let problem = if job.prompt.is_empty() {
            Some("the prompt is empty".to_string())
        } else if job.prompt.len() >= n_ctx {
            Some(format!(
                "the prompt has {} tokens; the context holds {n_ctx}, including the reply",
                job.prompt.len()
            ))
        } else if let Some(&id) = job
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.model.model.config.n_vocab)
        {
            Some(format!("token id {id} is outside the vocabulary"))
        } else {
            job.params.validate().err()
        };
        let reserved = self.reservation(&job);
        let problem = problem.or_else(|| {
            (reserved > self.budget).then(|| {
                format!(
                    "the request needs {reserved} KV positions (prompt and max tokens); the \
                     server's KV budget holds {}",
                    self.budget
                )
            })
        });
        if let Some(msg) = problem {
            job.sink.send(Event::Error(msg));
            return;
        }
        // The free slot holding the longest prefix of this prompt.
        let Some((index, common)) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none())
            .map(|(i, s)| {
                let common = s
                    .cached
                    .iter()
                    .zip(&job.prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, common)
            })
            .max_by_key(|&(i, common)| (common, std::cmp::Reverse(i)))
        else {
            return;
        };
        if self.slots[index].cache.is_none() {
            self.slots[index].cache = Some(self.new_cache(index));
        }
        // At least one prompt token runs, to produce the first logits.
        let most = job.prompt.len() - 1;
        // Another slot (running or idle) holding a longer prefix gives it through the pool.
        let donor = self
            .slots
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != index)
            .filter_map(|(i, s)| {
                let c = s.cache.as_ref()?;
                let rows = (s.cached.iter().zip(&job.prompt))
                    .take_while(|(a, b)| a == b)
                    .count()
                    .min(most)
                    .min(c.len);
                c.can_share(rows).then_some((i, rows))
            })
            .max_by_key(|&(i, rows)| (rows, std::cmp::Reverse(i)))
            .filter(|&(_, rows)| rows > common.min(most) + SHARE_MIN_GAIN);
        let best_now = donor.map_or(common.min(most), |(_, rows)| rows);
        // A running request whose prompt starts like this one's, further than any cache
        // holds yet (requests sent together over one system prompt): wait for it to compute
        // that prefix and take it, instead of computing and storing it again.
        let wait_for = self
            .pool
            .as_ref()
            .and_then(|_| {
                self.slots
                    .iter()
                    .enumerate()
                    .filter(|&(i, s)| {
                        i != index && s.cache.as_ref().is_some_and(|c| c.pool_slot().is_some())
                    })
                    .filter_map(|(i, s)| {
                        let a = s.active.as_ref().filter(|a| a.wait_for.is_none())?;
                        let rows = (a.job.prompt.iter().zip(&job.prompt))
                            .take_while(|(x, y)| x == y)
                            .count()
                            .min(most);
                        Some((i, rows))
                    })
                    .max_by_key(|&(i, rows)| (rows, std::cmp::Reverse(i)))
            })
            .filter(|&(_, rows)| rows >= WAIT_FOR_PREFIX_MIN && rows > best_now + SHARE_MIN_GAIN);
        // Waiting takes the longer prefix in one share; taking a part of it now as well would
        // share (and count) twice for one request.
        let donor = donor.filter(|_| wait_for.is_none());
        let keep_slots = [index, donor.map_or(index, |d| d.0)];
        self.make_room(
            self.pool.as_ref().map_or(0, |p| p.pages_for(reserved)),
            &keep_slots,
        );
        let keep = match donor {
            Some((d, rows)) => self.take_prefix(index, d, rows, &job.prompt),
            None => {
                let slot = &mut self.slots[index];
                let cache = slot.cache.as_mut().expect("made above");
                let keep = cache.truncate(common.min(most));
                slot.cached.truncate(keep);
                keep
            }
        };
        if keep > 0 {
            self.stats.prefix_hits.fetch_add(1, Ordering::Relaxed);
            self.stats
                .prefix_tokens
                .fetch_add(keep as u64, Ordering::Relaxed);
        }
        self.clock += 1;
        self.reserved += reserved;
        let slot = &mut self.slots[index];
        slot.used_at = self.clock;
        let max_tokens = job.max_tokens.min(n_ctx - job.prompt.len());
        let now = Instant::now();
        let state = RequestState::new(
            job.params.clone(),
            &job.stop,
            max_tokens,
            job.constraint.take(),
        );
        slot.active = Some(Active {
            state,
            job,
            enqueued,
            started: now,
            prefill_done: None,
            fed: keep,
            prompt_cached: keep,
            reserved,
            wait_for,
            next: Vec::new(),
        });
        if max_tokens == 0 {
            self.finish(index, FinishReason::Length, String::new());
        }
    }

    /// Slot `index` (emptied) takes the first `rows` positions of slot `donor`'s cache, which
    /// are `prompt`'s first tokens; returns how many it got.
    fn take_prefix(
        &mut self,
        index: usize,
        donor: usize,
        rows: usize,
        prompt: &[TokenId],
    ) -> usize {
        let (taker, giver) = two_mut(&mut self.slots, index, donor);
        let (Some(cache), Some(from)) = (taker.cache.as_mut(), giver.cache.as_ref()) else {
            return 0;
        };
        let got = cache.share_prefix(from, rows);
        taker.cached.clear();
        taker.cached.extend_from_slice(&prompt[..got]);
        if got > 0 {
            self.stats.prefix_shared.fetch_add(1, Ordering::Relaxed);
        }
        got
    }

    /// Requests waiting for another slot to compute their prompt's prefix take it once it is
    /// there, or stop waiting (and compute it themselves) when it will not come.
    fn resolve_waits(&mut self) {
        for i in 0..self.slots.len() {
            let Some((d, rows)) = self.slots[i].active.as_ref().and_then(|a| a.wait_for) else {
                continue;
            };
            let prompt = &self.slots[i].active.as_ref().expect("checked").job.prompt;
            let donor = &self.slots[d];
            let holds = donor.cached.len() >= rows && donor.cached[..rows] == prompt[..rows];
            let coming = donor.active.as_ref().is_some_and(|a| {
                a.wait_for.is_none()
                    && a.job.prompt.len() >= rows
                    && a.job.prompt[..rows] == prompt[..rows]
            });
            if !holds && coming {
                continue;
            }
            let got = if holds && donor.cache.as_ref().is_some_and(|c| c.can_share(rows)) {
                let prompt = prompt.clone();
                self.take_prefix(i, d, rows, &prompt)
            } else {
                0
            };
            let a = self.slots[i].active.as_mut().expect("checked");
            a.wait_for = None;
            if got > a.fed {
                if a.prompt_cached == 0 {
                    self.stats.prefix_hits.fetch_add(1, Ordering::Relaxed);
                }
                self.stats
                    .prefix_tokens
                    .fetch_add((got - a.prompt_cached) as u64, Ordering::Relaxed);
                a.fed = got;
                a.prompt_cached = got;
            } else if got == 0 && a.fed > 0 {
                // Sharing failed after the cache was emptied: compute the prompt again.
                let slot = &mut self.slots[i];
                if slot.cache.as_ref().is_some_and(|c| c.len == 0) {
                    let a = slot.active.as_mut().expect("checked");
                    a.fed = 0;
                    a.prompt_cached = 0;
                }
            }
        }
    }

    /// Takes slot `index`'s request out, giving its part of the budget back.
    fn end(&mut self, index: usize) -> Option<Active> {
        let a = self.slots[index].active.take()?;
        self.reserved -= a.reserved;
        self.clock += 1;
        self.slots[index].used_at = self.clock;
        Some(a)
    }

    fn drop_cancelled(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i]
                .active
                .as_ref()
                .is_some_and(|a| a.job.sink.is_closed())
            {
                self.end(i);
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|(job, _)| job.sink.is_closed())
        {
            self.pending = None;
            // Counted as cancelled before it leaves the queue's count (see `run`).
            self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Plans and runs one batched forward pass, then samples for every sequence that got
    /// logits.
    fn step(&mut self) {
        self.resolve_waits();
        // Decoding sequences first, as many as the batch holds (a sequence with forced
        // tokens brings several; one that does not fit waits for the next step, and the
        // first slot considered moves round so none waits twice in a row for the same ones).
        let mut budget = MAX_BATCH;
        let n_slots = self.slots.len();
        let mut decode = vec![false; n_slots];
        self.turn = self.turn.wrapping_add(1);
        for i in (0..n_slots).map(|k| (k + self.turn) % n_slots) {
            let slot = &self.slots[i];
            if let Some(a) = slot.active.as_ref().filter(|a| !a.next.is_empty()) {
                if a.next.len() <= budget {
                    budget -= a.next.len();
                    decode[i] = true;
                }
            }
        }
        let chunk_cap = if decode.contains(&true) {
            PREFILL_CHUNK_WHILE_DECODING
        } else {
            MAX_BATCH
        };
        let mut plan = Vec::with_capacity(self.slots.len());
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(a) = &slot.active else { continue };
            if decode[i] {
                plan.push(Work::Decode { slot: i });
            } else if a.next.is_empty() && a.wait_for.is_none() && budget > 0 {
                let take = (a.job.prompt.len() - a.fed).min(budget).min(chunk_cap);
                budget -= take;
                plan.push(Work::Prefill {
                    slot: i,
                    from: a.fed,
                    to: a.fed + take,
                });
            }
        }
        let result = {
            let mut seqs = Vec::with_capacity(plan.len());
            // Each slot appears at most once in the plan, in slot order.
            let mut slots = self.slots.iter_mut().enumerate();
            for work in &plan {
                let want = match *work {
                    Work::Prefill { slot, .. } | Work::Decode { slot } => slot,
                };
                let (_, Slot { cache, active, .. }) = slots
                    .find(|(i, _)| *i == want)
                    .expect("planned slot exists");
                let (Some(cache), Some(a)) = (cache.as_mut(), active.as_ref()) else {
                    continue;
                };
                let (tokens, want_logits, part) = match *work {
                    Work::Prefill { from, to, .. } => (
                        &a.job.prompt[from..to],
                        to == a.job.prompt.len(),
                        Part::Prompt {
                            len: a.job.prompt.len(),
                        },
                    ),
                    Work::Decode { .. } => (a.next.as_slice(), true, Part::Generated),
                };
                seqs.push(BatchSeq {
                    tokens,
                    cache,
                    want_logits,
                    part,
                });
            }
            self.model
                .model
                .forward_batch(&mut seqs, &mut self.scratch, &mut self.logits)
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            for work in &plan {
                let (Work::Prefill { slot, .. } | Work::Decode { slot }) = *work;
                if let Some(mut a) = self.end(slot) {
                    a.job.sink.send(Event::Error(e.to_string()));
                }
            }
            return;
        }
        let n_vocab = self.model.model.config.n_vocab;
        let mut row = 0;
        for work in plan {
            let (index, got_logits) = match work {
                Work::Prefill { slot, from, to } => {
                    let s = &mut self.slots[slot];
                    if let Some(a) = s.active.as_mut() {
                        s.cached.extend_from_slice(&a.job.prompt[from..to]);
                        a.fed = to;
                    }
                    let done = s
                        .active
                        .as_ref()
                        .is_some_and(|a| a.fed == a.job.prompt.len());
                    (slot, done)
                }
                Work::Decode { slot } => {
                    let s = &mut self.slots[slot];
                    if let Some(a) = s.active.as_ref() {
                        s.cached.extend_from_slice(&a.next);
                    }
                    (slot, true)
                }
            };
            if got_logits {
                self.sample(index, row * n_vocab, n_vocab);
                row += 1;
            }
        }
    }

    /// Samples the next token of slot `index` from its logits row and streams the text.
    fn sample(&mut self, index: usize, offset: usize, n_vocab: usize) {
        let tok = &self.model.tokenizer;
        let n_ctx = self.n_ctx;
        let slot = &mut self.slots[index];
        let Some(a) = slot.active.as_mut() else {
            return;
        };
        if a.prefill_done.is_none() {
            a.prefill_done = Some(Instant::now());
        }
        let logits = &self.logits[offset..offset + n_vocab];
        match a.state.next(logits, &slot.cached, tok) {
            Next::Finish { reason, text } => self.finish(index, reason, text),
            Next::Continue { tokens, text } => {
                if !text.is_empty() && !a.job.sink.send(Event::Text(text)) {
                    self.end(index);
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if slot
                    .cache
                    .as_ref()
                    .is_some_and(|c| c.len + tokens.len() > n_ctx)
                {
                    // Context full: the tokens have no room to run.
                    let Next::Finish { text, .. } = a.state.finish(FinishReason::Length, true)
                    else {
                        unreachable!("finish returns Finish")
                    };
                    self.finish(index, FinishReason::Length, text);
                } else {
                    a.next = tokens;
                }
            }
        }
    }

    /// Ends slot `index`'s request, sending `text` (its last piece) and the summary.
    fn finish(&mut self, index: usize, finish: FinishReason, text: String) {
        let Some(mut a) = self.end(index) else {
            return;
        };
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
        if !text.is_empty() {
            a.job.sink.send(Event::Text(text));
        }
        let now = Instant::now();
        let prefill_done = a.prefill_done.unwrap_or(now);
        a.job.sink.send(Event::Done(Summary {
            finish,
            prompt_tokens: a.job.prompt.len(),
            prompt_cached: a.prompt_cached,
            completion_tokens: a.state.generated(),
            queue_time: a.started - a.enqueued,
            prompt_time: prefill_done - a.started,
            generation_time: now - prefill_done,
        }));
    }
}
