//! A model loads and answers inside a memory cgroup of its file size + its KV cache + 100 MB
//! (what a small device or a container limit gives it), with no OOM kill.
//!
//! Needs a memory cgroup this process may create: cgroup v1 (`/sys/fs/cgroup/memory`) or v2
//! with the memory controller delegated to our cgroup. Where neither is writable the test
//! says so and checks nothing (`.ci/run` runs as root on machines that have one).
#![cfg(target_os = "linux")]

mod common;

use std::path::{Path, PathBuf};

use hearth_models::Model;

/// A memory cgroup made for one test: its directory and which files it reads.
struct Cgroup {
    dir: PathBuf,
    v2: bool,
}

impl Cgroup {
    fn create(name: &str, limit: u64) -> Option<Cgroup> {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let (dir, v2) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(name), false)
        } else {
            let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
            let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
            let base = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
            let controllers = std::fs::read_to_string(base.join("cgroup.subtree_control")).ok()?;
            if !controllers.split_whitespace().any(|c| c == "memory") {
                return None;
            }
            (base.join(name), true)
        };
        std::fs::create_dir(&dir).ok()?;
        let cg = Cgroup { dir, v2 };
        let limit_file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(cg.dir.join(limit_file), limit.to_string()).ok()?;
        if v2 {
            let _ = std::fs::write(cg.dir.join("memory.swap.max"), "0");
        } else {
            let _ = std::fs::write(
                cg.dir.join("memory.memsw.limit_in_bytes"),
                limit.to_string(),
            );
        }
        Some(cg)
    }

    fn peak(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn models_load_and_answer_in_a_cgroup_of_file_plus_kv_plus_100_mb() {
    let n_ctx = 2048;
    for name in ["smollm2", "gemma3"] {
        let file = common::model_file(name);
        let size = std::fs::metadata(&file).unwrap().len();
        let kv = Model::load(common::open(name))
            .unwrap()
            .kv_cache_bytes(n_ctx);
        let limit = size + kv + (100 << 20);
        let cg_name = format!("hearth-test-{}-{name}", std::process::id());
        let Some(cg) = Cgroup::create(&cg_name, limit) else {
            eprintln!("no writable memory cgroup here (v1 or delegated v2): not checked");
            return;
        };
        // The shell drops the file from the page cache (so reading it is charged to the
        // cgroup, not to whoever read it before), enters the cgroup, then becomes hearth (no
        // unsafe pre_exec needed).
        let procs = cg.dir.join("cgroup.procs");
        let ctx = n_ctx.to_string();
        let script = "dd if=\"$1\" iflag=nocache count=0 2>/dev/null; echo $$ > \"$0\" && shift && exec \"$@\"";
        let out = std::process::Command::new("sh")
            .args(["-c", script])
            .arg(&procs)
            .arg(&file)
            .arg(common::hearth_bin())
            .args([
                "run",
                name,
                "Why is the sky blue?",
                "--temperature",
                "0",
                "-n",
                "24",
            ])
            .args(["--ctx", &ctx])
            .env("HEARTH_MODELS", common::models_dir())
            .output()
            .unwrap();
        let mib = |b: u64| b >> 20;
        eprintln!(
            "{name}: cgroup {} limit {} MiB (file {} + KV {} + 100), peak {} MiB",
            if cg.v2 { "v2" } else { "v1" },
            mib(limit),
            mib(size),
            mib(kv),
            mib(cg.peak())
        );
        assert!(
            out.status.success(),
            "{name} in {} MiB: {:?} {}",
            mib(limit),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).trim().len() > 20);
        assert_eq!(cg.oom_kills(), 0, "{name}: OOM kills in the cgroup");
        assert!(cg.peak() <= limit);
    }
}
