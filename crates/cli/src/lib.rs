//! The `hearth` command line: run, chat, tokenize, show, pull, list, rm, serve, embed,
//! bench, perplexity.

mod bench;
mod commands;
mod perplexity;
pub mod resolve;

use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Local, edge-first AI inference on your own CPU"
)]
struct Cli {
    /// Log kernel choices and load details to stderr.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (wrapped in the model's chat template unless --raw).
    Run(RunArgs),
    /// Interactive multi-turn chat.
    Chat(ChatArgs),
    /// Print the token ids of TEXT (exactly what `run --raw` feeds the model).
    Tokenize(TokenizeArgs),
    /// Describe a model file.
    Show(ShowArgs),
    /// Download a model into the cache: hf.co/ORG/REPO[:QUANT], ORG/REPO/FILE.gguf, an
    /// http(s) URL, or a local .gguf to import.
    Pull(PullArgs),
    /// List cached models.
    #[command(alias = "ls")]
    List(ListArgs),
    /// Remove cached models.
    Rm(RmArgs),
    /// OpenAI- and Ollama-compatible HTTP server for the cached models.
    Serve(ServeArgs),
    /// Sentence embeddings: one vector per text (arguments, else lines of --file or stdin).
    Embed(EmbedArgs),
    /// Prompt-processing and generation speed, defined as llama-bench defines them.
    Bench(BenchArgs),
    /// Perplexity of a text, and KL divergence against a base model's logits, defined as
    /// llama-perplexity defines them (its base-logits files work with both tools).
    Perplexity(PerplexityArgs),
}

#[derive(Args)]
pub struct PerplexityArgs {
    /// A cached model name or a path to a .gguf file.
    pub model: String,
    /// The text to evaluate (not needed with --kl-divergence: the base file holds its tokens).
    #[arg(short = 'f', long = "file")]
    pub file: Option<std::path::PathBuf>,
    /// Tokens per chunk; the second half of each chunk is scored.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx: usize,
    /// Accepted for llama-perplexity command lines; hearth batches up to 256 tokens itself.
    #[arg(short = 'b', long = "batch-size")]
    pub batch: Option<usize>,
    /// Evaluate at most this many chunks.
    #[arg(long)]
    pub chunks: Option<usize>,
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// The base-logits file: written (every scored position's log-probabilities), or read
    /// with --kl-divergence.
    #[arg(long = "kl-divergence-base", visible_alias = "save-all-logits")]
    pub logits_file: Option<std::path::PathBuf>,
    /// Compare with the base-logits file: KL divergence, top-token agreement, Δp.
    #[arg(long)]
    pub kl_divergence: bool,
    /// How the KV cache stores keys and values: f16, q8_0 (half the memory) or q4_0 (a
    /// quarter), as llama.cpp's --cache-type-k/-v. Default: OLLAMA_KV_CACHE_TYPE if set,
    /// else f16.
    #[arg(long = "kv-type", env = "HEARTH_KV_TYPE", value_name = "TYPE")]
    pub kv_type: Option<hearth_models::KvType>,
}

#[derive(Args)]
pub struct BenchArgs {
    /// A cached model name or a path to a .gguf file.
    pub model: String,
    /// Prompt lengths to test (comma-separated; 0 skips).
    #[arg(short = 'p', long = "n-prompt", default_value = "512")]
    pub n_prompt: String,
    /// Generation lengths to test (comma-separated; 0 skips).
    #[arg(short = 'n', long = "n-gen", default_value = "128")]
    pub n_gen: String,
    /// Thread counts to test (comma-separated; default: physical cores).
    #[arg(short = 't', long)]
    pub threads: Option<String>,
    /// Tokens already in the KV cache when each test starts (comma-separated), as
    /// llama-bench's -d: decode speed at a long context.
    #[arg(short = 'd', long = "n-depth", default_value = "0")]
    pub n_depth: String,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    pub reps: usize,
    /// Print llama-bench's JSON records instead of a table.
    #[arg(long)]
    pub json: bool,
    /// How the KV cache stores keys and values: f16, q8_0 (half the memory) or q4_0 (a
    /// quarter), as llama.cpp's --cache-type-k/-v. Default: OLLAMA_KV_CACHE_TYPE if set,
    /// else f16.
    #[arg(long = "kv-type", env = "HEARTH_KV_TYPE", value_name = "TYPE")]
    pub kv_type: Option<hearth_models::KvType>,
}

