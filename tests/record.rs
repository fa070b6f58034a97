//! `GIBBY_RECORD_DIR`: a request served against the fake upstream is recorded as a scenario
//! that replays to the same outcome and holds no token.
#![allow(clippy::disallowed_methods)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use gibby::replay::{replay, Expected, Scenario};

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
    h.stop().await;

    let files: Vec<_> = std::fs::read_dir(&record_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
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

    // And so does the binary.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gibby"))
        .arg("replay")
        .arg(path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.ends_with("replay: ok\n"), "{shown}");
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        assert!(!shown.contains(secret.as_str()));
    }
}
