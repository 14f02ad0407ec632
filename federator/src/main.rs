//! `meshfed`: the one binary of meshfed.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = meshfed::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHFED_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match meshfed::cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line: what failed and why, with the context chain joined by ": ".
            eprintln!("error: {e:#}");
            ExitCode::from(meshfed::cli::EXIT_BAD_INPUT)
        }
    }
}
