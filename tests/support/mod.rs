//! The real `gibby serve` binary on a shared data directory, for the concurrency and crash
//! tests: start it (waiting for its "serving" log line, not for a timer), kill it, and read
//! the state files back. Every process started here is killed when its handle drops, also
//! when a test panics.
#![allow(dead_code, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use gibby::fake_upstream::{Call, Endpoint, FakeUpstream};
use gibby::model::{Account, AccountsFile, FailedFile};

/// How long gibby may take to start listening.
const STARTUP: Duration = Duration::from_secs(20);
/// At most this much of a process's log is kept for failure messages.
const LOG_LIMIT: usize = 256 * 1024;

/// A running `gibby serve`. Dropping it kills the process (SIGKILL) and reaps it.
pub struct Gibby {
    child: Child,
    pub url: String,
    log: Log,
}

/// What a process wrote to stderr, line by line, and whether its stderr has closed (it
/// exited). Tests wait on it instead of sleeping.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<LogState>, Condvar)>);

#[derive(Default)]
struct LogState {
    text: String,
    closed: bool,
}

impl Log {
    fn push(&self, line: &str) {
        let mut state = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if state.text.len() < LOG_LIMIT {
            state.text.push_str(line);
            state.text.push('\n');
        }
        self.0 .1.notify_all();
    }

    fn close(&self) {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.0 .1.notify_all();
    }

    pub fn text(&self) -> String {
        self.0
             .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .text
            .clone()
    }

    /// Blocks until a line containing `needle` was logged (true) or the process exited or
    /// `timeout` passed (false).
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> bool {
        let (lock, changed) = &*self.0;
        let state = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (state, _) = changed
            .wait_timeout_while(state, timeout, |s| !s.closed && !s.text.contains(needle))
            .unwrap_or_else(|e| e.into_inner());
        state.text.contains(needle)
    }

    /// Blocks until the process closed its stderr (it exited); false after `timeout`.
    pub fn wait_for_exit(&self, timeout: Duration) -> bool {
        let (lock, changed) = &*self.0;
        let state = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (state, _) = changed
            .wait_timeout_while(state, timeout, |s| !s.closed)
            .unwrap_or_else(|e| e.into_inner());
        state.closed
    }
}

impl Gibby {
    /// Starts `gibby serve` on `dir` against the fake upstream at `upstream` and returns once
    /// it has logged that it is serving. `env` adds or overrides settings.
    pub fn start(dir: &Path, upstream: &str, env: &[(&str, &str)]) -> Gibby {
        // A port picked by binding :0 may be taken by someone else before gibby binds it:
        // then gibby exits at once and another port is tried.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut command = Command::new(env!("CARGO_BIN_EXE_gibby"));
            for (name, _) in std::env::vars() {
                let lower = name.to_ascii_lowercase();
                if name.starts_with("GIBBY_") || lower.ends_with("_proxy") {
                    command.env_remove(name);
                }
            }
            command
                .arg("serve")
                .env("GIBBY_LISTEN", format!("127.0.0.1:{port}"))
                .env("GIBBY_DATA_DIR", dir)
                .env("GIBBY_CHATGPT_BASE_URL", upstream)
                .env("GIBBY_AUTH_BASE_URL", upstream)
                .env("GIBBY_UPSTREAM_TIMEOUT_SECONDS", "30")
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .env("NO_PROXY", "127.0.0.1,localhost")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            for (name, value) in env {
                command.env(name, value);
            }
            let mut child = command.spawn().expect("gibby starts");
            let stderr = child.stderr.take().expect("stderr is piped");
            let log = Log::default();
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    sink.push(&line);
                }
                sink.close();
            });
            let mut gibby = Gibby {
                child,
                url: format!("http://127.0.0.1:{port}"),
                log,
            };
            if gibby.log.wait_for_line("gibby serving", STARTUP) {
                return gibby;
            }
            if !gibby.log.wait_for_exit(Duration::ZERO) {
                panic!("gibby did not start within {STARTUP:?}:\n{}", gibby.log());
            }
            gibby.kill();
            last_log = gibby.log();
        }
        panic!("gibby could not start:\n{last_log}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap: nothing of the process runs after this returns.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What the process logged so far (tokens never appear in gibby's log).
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// A handle on the log to wait on from another thread.
    pub fn log_handle(&self) -> Log {
        self.log.clone()
    }

    /// The exit status. Call once [`Log::wait_for_exit`] said the process is ending: it
    /// blocks until the process is reaped.
    pub fn exit_status(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("the child can be waited for")
    }
}

