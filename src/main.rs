//! The `gibby` binary: parse the command line, set up logging, run the subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gibby::settings::Settings;

#[derive(Parser)]
#[command(
    name = "gibby",
    version,
    about = "Hands out working Codex tokens from a pool of ChatGPT accounts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve GET /token and GET /health, configured by the GIBBY_* environment variables.
    Serve,
    /// Serve a ready demo: an in-process fake upstream and a generated pool of accounts
    /// in --data-dir (replaced on every start). Nothing reaches the real upstream.
    Demo {
        /// Where the demo pool is written.
        #[arg(long, default_value = "./demo-data")]
        data_dir: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("gibby: bad setting: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve => gibby::serve::run(settings).await,
        Command::Demo { data_dir } => gibby::demo::run(settings, &data_dir).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gibby: {e}");
            ExitCode::from(1)
        }
    }
}
