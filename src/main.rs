//! The `hearth` binary: a thin shell over `hearth-cli`.
fn main() -> std::process::ExitCode {
    hearth_cli::main()
}
