use crate::resolve::{physical_cores, resolve_model};
use crate::{
    ChatArgs, EmbedArgs, ListArgs, ModelArgs, PullArgs, RmArgs, RunArgs, SamplingArgs, ServeArgs,
    ShowArgs, TokenizeArgs,
};
use anyhow::{Context, Result};
use hearth_engine::constraint::{GrammarSpec, Grammars};
use hearth_engine::{GenerateRequest, GenerationStats, LoadedModel, SamplingParams, Session};
use hearth_gguf::Gguf;
use hearth_tokenizer::template::{builtin_for_arch, Message};
use hearth_tokenizer::Tokenizer;
use std::io::{BufRead, Write};

/// `println!` that returns an error instead of panicking when stdout is closed
/// (`hearth list | head`).
macro_rules! outln {
    ($($t:tt)*) => { writeln!(std::io::stdout(), $($t)*)? };
}
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn open_gguf(name: &str) -> Result<Arc<Gguf>> {
    let path = resolve_model(name)?;
    let g = Gguf::open(&path).with_context(|| format!("loading {}", path.display()))?;
    Ok(Arc::new(g))
}

fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(physical_cores).max(1);
    hearth_quant::pool::set_threads(n);
    Ok(n)
}

pub fn load(args: &ModelArgs, verbose: bool) -> Result<LoadedModel> {
    let t = Instant::now();
    let threads = init_threads(args.threads)?;
    if args.ctx == 0 {
        anyhow::bail!("--ctx must be at least 1");
    }
    let mut loaded = LoadedModel::from_gguf(open_gguf(&args.model)?)?;
    loaded
        .model
        .set_kv_type(crate::resolve::kv_type(args.kv_type)?)?;
    loaded.model.check_memory(args.ctx, 1)?;
    if verbose {
        let k = hearth_quant::dispatch::kernels();
        eprintln!(
            "hearth: {} ({} layers, {} vocab), {} threads, kernels: {}, KV cache: {}, loaded in {:.0} ms",
            loaded.arch,
            loaded.model.config.n_layer,
            loaded.model.config.n_vocab,
            threads,
            k.isa.name(),
            loaded.model.kv_type().name(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(loaded)
}

pub fn sampling_params(s: &SamplingArgs) -> Result<SamplingParams> {
    let p = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        }),
    };
    p.validate().map_err(anyhow::Error::msg)?;
    Ok(p)
}

/// Renders `messages` with the model's template and tokenizes it: template text with
/// special tokens parsed, message text without.
fn print_timings(s: &GenerationStats) {
    eprintln!(
        "\nhearth: prompt {} tokens ({} computed) {:.1} t/s | generated {} tokens {:.1} t/s | {}",
        s.prompt_tokens,
        s.prompt_evaluated,
        s.prompt_tps(),
        s.generated_tokens,
        s.generation_tps(),
        match s.finish {
            hearth_engine::FinishReason::Stop => "stop",
            hearth_engine::FinishReason::Length => "length",
            hearth_engine::FinishReason::Cancelled => "cancelled",
        }
    );
}

/// The grammar `hearth run` was asked to follow, read from its file.
fn grammar_spec(a: &RunArgs) -> Result<Option<GrammarSpec>> {
    let read = |path: &std::path::Path| -> Result<String> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if meta.len() > hearth_engine::constraint::MAX_GRAMMAR_BYTES as u64 {
            anyhow::bail!(
                "{} has {} bytes; at most {} are accepted",
                path.display(),
                meta.len(),
                hearth_engine::constraint::MAX_GRAMMAR_BYTES
            );
        }
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    Ok(if a.json {
        Some(GrammarSpec::JsonObject)
    } else if let Some(path) = &a.json_schema {
        let schema = serde_json::from_str(&read(path)?)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Some(GrammarSpec::JsonSchema(schema))
    } else if let Some(path) = &a.grammar {
        Some(GrammarSpec::grammar(read(path)?))
    } else {
        a.regex.clone().map(GrammarSpec::Regex)
    })
}

