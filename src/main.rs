//! The `gibby` binary: parse the command line, set up logging, run the subcommand.
#![allow(clippy::disallowed_methods)] // the binary reads the file it is given
//! Exit codes: 0 success, 1 a problem found, 2 bad usage (arguments or settings).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gibby::io::live::unix_now;
use gibby::settings::Settings;

#[derive(Parser)]
#[command(
    name = "gibby",
    version,
    about = "Hands out working Codex tokens from a pool of ChatGPT accounts",
    long_about = "Hands out working Codex tokens from a pool of ChatGPT accounts.\n\n\
        The pool lives in $GIBBY_DATA_DIR/accounts.json (default ./data); accounts the \
        upstream declares invalid move to failed.json. Every command reads the GIBBY_* \
        environment variables (see README.md)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn settings_help() -> String {
    format!(
        "\
Settings (environment; a value that does not parse stops gibby with exit code 2):
  GIBBY_DATA_DIR                   folder of accounts.json and failed.json [default: ./data]
  GIBBY_LISTEN                     address to bind [default: 127.0.0.1:8080]
  GIBBY_EXHAUSTED_USAGE_THRESHOLD  5-hour window exhausted at or above this percent [default: 95]
  GIBBY_USAGE_STALE_SECONDS        usage older than this is fetched again [default: 3600]
  GIBBY_API_KEY                    when set, /token requires Authorization: Bearer <key>
  GIBBY_CHATGPT_BASE_URL           base of the usage and validation calls [default: https://chatgpt.com]
  GIBBY_AUTH_BASE_URL              base of the token refresh call [default: https://auth.openai.com]
  GIBBY_CODEX_CLIENT_VERSION       client_version sent on validation [default: {version}]
  GIBBY_UPSTREAM_TIMEOUT_SECONDS   per upstream call [default: 10]
  GIBBY_RECORD_DIR                 when set, each /token is recorded there as a scenario
  RUST_LOG                         log level [default: info]",
        version = gibby::settings::DEFAULT_CODEX_CLIENT_VERSION
    )
}

#[derive(Subcommand)]
enum Command {
    /// Serve GET /token and GET /health (settings from the GIBBY_* environment variables).
    #[command(long_about = "Serve GET /token and GET /health.\n\n\
        Every /token reads $GIBBY_DATA_DIR/accounts.json afresh, picks an account with quota \
        (the active one first), refreshes its usage and token when stale, checks the token \
        upstream and answers {email, access_token, account_id, expires_at}; 503 with the \
        reasons when no account is usable. SIGTERM or ctrl-c finishes the requests in flight.",
        after_help = settings_help())]
    Serve,
    /// Serve a ready demo: an in-process fake upstream and a generated pool.
    ///
    /// The pool is written to --data-dir (replaced on every start); nothing reaches the
    /// real upstream. The settings of serve apply (GIBBY_LISTEN, GIBBY_API_KEY, ...), except
    /// GIBBY_DATA_DIR and the base URLs.
    Demo {
        /// Where the demo pool is written.
        #[arg(long, default_value = "./demo-data")]
        data_dir: PathBuf,
    },
    /// Show the pool from the files alone: each account's state, both usage windows and
    /// when its token is next refreshed. No upstream call; tokens are never shown.
    Status {
        /// Print JSON for scripts instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Check accounts.json and failed.json against the schema and report every problem
    /// with its position (also files other users can read). Changes nothing; exit code 1
    /// when a problem is found.
    Check,
    /// Add an account from a Codex CLI auth.json (usually ~/.codex/auth.json), or update
    /// the tokens of the account with the same email. Other accounts are left as they are.
    Import {
        /// The auth.json written by `codex login`.
        auth_json: PathBuf,
    },
    /// Run a scenario file (files, clock, upstream answers, expected outcomes) through the
    /// request logic and print the trace: each stage, effect, answer and file change.
    ///
    /// Touches no file and no network. Exit code 1 when the scenario does not replay as it
    /// says (an unexpected call, an answer left over, another outcome). Scenarios come from
    /// tests/scenarios/ or from `gibby serve` with GIBBY_RECORD_DIR set.
    Replay {
        /// The scenario file (JSON).
        scenario: PathBuf,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match std::env::var("RUST_LOG") {
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
        Ok(value) => match tracing_subscriber::EnvFilter::try_new(&value) {
            Ok(filter) => filter,
            Err(e) => {
                eprintln!("gibby: bad setting: RUST_LOG={value:?}: {e}");
                return ExitCode::from(2);
            }
        },
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal: a file or journald gets plain text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr)
        .init();
    if let Command::Replay { scenario } = &cli.command {
        return replay(scenario);
    }
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("gibby: bad setting: {e}");
            return ExitCode::from(2);
        }
    };
    let dir = settings.data_dir.clone();
    let result = match cli.command {
        Command::Serve => gibby::serve::run(settings).await,
        Command::Demo { data_dir } => gibby::demo::run(settings, &data_dir).await,
        Command::Status { json } => {
            gibby::cmd::status::run(&dir, &settings.policy, unix_now(), json)
                .map(|out| print!("{out}"))
        }
        Command::Check => {
            let report = gibby::cmd::check::run(&dir);
            for line in report.problems.iter().chain(&report.notes) {
                println!("{line}");
            }
            if report.problems.is_empty() {
                println!("ok");
                Ok(())
            } else {
                Err(format!("{} problem(s) found", report.problems.len()))
            }
        }
        Command::Import { auth_json } => import(&settings, &auth_json).await,
        Command::Replay { .. } => unreachable!("replayed above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gibby: {e}");
            ExitCode::from(1)
        }
    }
}

async fn import(settings: &Settings, path: &std::path::Path) -> Result<(), String> {
    let source = path.display().to_string();
    let text = fs_err::read_to_string(path).map_err(|e| e.to_string())?;
    let imported = gibby::cmd::import::parse_auth(&text, &source, unix_now())?;
    let store = gibby::io::Store::new(&settings.data_dir);
    let done = gibby::cmd::import::run(&store, &imported).await?;
    println!(
        "{}: {done} in {}",
        imported.email,
        settings.data_dir.join("accounts.json").display()
    );
    Ok(())
}

/// `gibby replay`: needs no settings, only the scenario.
fn replay(path: &std::path::Path) -> ExitCode {
    let scenario = fs_err::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|text| {
            gibby::replay::Scenario::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
        });
    let scenario = match scenario {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gibby: {e}");
            return ExitCode::from(2);
        }
    };
    let report = gibby::replay::replay(&scenario);
    print!("{}", report.trace);
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
