//! Continuous batching: one worker thread per model runs up to `parallel` sequences, each in
//! its own KV cache slot with the full context, through one batched forward pass per step.
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
    pub steps: AtomicU64,
    pub cancelled: AtomicU64,
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
        stats
            .kv_capacity
            .store(config.parallel * config.n_ctx, Ordering::Relaxed);
        let worker = Worker {
            slots: (0..config.parallel.max(1))
                .map(|_| Slot::default())
                .collect(),
            model,
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
}

struct Active {
    job: Job,
    enqueued: Instant,
    started: Instant,
    prefill_done: Option<Instant>,
    /// Prompt tokens in the cache so far.
    fed: usize,
    prompt_cached: usize,
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
                let next = if busy {
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
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                self.admit(next.0, next.1);
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
            .store(active.clone().count(), Ordering::Relaxed);
        let used = active.filter_map(|s| s.cache.as_ref()).map(|c| c.len).sum();
        self.stats.kv_used.store(used, Ordering::Relaxed);
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
        let model = &self.model.model;
        let slot = &mut self.slots[index];
        let cache = slot.cache.get_or_insert_with(|| model.new_cache(n_ctx));
        // At least one prompt token runs, to produce the first logits.
        let keep = cache.truncate(common.min(job.prompt.len() - 1));
        slot.cached.truncate(keep);
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
            next: Vec::new(),
        });
        if max_tokens == 0 {
            self.finish(index, FinishReason::Length, String::new());
        }
    }

    fn drop_cancelled(&mut self) {
        for slot in &mut self.slots {
            if slot.active.as_ref().is_some_and(|a| a.job.sink.is_closed()) {
                slot.active = None;
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Plans and runs one batched forward pass, then samples for every sequence that got
    /// logits.
    fn step(&mut self) {
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
            } else if a.next.is_empty() && budget > 0 {
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
                if let Some(mut a) = self.slots[slot].active.take() {
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
                    slot.active = None;
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
        let Some(mut a) = self.slots[index].active.take() else {
            return;
        };
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
