//! Tokens are secrets: a full scenario logged at trace level, every library included,
//! shows none of them, and neither do the answers (but for the token a 200 serves) nor
//! `gibby status` and `gibby check`. Every token the fake issued during the run is searched
//! for, not only the ones the test wrote.
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
    bodies += &answer_text(h.token().await);
    // The active one now fails transiently; another is served.
    h.fake.push_reply(
        Endpoint::Models,
        None,
        Reply::html(502, "<html>bad gateway</html>"),
    );
    bodies += &answer_text(h.token().await);
    // Everything due: every account is refreshed (new access, refresh and id tokens).
    let mut file = h.accounts();
    file.active_account = Some("a@example.com".into());
    file.accounts
        .iter_mut()
        .for_each(|x| x.token_refresh_at = Some(NOW - 1));
    h.write_accounts(&file);
    bodies += &answer_text(h.token().await);
    // The operator commands on the pool as it now stands.
    let mut commands = gibby(&h, "status") + &gibby(&h, "check");
    // Everything disabled: a 503 listing every account.
    file = h.accounts();
    file.accounts.iter_mut().for_each(|x| x.disabled = true);
    h.write_accounts(&file);
    bodies += &answer_text(h.token().await);
    // A token pasted into the wrong fields: the 503 detail, the logs and `check` name the
    // position and the problem, never the value.
    let pasted = h.accounts().accounts[0].refresh_token.expose().to_owned();
    let access = h.accounts().accounts[1].access_token.expose().to_owned();
    let broken = h
        .read_text("accounts.json")
        .unwrap()
        .replacen(
            "\"disabled\": true",
            &format!("\"disabled\": \"{pasted}\""),
            1,
        )
        .replacen(
            "\"active_account\": \"a@example.com\"",
            &format!("\"active_account\": {{\"token\": \"{access}\"}}"),
            1,
        );
    assert_ne!(broken, h.read_text("accounts.json").unwrap());
    h.write_text("accounts.json", &broken);
    let refused = h.token().await;
    assert_eq!(refused.status, 503, "{}", scrub(&refused.text));
    let detail = refused.body["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains(&format!(
            "invalid type: string ({} characters), expected a boolean",
            pasted.len()
        )) && detail.contains("active_account must be a string or null, found an object"),
        "{detail}"
    );
    bodies += &refused.text;
    let check = gibby(&h, "check");
    assert!(
        check.contains(&format!("string ({} characters)", pasted.len())),
        "{check}"
    );
    commands += &check;
    commands += &gibby(&h, "status");
    // Every token the fake issued during the run (access, refresh and id tokens).
    secrets.extend(h.fake.issued_tokens());
    assert!(secrets.len() > 20, "the refreshes issued tokens");
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
    // Answers carry only the one access token they serve (removed by `answer_text`), and
    // the operator commands none at all.
    for secret in &secrets {
        assert!(
            !bodies.contains(secret.as_str()),
            "a token is in an answer: {secret:.12}…"
        );
        assert!(
            !commands.contains(secret.as_str()),
            "a token is in the output of status or check: {secret:.12}…"
        );
    }
}

/// The body as sent, less the access token a 200 serves (it is the answer's point).
fn answer_text(answer: Answer) -> String {
    let served = match (answer.status, answer.body["access_token"].as_str()) {
        (200, Some(token)) => token.to_owned(),
        _ => return answer.text,
    };
    assert!(!served.is_empty());
    answer.text.replace(&served, "[served]")
}

/// What `gibby <command>` prints (stdout and stderr) on the harness's data directory.
fn gibby(h: &Harness, command: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gibby"))
        .arg(command)
        .env("GIBBY_DATA_DIR", h.dir.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.len() > 10, "gibby {command} printed: {text}");
    text
}
