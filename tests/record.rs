//! `GIBBY_RECORD_DIR`: a request served against the fake upstream is recorded as a scenario
//! that replays to the same outcome and the same files, and holds no token.
#![allow(clippy::disallowed_methods)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use gibby::fake_upstream::Endpoint;
use gibby::model::AccountsFile;
use gibby::replay::{replay, Expected, Scenario};
use serde_json::Value;

const A: &str = "a@example.com";
const B: &str = "b@example.com";
const C: &str = "c@example.com";

/// The header of every placeholder JWT: `{"alg":"none","typ":"JWT"}`.
const PLACEHOLDER_HEADER: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.";

#[tokio::test]
async fn a_recorded_request_replays_to_the_same_outcome_without_any_token() {
    let record = tempfile::tempdir().unwrap();
    let record_dir = record.path().join("recordings");
    let dir = record_dir.clone();
    let h = Harness::start_with(move |s| s.record_dir = Some(dir)).await;
    // b (active) is revoked and moves; a has stale usage and a due token: its usage is
    // fetched, it is the fullest, its token is refreshed and validated.
    let mut a = h.account(A, 50, 10);
    a.token_refresh_at = Some(NOW - 1);
    a.usage_checked_at = Some(NOW - 10_000);
    let b = h.account(B, 90, 10);
    h.fake.revoke(B);
    let c = h.account(C, 20, 10);
    let mut secrets: Vec<String> = [&a, &b, &c]
        .iter()
        .flat_map(|x| {
            [
                x.access_token.expose().to_owned(),
                x.refresh_token.expose().to_owned(),
            ]
        })
        .collect();
    h.write_accounts(&pool(Some(B), vec![a, b, c]));

    let answer = h.token().await;
    assert_eq!(answer.status, 200, "{}", scrub(&answer.text));
    assert_eq!(answer.body["email"], A);
    secrets.push(answer.body["access_token"].as_str().unwrap().to_owned());
    for account in h.accounts().accounts {
        secrets.push(account.access_token.expose().to_owned());
        secrets.push(account.refresh_token.expose().to_owned());
    }
    for call in h.fake.calls() {
        secrets.extend(call.bearer);
        secrets.extend(call.refresh_token);
    }
    secrets.extend(h.fake.issued_tokens());
    let disk_accounts = h.read_text("accounts.json").unwrap();
    let disk_failed = h.read_text("failed.json").unwrap();
    h.stop().await;

    let files: Vec<_> = std::fs::read_dir(&record_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let mode = std::fs::metadata(&record_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the recording directory is its user's only");
    assert_eq!(files.len(), 1, "{files:?}");
    let path = &files[0];
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(path).unwrap();

    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        assert!(
            !text.contains(secret.as_str()),
            "a token is in the recording: {secret:.12}…"
        );
    }
    // Tokens nobody here saw (the id_token of the refresh answer) are replaced too: every
    // JWT left is a placeholder, and no refresh token of the fake (`rt_…`) is left.
    for (at, _) in text.match_indices("\"eyJ") {
        assert!(
            text[at + 1..].starts_with(PLACEHOLDER_HEADER),
            "{}",
            &text[at..at + 40]
        );
    }
    assert!(
        !text.contains("\"rt_"),
        "a refresh token is in the recording"
    );

    let scenario = Scenario::parse(&text).unwrap();
    match &scenario.requests[0].expect {
        Expected::Token {
            email,
            access_token,
        } => {
            assert_eq!(email, A);
            assert!(access_token.starts_with(PLACEHOLDER_HEADER));
        }
        other => panic!("{other:?}"),
    }
    let calls: Vec<String> = scenario
        .upstream
        .iter()
        .map(|a| format!("{} {}", a.call.name(), a.email))
        .collect();
    assert_eq!(
        calls,
        [
            "validate b@example.com",
            "usage a@example.com",
            "refresh a@example.com",
            "validate a@example.com"
        ]
    );
    // The replay reproduces it exactly: the same calls with the same tokens, in order, and
    // the same outcome (the replay checks each against the recording).
    let report = replay(&scenario);
    assert!(report.ok(), "{:?}\n{}", report.problems, report.trace);
    assert!(
        report.trace.contains("- b@example.com removed"),
        "{}",
        report.trace
    );

    // The recording holds the files as the request left them, and the replay checked its
    // writes against them.
    let after = scenario.requests[0]
        .files_after
        .as_ref()
        .expect("files_after");
    assert_eq!(
        without_tokens(&after.accounts.as_ref().unwrap().text()),
        without_tokens(&disk_accounts)
    );
    assert_eq!(
        without_tokens(&after.failed.as_ref().unwrap().text()),
        without_tokens(&disk_failed)
    );
    assert!(
        report.trace.contains("files after the request as expected"),
        "{}",
        report.trace
    );

    // And so does the binary.
    let (code, shown) = replay_binary(path);
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.ends_with("replay: ok\n"), "{shown}");
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        assert!(!shown.contains(secret.as_str()));
    }

    // A recording whose files_after no longer matches what the logic writes (here: the
    // move to failed.json did not happen) does not replay, and says what differs.
    let mut tampered = scenario.clone();
    let after = tampered.requests[0].files_after.as_mut().unwrap();
    after.failed = None;
    let report = replay(&tampered);
    assert_eq!(report.problems.len(), 1, "{}", report.trace);
    let problem = &report.problems[0];
    assert!(
        problem.starts_with("request 1: failed.json after the request differs from files_after")
            && problem.contains("expected: missing")
            && problem.contains("+ b@example.com"),
        "{problem}"
    );
    let tampered_path = record.path().join("tampered.json");
    std::fs::write(&tampered_path, tampered.to_text()).unwrap();
    let (code, shown) = replay_binary(&tampered_path);
    assert_eq!(code, Some(1), "{shown}");
    assert!(shown.contains("differs from files_after"), "{shown}");
}

