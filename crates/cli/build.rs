//! Records the git commit the binary is built from (`hearth bench --json`'s `build_commit`,
//! as llama-bench reports its own). Outside a git checkout the field is left out.
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    };
    let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) else {
        return;
    };
    // Rebuild when HEAD moves: HEAD itself, the branch it points at, packed refs.
    let git_dir = Path::new(&git_dir);
    for file in ["HEAD", "packed-refs"] {
        if git_dir.join(file).exists() {
            println!("cargo:rerun-if-changed={}", git_dir.join(file).display());
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        let r = git_dir.join(branch);
        if r.exists() {
            println!("cargo:rerun-if-changed={}", r.display());
        }
    }
    if let Some(commit) = git(&["rev-parse", "--short=7", "HEAD"]) {
        println!("cargo:rustc-env=HEARTH_BUILD_COMMIT={commit}");
    }
}