pub fn run(a: RunArgs, verbose: bool) -> Result<()> {
    let l = Arc::new(load(&a.model, verbose)?);
    let params = sampling_params(&a.sampling)?;
    let prompt = if a.raw {
        l.tokenizer.encode(&a.prompt, true, true)
    } else {
        let mut msgs = Vec::new();
        if let Some(sys) = &a.system {
            msgs.push(Message::new("system", sys));
        }
        msgs.push(Message::new("user", &a.prompt));
        l.chat_tokens(&msgs)?
    };
    let mut session = Session::new(&l.model, &l.tokenizer, a.model.ctx);
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        let _ = ctrlc::set_handler(move || cancel.store(true, Ordering::Relaxed));
    }
    let constraint = match grammar_spec(&a)? {
        Some(spec) => {
            let grammars = Grammars::new(l.clone())?;
            Some(grammars.compile(&spec)?)
        }
        None => None,
    };
    let req = GenerateRequest {
        prompt: &prompt,
        params,
        max_tokens: a.sampling.max_tokens,
        stop: &a.sampling.stop,
        constraint,
    };
    let mut stdout = std::io::stdout().lock();
    let stats = session.generate(req, &cancel, |text| {
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    print_timings(&stats);
    Ok(())
}

pub fn chat(a: ChatArgs, verbose: bool) -> Result<()> {
    let l = load(&a.model, verbose)?;
    let mut session = Session::new(&l.model, &l.tokenizer, a.model.ctx);
    let cancel = Arc::new(AtomicBool::new(false));
    let generating = Arc::new(AtomicBool::new(false));
    {
        let (cancel, generating) = (cancel.clone(), generating.clone());
        // Ctrl-C stops the current reply; at the prompt it quits.
        ctrlc::set_handler(move || {
            if generating.load(Ordering::Relaxed) {
                cancel.store(true, Ordering::Relaxed);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })?;
    }
    let mut messages = Vec::new();
    if let Some(sys) = &a.system {
        messages.push(Message::new("system", sys));
    }
    eprintln!("hearth chat: type a message, Enter to send; Ctrl-C stops a reply, Ctrl-D quits.");
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let text = line.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        messages.push(Message::new("user", text));
        let prompt = l.chat_tokens(&messages)?;
        let params = sampling_params(&a.sampling)?;
        let req = GenerateRequest {
            prompt: &prompt,
            params,
            max_tokens: a.sampling.max_tokens,
            stop: &a.sampling.stop,
            constraint: None,
        };
        cancel.store(false, Ordering::Relaxed);
        generating.store(true, Ordering::Relaxed);
        let mut reply = String::new();
        let mut stdout = std::io::stdout().lock();
        let result = session.generate(req, &cancel, |t| {
            reply.push_str(t);
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        });
        generating.store(false, Ordering::Relaxed);
        let _ = writeln!(stdout);
        drop(stdout);
        match result {
            Ok(stats) => {
                if verbose {
                    print_timings(&stats);
                }
                messages.push(Message::new("assistant", &reply));
            }
            Err(e) => {
                // Keep the conversation usable: drop the turn that failed.
                messages.pop();
                eprintln!("error: {e}");
            }
        }
    }
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let g = open_gguf(&a.model)?;
    let tok = Tokenizer::from_gguf(&g)?;
    let ids = tok.encode(&a.text, !a.no_special, true);
    if a.json {
        outln!("{}", serde_json::to_string(&ids)?);
    } else {
        for id in ids {
            let piece = String::from_utf8_lossy(&tok.token_to_piece(id, true)).into_owned();
            outln!("{id:>7} {piece:?}");
        }
    }
    Ok(())
}

/// A metadata value for display: scalars as they are, arrays by type and length (the first
/// few items of short ones).
fn describe(v: &hearth_gguf::Value) -> String {
    use hearth_gguf::Value;
    match v {
        Value::String(s) if s.len() > 120 => format!(
            "{:?}… ({} bytes)",
            &s[..s.floor_char_boundary_compat(100)],
            s.len()
        ),
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) if items.len() <= 8 => {
            let inner: Vec<String> = (0..items.len())
                .filter_map(|i| items.get(i))
                .map(|v| describe(&v))
                .collect();
            format!("[{}]", inner.join(", "))
        }
        Value::Array(items) => format!("[{} × {}]", items.len(), items.item_type()),
        other => other
            .as_int()
            .map(|i| i.to_string())
            .or_else(|| other.as_f64().map(|f| f.to_string()))
            .unwrap_or_default(),
    }
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, at: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, at: usize) -> usize {
        (0..=at.min(self.len()))
            .rev()
            .find(|&i| self.is_char_boundary(i))
            .unwrap_or(0)
    }
}