impl Drop for Gibby {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// One `/token` answer: the status, and for a 200 the email and the access token.
#[derive(Clone)]
pub struct Served {
    pub status: u16,
    pub email: Option<String>,
    pub access_token: Option<String>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never a token in a failure message.
        write!(f, "{} {:?}", self.status, self.email)
    }
}

pub async fn token(client: &reqwest::Client, url: &str) -> Served {
    let response = client
        .get(format!("{url}/token"))
        .send()
        .await
        .expect("gibby answers");
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let text = |key: &str| body[key].as_str().map(str::to_owned);
    Served {
        status,
        email: text("email"),
        access_token: text("access_token"),
    }
}

/// Writes `content` the way gibby does (0600, atomic), for setting a data directory up.
pub fn write_file(dir: &Path, name: &str, content: &str) {
    gibby::io::store::atomic_write(&dir.join(name), content.as_bytes()).unwrap();
}

pub fn read_accounts(dir: &Path) -> AccountsFile {
    let text = std::fs::read_to_string(dir.join("accounts.json")).expect("accounts.json exists");
    AccountsFile::parse(&text).unwrap_or_else(|e| panic!("accounts.json does not parse: {e}"))
}

/// failed.json as it is; a missing one is empty.
pub fn read_failed(dir: &Path) -> FailedFile {
    match std::fs::read_to_string(dir.join("failed.json")) {
        Ok(text) => {
            FailedFile::parse(&text).unwrap_or_else(|e| panic!("failed.json does not parse: {e}"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => FailedFile::default(),
        Err(e) => panic!("failed.json cannot be read: {e}"),
    }
}

/// Where each email stands: how often in accounts.json and in failed.json.
pub fn placement(dir: &Path) -> BTreeMap<String, (usize, usize)> {
    let mut seen: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for a in read_accounts(dir).accounts {
        seen.entry(a.email).or_default().0 += 1;
    }
    for a in read_failed(dir).accounts {
        seen.entry(a.email).or_default().1 += 1;
    }
    seen
}

/// Every name in the data directory that is not a state file or the lock: temporary
/// files left behind.
pub fn stray_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !["accounts.json", "failed.json", ".gibby.lock"].contains(&n.as_str()))
        .collect()
}

/// The permission bits of every file in the data directory that are not 0600.
pub fn loose_modes(dir: &Path) -> Vec<(String, u32)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            let mode = e.metadata().unwrap().permissions().mode() & 0o777;
            (e.file_name().into_string().unwrap(), mode)
        })
        .filter(|(_, mode)| *mode != 0o600)
        .collect()
}

/// The refresh calls the fake received, per account.
pub fn refreshes_per_account(fake: &FakeUpstream) -> BTreeMap<String, usize> {
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for call in fake.calls() {
        if call.endpoint == Endpoint::Refresh {
            *per.entry(call.email.unwrap_or_default()).or_default() += 1;
        }
    }
    per
}

/// Refresh tokens the fake rotated away (spent by a 200): none may still be stored, or a
/// rotation was lost and the account's next refresh would be a reuse.
pub fn spent_refresh_tokens(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.endpoint == Endpoint::Refresh && c.status == 200)
        .filter_map(|c| c.refresh_token.clone())
        .collect()
}

/// Emails whose stored refresh token (in either file) is one the fake already spent.
pub fn accounts_holding_spent_tokens(dir: &Path, fake: &FakeUpstream) -> Vec<String> {
    let spent = spent_refresh_tokens(&fake.calls());
    let mut all: Vec<Account> = read_accounts(dir).accounts;
    all.extend(read_failed(dir).accounts);
    all.into_iter()
        .filter(|a| spent.iter().any(|s| s == a.refresh_token.expose()))
        .map(|a| a.email)
        .collect()
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The account as accounts.json holds it after a login: tokens from the fake, refreshed a
/// day before they expire, usage never checked.
pub fn stored(email: &str, issued: &gibby::fake_upstream::IssuedTokens) -> Account {
    Account {
        email: email.to_owned(),
        access_token: gibby::model::Secret::new(&issued.access_token),
        refresh_token: gibby::model::Secret::new(&issued.refresh_token),
        token_refresh_at: Some(issued.expires_at - 86_400),
        usage: None,
        usage_checked_at: None,
        disabled: false,
    }
}
