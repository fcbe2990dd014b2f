//! Prometheus metrics for `/metrics`.

use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::registry::Served;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub prompt_tokens_cached: IntCounter,
    pub generated_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
    queue_depth: IntGauge,
    active: IntGauge,
    kv_used: IntGauge,
    kv_capacity: IntGauge,
    cancelled: IntGauge,
    completed: IntGauge,
    steps: IntGauge,
    // Per model, under the names autoscalers and endpoint pickers read (as vLLM's).
    waiting: IntGaugeVec,
    running: IntGaugeVec,
    kv_usage: GaugeVec,
    // The KV page pool, per model.
    kv_pages_used: IntGaugeVec,
    kv_pages_free: IntGaugeVec,
    prefix_hits: IntGaugeVec,
    prefix_shared: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "hearth_requests_total",
                "HTTP requests by endpoint and status",
            ),
            &["endpoint", "status"],
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let per_model = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["model"]).expect("valid metric")
        };
        let m = Self {
            requests,
            prompt_tokens: counter("hearth_prompt_tokens_total", "Prompt tokens received"),
            prompt_tokens_cached: counter(
                "hearth_prompt_tokens_cached_total",
                "Prompt tokens reused from the KV cache",
            ),
            generated_tokens: counter("hearth_generated_tokens_total", "Tokens generated"),
            time_to_first_token: Histogram::with_opts(
                HistogramOpts::new(
                    "hearth_time_to_first_token_seconds",
                    "From request to first generated text",
                )
                .buckets(vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
            )
            .expect("valid metric"),
            inter_token: Histogram::with_opts(
                HistogramOpts::new(
                    "hearth_inter_token_seconds",
                    "Between consecutive pieces of generated text",
                )
                .buckets(vec![0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]),
            )
            .expect("valid metric"),
            queue_depth: gauge("hearth_queue_depth", "Requests waiting for a slot"),
            active: gauge("hearth_active_sequences", "Sequences being processed"),
            kv_used: gauge(
                "hearth_kv_cache_used_tokens",
                "KV cache positions held by active sequences",
            ),
            kv_capacity: gauge(
                "hearth_kv_cache_capacity_tokens",
                "KV cache positions of all slots of loaded models",
            ),
            cancelled: gauge(
                "hearth_cancelled_requests",
                "Requests dropped because the client went away",
            ),
            completed: gauge(
                "hearth_completed_requests",
                "Requests generated to their end (stop, length or a tool call)",
            ),
            steps: gauge(
                "hearth_forward_steps_total",
                "Batched forward passes run by the schedulers",
            ),
            waiting: IntGaugeVec::new(
                Opts::new(
                    "hearth_num_requests_waiting",
                    "Requests waiting for a sequence slot, per model",
                ),
                &["model"],
            )
            .expect("valid metric"),
            running: IntGaugeVec::new(
                Opts::new(
                    "hearth_num_requests_running",
                    "Requests being prefilled or decoded, per model",
                ),
                &["model"],
            )
            .expect("valid metric"),
            kv_usage: GaugeVec::new(
                Opts::new(
                    "hearth_kv_cache_usage_ratio",
                    "KV cache positions in use over all positions (0-1), per model",
                ),
                &["model"],
            )
            .expect("valid metric"),
            kv_pages_used: per_model(
                "hearth_kv_pages_used",
                "KV pool pages holding keys and values (a page shared by sequences counts once)",
            ),
            kv_pages_free: per_model(
                "hearth_kv_pages_free",
                "KV pool pages the budget (--kv-budget) still allows",
            ),
            prefix_hits: per_model(
                "hearth_kv_prefix_hits_total",
                "Requests that found part of their prompt in a KV cache",
            ),
            prefix_shared: per_model(
                "hearth_kv_prefix_shared_total",
                "Requests that took their prompt prefix from another sequence's pages",
            ),
            registry,
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.prompt_tokens_cached.clone()),
            Box::new(m.generated_tokens.clone()),
            Box::new(m.time_to_first_token.clone()),
            Box::new(m.inter_token.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.active.clone()),
            Box::new(m.kv_used.clone()),
            Box::new(m.kv_capacity.clone()),
            Box::new(m.cancelled.clone()),
            Box::new(m.completed.clone()),
            Box::new(m.steps.clone()),
            Box::new(m.waiting.clone()),
            Box::new(m.running.clone()),
            Box::new(m.kv_usage.clone()),
            Box::new(m.kv_pages_used.clone()),
            Box::new(m.kv_pages_free.clone()),
            Box::new(m.prefix_hits.clone()),
            Box::new(m.prefix_shared.clone()),
        ] {
            m.registry.register(c).expect("metric registered once");
        }
        m
    }

    /// The Prometheus text exposition, with the schedulers' live figures.
    pub fn render(&self, served: &[std::sync::Arc<Served>]) -> String {
        let sum = |f: &dyn Fn(&Served) -> usize| served.iter().map(|s| f(s)).sum::<usize>() as i64;
        let stat = |s: &Served| s.scheduler.stats.clone();
        // The queue before the slots: a request moving between them is counted as active
        // before it leaves the queue's count, so one scrape never misses it.
        self.queue_depth
            .set(sum(&|s| stat(s).queued.load(Ordering::SeqCst)));
        self.active
            .set(sum(&|s| stat(s).active.load(Ordering::SeqCst)));
        self.kv_used
            .set(sum(&|s| stat(s).kv_used.load(Ordering::Relaxed)));
        self.kv_capacity
            .set(sum(&|s| stat(s).kv_capacity.load(Ordering::Relaxed)));
        self.cancelled
            .set(sum(&|s| stat(s).cancelled.load(Ordering::Relaxed) as usize));
        self.completed
            .set(sum(&|s| stat(s).completed.load(Ordering::Relaxed) as usize));
        self.steps
            .set(sum(&|s| stat(s).steps.load(Ordering::Relaxed) as usize));
        self.waiting.reset();
        self.running.reset();
        self.kv_usage.reset();
        for g in [
            &self.kv_pages_used,
            &self.kv_pages_free,
            &self.prefix_hits,
            &self.prefix_shared,
        ] {
            g.reset();
        }
        for s in served {
            let st = &s.scheduler.stats;
            let model = [s.name.as_str()];
            let pages = st.kv_pages_used.load(Ordering::Relaxed);
            let total = st.kv_pages_total.load(Ordering::Relaxed);
            self.kv_pages_used
                .with_label_values(&model)
                .set(pages as i64);
            self.kv_pages_free
                .with_label_values(&model)
                .set(total.saturating_sub(pages) as i64);
            self.prefix_hits
                .with_label_values(&model)
                .set(st.prefix_hits.load(Ordering::Relaxed) as i64);
            self.prefix_shared
                .with_label_values(&model)
                .set(st.prefix_shared.load(Ordering::Relaxed) as i64);
            self.waiting
                .with_label_values(&model)
                .set(st.queued.load(Ordering::Relaxed) as i64);
            self.running
                .with_label_values(&model)
                .set(st.active.load(Ordering::Relaxed) as i64);
            let capacity = st.kv_capacity.load(Ordering::Relaxed);
            let used = st.kv_used.load(Ordering::Relaxed);
            self.kv_usage
                .with_label_values(&model)
                .set(if capacity == 0 {
                    0.0
                } else {
                    (used as f64 / capacity as f64).min(1.0)
                });
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