#[derive(Args)]
pub struct EmbedArgs {
    /// An embedding model name (minilm) or a sentence-transformers directory.
    pub model: String,
    pub texts: Vec<String>,
    /// Read texts from this file, one per line ("-" for stdin).
    #[arg(long)]
    pub file: Option<std::path::PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Print one JSON array of vectors.
    #[arg(long)]
    pub json: bool,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback unless you say otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 11435)]
    pub port: u16,
    /// Directory of models to offer (default: the model cache).
    #[arg(long)]
    pub models: Option<std::path::PathBuf>,
    /// Sequences decoded together per model (1 to 256, the tokens one forward pass takes).
    #[arg(long, default_value_t = 4, value_parser = parse_parallel)]
    pub parallel: usize,
    /// Context length of every sequence.
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// How the KV cache stores keys and values: f16, q8_0 (half the memory) or q4_0 (a
    /// quarter), as llama.cpp's --cache-type-k/-v. Default: OLLAMA_KV_CACHE_TYPE if set,
    /// else f16.
    #[arg(long = "kv-type", env = "HEARTH_KV_TYPE", value_name = "TYPE")]
    pub kv_type: Option<hearth_models::KvType>,
    /// KV cache positions a model's running sequences may reach together (each counts its
    /// prompt plus its max tokens); a request that does not fit waits. Default: --parallel ×
    /// --ctx. The slots share one page pool: memory is taken as positions are written, and a
    /// prompt prefix held by another slot is shared, not stored again.
    #[arg(long = "kv-budget", value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..=1u64 << 40))]
    pub kv_budget: Option<u64>,
    /// Requests waiting per model before the server answers 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY`.
    #[arg(long, env = "HEARTH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    pub body_limit: usize,
    /// Seconds a client has to send its request headers (and idle keep-alive limit).
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Allow browser pages from ORIGIN (e.g. http://localhost:3000, or `*`) to call the API;
    /// repeatable. Without it no CORS headers are sent.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Seconds requests in flight get to finish after SIGTERM or Ctrl-C; meanwhile /health
    /// answers 503 and new requests 503 with Retry-After, so a load balancer moves on.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    /// This server's name in the X-Hearth-Replica header of every response (default: the
    /// address as bound, HOST:PORT).
    #[arg(long, env = "HEARTH_REPLICA_NAME")]
    pub replica_name: Option<String>,
    /// Load MODEL at start-up instead of on first use; repeatable. GET /ready answers 200
    /// once every preloaded model is in memory (a readiness or startup probe).
    #[arg(long = "preload", value_name = "MODEL")]
    pub preload: Vec<String>,
    /// Worker threads for the model (default: physical cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
}

#[derive(Args)]
pub struct PullArgs {
    pub source: String,
    /// Name to store it under (default: hf.co/ORG/REPO:QUANT, or the file name).
    #[arg(long)]
    pub name: Option<String>,
    /// Expected sha256 of the file (the hub's published hash is checked anyway).
    #[arg(long)]
    pub sha256: Option<String>,
}

#[derive(Args)]
pub struct ListArgs {
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RmArgs {
    #[arg(required = true)]
    pub names: Vec<String>,
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A cached model name (smollm2, gemma3, or one pulled) or a path to a .gguf file.
    pub model: String,
    /// Context length in tokens (KV cache size).
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// How the KV cache stores keys and values: f16, q8_0 (half the memory) or q4_0 (a
    /// quarter), as llama.cpp's --cache-type-k/-v. Default: OLLAMA_KV_CACHE_TYPE if set,
    /// else f16.
    #[arg(long = "kv-type", env = "HEARTH_KV_TYPE", value_name = "TYPE")]
    pub kv_type: Option<hearth_models::KvType>,
    /// Worker threads (default: physical cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Tokens the repeat penalty looks back over.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed (same seed, same text).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Maximum tokens to generate.
    #[arg(long, short = 'n', default_value_t = 512)]
    pub max_tokens: usize,
    /// Stop when this text is generated (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    pub prompt: String,
    /// Tokenize the prompt as plain text (BOS per the model), no chat template.
    #[arg(long)]
    pub raw: bool,
    /// System prompt (chat template mode).
    #[arg(long)]
    pub system: Option<String>,
    /// The reply is one JSON object.
    #[arg(long, group = "output_grammar")]
    pub json: bool,
    /// The reply is JSON valid under the JSON Schema in FILE.
    #[arg(long, value_name = "FILE", group = "output_grammar")]
    pub json_schema: Option<std::path::PathBuf>,
    /// The reply matches the grammar in FILE: llama.cpp's GBNF (`root ::= ...`, as its
    /// `--grammar-file` reads) or llguidance's Lark (`start: ...`, regex terminals,
    /// `%json {schema}`).
    #[arg(long, value_name = "FILE", group = "output_grammar")]
    pub grammar: Option<std::path::PathBuf>,
    /// The reply matches this regular expression.
    #[arg(long, value_name = "REGEX", group = "output_grammar")]
    pub regex: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args)]
pub struct TokenizeArgs {
    pub model: String,
    pub text: String,
    /// One JSON array of ids.
    #[arg(long)]
    pub json: bool,
    /// Do not add BOS/EOS even if the model asks for them.
    #[arg(long)]
    pub no_special: bool,
}

#[derive(Args)]
pub struct ShowArgs {
    pub model: String,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print the chat template's source.
    #[arg(long)]
    pub template: bool,
    /// Print every metadata key (long arrays summarized).
    #[arg(long)]
    pub metadata: bool,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // A kernel level the CPU lacks (or a misspelt one) is refused before any work.
    if let Err(e) = hearth_quant::dispatch::requested_isa() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Run(a) => commands::run(a, cli.verbose),
        Command::Chat(a) => commands::chat(a, cli.verbose),
        Command::Tokenize(a) => commands::tokenize(a),
        Command::Show(a) => commands::show(a),
        Command::Pull(a) => commands::pull(a),
        Command::List(a) => commands::list(a),
        Command::Rm(a) => commands::rm(a),
        Command::Serve(a) => commands::serve(a),
        Command::Embed(a) => commands::embed(a),
        Command::Bench(a) => bench::bench(a),
        Command::Perplexity(a) => perplexity::perplexity(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A closed stdout (`hearth list | head`) is the reader's choice, not a failure.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--parallel`: every decoding sequence needs a place in one forward pass.
fn parse_parallel(s: &str) -> Result<usize, String> {
    let max = hearth_models::MAX_BATCH;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: a number of sequences from 1 to {max}")),
    }
}
