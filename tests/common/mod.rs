//! Shared by every integration test: a fake upstream and a gibby, each on its own
//! 127.0.0.1 port, a temporary data directory, and helpers to build pools and read files.
#![allow(dead_code, clippy::disallowed_methods)]

use std::sync::Arc;

use gibby::fake_upstream::{AccountSpec, FakeUpstream, RunningFake};
use gibby::http::{app, AppState};
use gibby::io::{Live, Store, Upstream};
use gibby::model::{Account, AccountsFile, Secret, Usage, Window};
use gibby::settings::Settings;
use serde_json::Value;

/// The fixed time every harness runs at, for gibby and the fake alike.
pub const NOW: i64 = 1_800_000_000;

pub struct Harness {
    pub fake: FakeUpstream,
    pub upstream: RunningFake,
    pub dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT` of gibby.
    pub url: String,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    /// The body exactly as sent.
    pub text: String,
    pub body: Value,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    /// Starts with settings adjusted by `adjust` (base URLs and data dir are set first).
    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> Harness {
        let fake = FakeUpstream::new();
        fake.set_now(Some(NOW));
        let upstream = fake.start(0).await.expect("fake upstream starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::from_lookup(|_| None).expect("defaults parse");
        settings.data_dir = dir.path().to_path_buf();
        settings.chatgpt_base_url = upstream.base_url.clone();
        settings.auth_base_url = upstream.base_url.clone();
        settings.upstream_timeout = std::time::Duration::from_secs(2);
        adjust(&mut settings);
        let state = AppState {
            live: Arc::new(Live {
                store: Store::new(&settings.data_dir),
                upstream: Upstream::new(&settings).expect("client builds"),
                policy: settings.policy,
                clock: Arc::new(|| NOW),
                validations: Default::default(),
            }),
            api_key: settings.api_key.clone(),
            record_dir: settings.record_dir.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app(state))
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Harness {
            fake,
            upstream,
            dir,
            url,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Registers an account with the fake and returns it as accounts.json would hold it:
    /// token not due, usage fresh with the given 5-hour and weekly figures.
    pub fn account(&self, email: &str, primary: i64, secondary: i64) -> Account {
        let issued = self.fake.add_account(AccountSpec {
            primary: Some(gibby::fake_upstream::Window::five_hour(primary)),
            secondary: Some(gibby::fake_upstream::Window::weekly(secondary)),
            ..AccountSpec::new(email)
        });
        Account {
            email: email.to_owned(),
            access_token: Secret::new(issued.access_token),
            refresh_token: Secret::new(issued.refresh_token),
            token_refresh_at: Some(issued.expires_at - 86_400),
            usage: Some(usage(primary, secondary)),
            usage_checked_at: Some(NOW - 60),
            disabled: false,
        }
    }

    pub fn write_accounts(&self, file: &AccountsFile) {
        self.write_text("accounts.json", &file.to_text());
    }

    pub fn write_text(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    pub fn read_text(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join(name)).ok()
    }

    /// Every name in the data directory, hidden ones (the lock file) included, sorted.
    pub fn files_in_dir(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    pub fn accounts(&self) -> AccountsFile {
        AccountsFile::parse(
            &self
                .read_text("accounts.json")
                .expect("accounts.json exists"),
        )
        .unwrap()
    }

    pub async fn get(&self, path: &str) -> Answer {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        Answer {
            status,
            headers,
            text,
            body,
        }
    }

    pub async fn token(&self) -> Answer {
        self.get("/token").await
    }

    /// Stops gibby and the fake upstream, waiting for both.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Usage with both windows resetting well after [`NOW`].
pub fn usage(primary: i64, secondary: i64) -> Usage {
    Usage {
        primary: Some(Window {
            used_percent: primary.into(),
            reset_at: NOW + 10_000,
        }),
        secondary: Some(Window {
            used_percent: secondary.into(),
            reset_at: NOW + 500_000,
        }),
    }
}

pub fn pool(active: Option<&str>, accounts: Vec<Account>) -> AccountsFile {
    AccountsFile {
        active_account: active.map(str::to_owned),
        accounts,
    }
}

/// Replaces token values (JWT-shaped access tokens, `rt_` refresh tokens) with
/// placeholders, so a snapshot pins everything else byte for byte.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(['"']) {
        out.push_str(&rest[..=start]);
        rest = &rest[start + 1..];
        let end = rest.find('"').unwrap_or(rest.len());
        let value = &rest[..end];
        if value.starts_with("eyJ") && value.matches('.').count() == 2 {
            out.push_str("[jwt]");
        } else if value.starts_with("rt_") {
            out.push_str("[refresh-token]");
        } else {
            out.push_str(value);
        }
        rest = &rest[end..];
        if let Some(stripped) = rest.strip_prefix('"') {
            out.push('"');
            rest = stripped;
        }
    }
    out.push_str(rest);
    out
}

/// Runs `f` with insta writing to the top-level `snapshots/` folder.
pub fn snapshots<R>(f: impl FnOnce() -> R) -> R {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(f)
}
