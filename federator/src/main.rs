//! `meshfed`: the one binary of meshfed.

use std::process::ExitCode;

use clap::Parser;

// mimalloc returns freed memory to the system promptly; with glibc's allocator the federator's
// resident size kept every transient import delta it ever built (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = meshfed::cli::Cli::parse();
    // A command whose output goes to a closed pipe (`meshfed status | head`) ends quietly, as
    // Unix tools do, instead of panicking on the failed write. The servers keep Rust's default
    // (EPIPE as an error on their sockets and pipes).
    if !meshfed::cli::is_server(&args.command) {
        // SAFETY: set before any thread starts; SIG_DFL installs no handler code. The one
        // unsafe call of the binary (the workspace denies unsafe code elsewhere).
        #[allow(unsafe_code)]
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    // Servers log what they do; the demo's own output is the story, so it only shows warnings.
    let default = match args.command {
        meshfed::cli::Command::Demo(_) => "warn,meshfed_federation::server=error",
        _ => "info",
    };
    let mut filter = std::env::var("MESHFED_LOG").unwrap_or_else(|_| default.to_string());
    // hickory logs every DNS query at INFO: that is DEBUG for an agent or a VM agent (name
    // hickory in MESHFED_LOG to see them).
    if !filter.contains("hickory") {
        filter.push_str(",hickory_server=warn,hickory_proto=warn,hickory_resolver=warn");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match meshfed::cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line: what failed and why, with the context chain joined by ": ".
            eprintln!("error: {}", meshfed::cli::one_line(&e));
            ExitCode::from(meshfed::cli::EXIT_BAD_INPUT)
        }
    }
}