pub fn show(a: ShowArgs) -> Result<()> {
    let g = open_gguf(&a.model)?;
    if a.metadata {
        for (key, value) in g.metadata() {
            outln!("{key} = {}", describe(value));
        }
        return Ok(());
    }
    if a.template {
        let arch = g.require_str("general.architecture")?;
        let source = match g.get_str("tokenizer.chat_template")? {
            Some(t) => t.to_string(),
            None => builtin_for_arch(arch)
                .unwrap_or(hearth_tokenizer::template::CHATML_TEMPLATE)
                .to_string(),
        };
        outln!("{source}");
        return Ok(());
    }
    let arch = g.require_str("general.architecture")?.to_string();
    let name = g.get_str("general.name")?.unwrap_or("").to_string();
    let license = g.get_str("general.license")?.unwrap_or("").to_string();
    let params: u64 = g.tensors.iter().map(|t| t.n_elements).sum();
    let mut mix: Vec<(String, usize)> = Vec::new();
    for t in &g.tensors {
        match mix.iter_mut().find(|(n, _)| n == t.ty.name()) {
            Some(e) => e.1 += 1,
            None => mix.push((t.ty.name().to_string(), 1)),
        }
    }
    mix.sort_by_key(|m| std::cmp::Reverse(m.1));
    let ctx = g
        .get_usize(&format!("{arch}.context_length"), 0, usize::MAX)?
        .unwrap_or(0);
    let template = if g.get_str("tokenizer.chat_template")?.is_some() {
        "from the model file"
    } else if builtin_for_arch(&arch).is_some() {
        "built-in for this architecture"
    } else {
        "none (ChatML fallback)"
    };
    let config = hearth_models::Config::from_gguf(&g);
    if a.json {
        let v = serde_json::json!({
            "architecture": arch,
            "name": name,
            "parameters": params,
            "file_type": file_type_label(&g),
            "quantization": mix.iter().map(|(n, c)| serde_json::json!({"type": n, "tensors": c})).collect::<Vec<_>>(),
            "context_length": ctx,
            "chat_template": template,
            "file_size": g.file_size(),
            "gguf_version": g.version,
            "supported": config.is_ok(),
            "license": license,
            "template_source": g.get_str("tokenizer.chat_template")?.map(str::to_string).or_else(|| builtin_for_arch(&arch).map(str::to_string)),
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    outln!("  architecture    {arch}");
    if !name.is_empty() {
        outln!("  name            {name}");
    }
    outln!("  parameters      {:.1}M", params as f64 / 1e6);
    let mix_s: Vec<String> = mix.iter().map(|(n, c)| format!("{n}×{c}")).collect();
    outln!(
        "  quantization    {} ({})",
        file_type_label(&g),
        mix_s.join(", ")
    );
    let lacking: Vec<&str> = mix
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !hearth_quant::SUPPORTED_TYPES.iter().any(|t| t.name() == *n))
        .collect();
    if !lacking.is_empty() {
        outln!(
            "  not supported   tensor types {} (hearth computes with {})",
            lacking.join(", "),
            hearth_quant::SUPPORTED_TYPES
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    outln!("  context length  {ctx}");
    if let Ok(c) = &config {
        outln!(
            "  shape           {} layers, {} embd, {} heads ({} kv), {} head dim, {} vocab",
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.n_kv_head,
            c.head_dim,
            c.n_vocab
        );
    } else if let Err(e) = &config {
        outln!("  supported       no: {e}");
    }
    outln!("  chat template   {template}");
    if !license.is_empty() {
        outln!("  license         {license}");
    }
    outln!(
        "  file size       {:.1} MiB (GGUF v{})",
        g.file_size() as f64 / (1 << 20) as f64,
        g.version
    );
    Ok(())
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GB", b as f64 / 1e9),
        b if b >= 1 << 20 => format!("{:.0} MB", b as f64 / 1e6),
        b => format!("{:.0} KB", b as f64 / 1e3),
    }
}

pub fn pull(a: PullArgs) -> Result<()> {
    let store = hearth_store::Store::open_default();
    let mut opts = hearth_store::PullOptions::from_env();
    opts.name = a.name;
    opts.sha256 = a.sha256;
    let m = store.pull(&a.source, &opts)?;
    outln!("pulled {} ({}, {})", m.name, human_size(m.size), m.digest);
    Ok(())
}

/// The quantization label of a GGUF: llama.cpp's file type, else its commonest tensor type.
fn quant_label(path: &std::path::Path) -> String {
    match Gguf::open(path) {
        Ok(g) => file_type_label(&g),
        Err(_) => "?".into(),
    }
}

/// The file's quantization name (`general.file_type`, else its most common tensor type).
pub(crate) fn file_type_label(g: &Gguf) -> String {
    if let Some(name) = g.file_type() {
        return name.to_string();
    }
    let mut by_type: Vec<(&str, u64)> = Vec::new();
    for t in &g.tensors {
        match by_type.iter_mut().find(|(n, _)| *n == t.ty.name()) {
            Some(e) => e.1 += t.n_elements,
            None => by_type.push((t.ty.name(), t.n_elements)),
        }
    }
    by_type
        .into_iter()
        .max_by_key(|e| e.1)
        .map_or("?".into(), |e| e.0.to_string())
}

pub fn list(a: ListArgs) -> Result<()> {
    let store = hearth_store::Store::open_default();
    let scan = store.scan();
    for w in &scan.warnings {
        eprintln!("warning: {w}");
    }
    let entries = scan.entries;
    if a.json {
        let rows: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.name,
                    "aliases": e.aliases,
                    "path": e.path,
                    "size": e.size,
                    "digest": e.digest,
                    "quantization": quant_label(&e.path),
                    "modified": e.modified,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let width = entries
        .iter()
        .map(|e| e.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    outln!(
        "{:width$}  {:12}  {:>8}  {:8}  MODIFIED",
        "NAME",
        "ID",
        "SIZE",
        "QUANT"
    );
    for e in &entries {
        let id = e
            .digest
            .as_deref()
            .and_then(|d| d.strip_prefix("sha256:"))
            .map_or("-".to_string(), |h| h[..12.min(h.len())].to_string());
        outln!(
            "{:width$}  {:12}  {:>8}  {:8}  {}",
            e.name,
            id,
            human_size(e.size),
            quant_label(&e.path),
            hearth_store::ago(e.modified)
        );
    }
    Ok(())
}

pub fn rm(a: RmArgs) -> Result<()> {
    let store = hearth_store::Store::open_default();
    for name in &a.names {
        store.remove(name)?;
        outln!("deleted {name}");
    }
    Ok(())
}

pub fn serve(a: ServeArgs) -> Result<()> {
    init_threads(a.threads)?;
    // A directory asked for by name must be one (the default cache may not exist yet).
    if let Some(dir) = &a.models {
        if dir.is_file() {
            anyhow::bail!(
                "--models {}: a file, not a directory; pass the directory holding it ({}) and ask for it by the name GET /v1/models lists",
                dir.display(),
                dir.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."))
                    .display()
            );
        }
        if !dir.is_dir() {
            anyhow::bail!("--models {}: no such directory", dir.display());
        }
    }
    let config = hearth_server::ServerConfig {
        models_dir: a.models.unwrap_or_else(hearth_store::default_root),
        parallel: a.parallel.max(1),
        n_ctx: a.ctx.max(2),
        kv_type: crate::resolve::kv_type(a.kv_type)?,
        kv_budget: a.kv_budget.map(|b| b as usize),
        max_queue: a.max_queue,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        body_limit: a.body_limit,
        header_timeout: std::time::Duration::from_secs(a.header_timeout.max(1)),
        cors_origins: a.cors_origins.clone(),
        replica_name: a.replica_name.clone().filter(|n| !n.is_empty()),
        preload: a.preload.clone(),
    };
    // A name that is not offered is a typo: say so now, not as a probe that never turns 200.
    let store = hearth_store::Store::new(&config.models_dir);
    for name in &config.preload {
        if let Err(e) = store.lookup(name) {
            anyhow::bail!(
                "--preload {name}: {e} (models in {})",
                config.models_dir.display()
            );
        }
    }
    if let Some(name) = &config.replica_name {
        if !name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            anyhow::bail!("--replica-name {name:?}: not usable in an HTTP header");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "hearth: serving {} on http://{addr} (OpenAI /v1, Ollama /api){}",
            config.models_dir.display(),
            if config.api_key.is_some() {
                ", API key required"
            } else {
                ""
            }
        );
        for w in hearth_store::Store::new(&config.models_dir).scan().warnings {
            eprintln!("hearth: warning: {w}");
        }
        let state = hearth_server::AppState::new(config);
        let grace = a.shutdown_grace;
        let shutdown = async move {
            shutdown_signal().await;
            eprintln!(
                "hearth: draining: /health answers 503, new requests 503; requests in flight get up to {grace} s to finish"
            );
        };
        hearth_server::serve(
            listener,
            state,
            shutdown,
            std::time::Duration::from_secs(a.shutdown_grace),
        )
        .await?;
        eprintln!("hearth: stopped");
        Ok(())
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub fn embed(a: EmbedArgs) -> Result<()> {
    init_threads(a.threads)?;
    let dir = if std::path::Path::new(&a.model).is_dir() {
        std::path::PathBuf::from(&a.model)
    } else {
        hearth_store::Store::open_default().resolve_encoder(&a.model)?
    };
    let model =
        hearth_embed::Embedder::open(&dir).with_context(|| format!("loading {}", dir.display()))?;
    let texts: Vec<String> = match (&a.file, a.texts.is_empty()) {
        (Some(f), _) if f.as_os_str() == "-" => std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<_>>()?,
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .lines()
            .map(str::to_string)
            .collect(),
        (None, false) => a.texts.clone(),
        (None, true) => std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<_>>()?,
    };
    let bar = if texts.len() > a.batch.max(1) {
        let bar = indicatif::ProgressBar::new(texts.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "embedding {bar:30} {pos}/{len} {per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut vectors = Vec::with_capacity(texts.len());
    let mut truncated = 0;
    for chunk in texts.chunks(a.batch.max(1)) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for e in model.embed(&refs, a.batch)? {
            truncated += usize::from(e.truncated);
            vectors.push(e.vector);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if truncated > 0 {
        eprintln!(
            "hearth: {truncated} text(s) longer than {} tokens were truncated",
            model.max_tokens
        );
    }
    if a.json {
        outln!("{}", serde_json::to_string(&vectors)?);
    } else {
        for v in &vectors {
            let line: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
            outln!("{}", line.join(" "));
        }
    }
    Ok(())
}