/// A hand edit (no lock) lands while the request's refresh call is out: gibby's token
/// write meets a conflict, re-reads and redoes it. The recording holds the edit and the
/// files as they ended, and replays exactly.
#[tokio::test]
async fn a_recording_with_another_writers_edit_replays_exactly() {
    let record = tempfile::tempdir().unwrap();
    let dir = record.path().to_path_buf();
    let h = std::sync::Arc::new(Harness::start_with(move |s| s.record_dir = Some(dir)).await);
    let mut a = h.account(A, 10, 10);
    a.token_refresh_at = Some(NOW - 1);
    let b = h.account(B, 20, 10);
    h.write_accounts(&pool(Some(A), vec![a, b]));

    let gate = h.fake.hold(Endpoint::Refresh);
    let request = tokio::spawn({
        let h = h.clone();
        async move { h.token().await }
    });
    assert!(
        h.fake
            .wait_for_calls(Endpoint::Refresh, 1, Duration::from_secs(20))
            .await,
        "the refresh call was made"
    );
    // The operator disables b by hand while the refresh call is out.
    let mut edited = h.accounts();
    edited.accounts[1].disabled = true;
    h.write_accounts(&edited);
    gate.open();
    let answer = request.await.unwrap();
    assert_eq!(answer.status, 200, "{}", scrub(&answer.text));
    assert_eq!(answer.body["email"], A);
    let disk = h.read_text("accounts.json").unwrap();
    let on_disk = AccountsFile::parse(&disk).unwrap();
    assert!(on_disk.accounts[1].disabled, "the hand edit stands");
    assert_eq!(
        on_disk.accounts[0].access_token.expose(),
        answer.body["access_token"].as_str().unwrap(),
        "the refreshed tokens were stored"
    );

    let files: Vec<_> = std::fs::read_dir(record.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let scenario = Scenario::parse(&text).unwrap();
    let spec = &scenario.requests[0];
    assert!(
        spec.edits.iter().any(|e| e.content.is_some()),
        "the hand edit is recorded: {text}"
    );
    let after = spec.files_after.as_ref().expect("files_after");
    let after_accounts = AccountsFile::parse(&after.accounts.as_ref().unwrap().text()).unwrap();
    assert_eq!(
        without_tokens(&after_accounts.to_text()),
        without_tokens(&disk)
    );
    // Placeholders are consistent: the stored token is the one served.
    let Expected::Token { access_token, .. } = &spec.expect else {
        panic!("{:?}", spec.expect)
    };
    assert_eq!(
        after_accounts.accounts[0].access_token.expose(),
        access_token
    );

    let report = replay(&scenario);
    assert!(report.ok(), "{:?}\n{}", report.problems, report.trace);
    assert!(
        report
            .trace
            .contains("(another writer changes accounts.json)")
            && report.trace.contains("conflict")
            && report.trace.contains("files after the request as expected"),
        "{}",
        report.trace
    );
    let (code, shown) = replay_binary(&files[0]);
    assert_eq!(code, Some(0), "{shown}");
}

/// `gibby replay FILE`: its exit code and what it printed.
fn replay_binary(path: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gibby"))
        .arg("replay")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A state file's JSON with every `*token` string blanked: recordings hold placeholders.
fn without_tokens(text: &str) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    match v {
                        Value::String(s) if k.ends_with("token") => s.clear(),
                        other => walk(other),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut v: Value = serde_json::from_str(text).unwrap();
    walk(&mut v);
    v
}
