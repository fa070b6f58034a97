//! Tokens are secrets: a full scenario logged at trace level, every library included,
//! shows none of them.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use gibby::fake_upstream::{Endpoint, Reply};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_token_appears_in_trace_logs_or_answers() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init()
        .expect("the only subscriber of this test binary");

    let h = Harness::start().await;
    // a: due for refresh; b: stale usage; c: revoked (moved to failed.json); d: fine.
    let mut a = h.account("a@example.com", 10, 10);
    a.token_refresh_at = Some(NOW - 1);
    let mut b = h.account("b@example.com", 20, 10);
    b.usage_checked_at = Some(NOW - 10_000);
    let c = h.account("c@example.com", 90, 10);
    h.fake.revoke("c@example.com");
    let d = h.account("d@example.com", 5, 10);
    let mut secrets: Vec<String> = [&a, &b, &c, &d]
        .iter()
        .flat_map(|x| {
            [
                x.access_token.expose().to_owned(),
                x.refresh_token.expose().to_owned(),
            ]
        })
        .collect();
    h.write_accounts(&pool(Some("c@example.com"), vec![a, b, c, d]));

    let mut bodies = String::new();
    // c fails and moves; then the fullest usable (b after its usage call) is served.
    bodies += &h.token().await.text;
    // The active one now fails transiently; another is served.
    h.fake.push_reply(
        Endpoint::Models,
        None,
        Reply::html(502, "<html>bad gateway</html>"),
    );
    bodies += &h.token().await.text;
    // Everything disabled: a 503 listing every account.
    let mut file = h.accounts();
    file.active_account = Some("a@example.com".into());
    file.accounts
        .iter_mut()
        .for_each(|x| x.token_refresh_at = Some(NOW - 1));
    h.write_accounts(&file);
    bodies += &h.token().await.text;
    file = h.accounts();
    file.accounts.iter_mut().for_each(|x| x.disabled = true);
    h.write_accounts(&file);
    bodies += &h.token().await.text;
    // Tokens issued by refreshes during the scenario are secrets too.
    for account in h.accounts().accounts {
        secrets.push(account.refresh_token.expose().to_owned());
    }
    h.stop().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("token served"),
        "the scenario was logged:\n{logs}"
    );
    assert!(logs.lines().count() > 50, "trace level was on");
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a token is in the logs: {secret:.12}…"
        );
    }
    // Answers may carry the one access token they serve, never a refresh token.
    for secret in secrets.iter().filter(|s| s.starts_with("rt_")) {
        assert!(
            !bodies.contains(secret.as_str()),
            "a refresh token is in an answer"
        );
    }
}
