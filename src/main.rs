//! The `syncfs` command.

fn main() -> std::process::ExitCode {
    syncfs::cli::main()
}
