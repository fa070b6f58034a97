//! A broken file never costs an account (SPEC.md sections 1 and 6): for every kind of bad
//! input, `GET /token` answers 503 `invalid_state_file` with a message that names the file
//! and the position, an error is logged, both files are left byte for byte as they were,
//! and nothing else appears in the data directory. The 503 bodies are pinned in
//! `snapshots/bad_input_*.snap`.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use gibby::fake_upstream::{Endpoint, Reply};
use gibby::model::{Account, FailedFile, Secret};
use serde_json::json;

const A: &str = "a@example.com";
const B: &str = "b@example.com";

/// Everything the subscriber writes, for one test.
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

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Captures this test's log lines. `#[tokio::test]` runs gibby's server on the test's own
/// thread, so a thread-local subscriber sees its lines and no other test's.
fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_max_level(tracing::Level::INFO)
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// An account with fixed token values, so the files (and the positions in the messages)
/// are the same on every run.
fn fixed(email: &str, primary: i64) -> Account {
    let local = email.split('@').next().unwrap();
    Account {
        email: email.to_owned(),
        access_token: Secret::new(format!("at-{local}-0123456789")),
        refresh_token: Secret::new(format!("rt-{local}-0123456789")),
        token_refresh_at: Some(NOW + 86_400),
        usage: Some(usage(primary, 20)),
        usage_checked_at: Some(NOW - 60),
        disabled: false,
    }
}

/// A good accounts.json of two accounts, as gibby writes it.
fn good_accounts() -> String {
    pool(Some(A), vec![fixed(A, 10), fixed(B, 30)]).to_text()
}

/// A good failed.json holding one earlier failure.
fn good_failed() -> String {
    FailedFile {
        accounts: vec![fixed("old@example.com", 5)],
    }
    .to_text()
}

/// One kind of bad input: the files as they are before the request (None: absent), and
/// what the 503's detail must name.
struct Bad {
    snapshot: &'static str,
    accounts: Option<Vec<u8>>,
    failed: Option<String>,
    /// Substrings of the detail: the file, the position, the problem.
    names: Vec<String>,
}

impl Bad {
    fn accounts(snapshot: &'static str, accounts: &str, names: &[&str]) -> Bad {
        Bad {
            snapshot,
            accounts: Some(accounts.as_bytes().to_vec()),
            failed: Some(good_failed()),
            names: names.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Every token value in the text, whatever shape the file is in.
fn tokens_in(text: &str) -> Vec<String> {
    text.split('"')
        .filter(|s| s.starts_with("at-") || s.starts_with("rt-") || s.starts_with("eyJ"))
        .map(str::to_owned)
        .collect()
}

/// Writes the files, asks for a token (after `prepare` scripted the fake, if it needs to)
/// and checks everything the issue asks of a bad input. Returns the harness for more checks.
async fn refused(bad: Bad, prepare: impl FnOnce(&Harness)) -> Harness {
    let (logs, _guard) = capture_logs();
    let h = Harness::start().await;
    let accounts_path = h.dir.path().join("accounts.json");
    if let Some(bytes) = &bad.accounts {
        std::fs::write(&accounts_path, bytes).unwrap();
    }
    if let Some(text) = &bad.failed {
        h.write_text("failed.json", text);
    }
    prepare(&h);
    let accounts_before = std::fs::read(&accounts_path).ok();
    let failed_before = h.read_text("failed.json");
    let names_before = h.files_in_dir();

    let answer = h.token().await;

    assert_eq!(answer.status, 503, "{}", scrub(&answer.text));
    assert_eq!(answer.body["error"], "invalid_state_file");
    let detail = answer.body["detail"].as_str().expect("a detail").to_owned();
    for name in &bad.names {
        assert!(detail.contains(name.as_str()), "{name:?} not in {detail:?}");
    }
    // An error line carries the same detail.
    let logged = logs.text();
    assert!(
        logged.lines().any(|l| l.contains("ERROR")
            && l.contains("invalid state file")
            && l.contains(&detail)),
        "no error line for {detail:?} in:\n{}",
        scrub(&logged)
    );
    // Both files byte for byte, and no temporary file (a lock file only when a move was tried).
    assert!(
        std::fs::read(&accounts_path).ok() == accounts_before,
        "accounts.json changed"
    );
    assert!(
        h.read_text("failed.json") == failed_before,
        "failed.json changed"
    );
    let mut names_after = h.files_in_dir();
    names_after.retain(|n| n != ".gibby.lock" || names_before.contains(n));
    assert_eq!(names_after, names_before, "the data directory changed");
    // No token in the answer or the logs.
    let mut secrets = tokens_in(&String::from_utf8_lossy(
        accounts_before.as_deref().unwrap_or_default(),
    ));
    secrets.extend(tokens_in(failed_before.as_deref().unwrap_or_default()));
    assert!(
        bad.accounts.is_none() || !secrets.is_empty() || accounts_before.as_deref() == Some(b""),
        "the token check has tokens to look for"
    );
    for secret in &secrets {
        assert!(
            !answer.text.contains(secret.as_str()),
            "a token in the answer"
        );
        assert!(!logged.contains(secret.as_str()), "a token in the logs");
    }
    let text = scrub(&answer.text);
    snapshots(|| insta::assert_snapshot!(bad.snapshot, text));
    h
}

/// `refused` for a file that is bad from the first read: no upstream call, no lock taken.
async fn refused_at_once(bad: Bad) {
    let h = refused(bad, |_| {}).await;
    assert_eq!(h.fake.calls().len(), 0, "no upstream call");
    assert!(
        !h.files_in_dir().contains(&".gibby.lock".to_owned()),
        "no lock was taken"
    );
    h.stop().await;
}

#[tokio::test]
async fn empty_accounts_json() {
    refused_at_once(Bad::accounts(
        "bad_input_empty_503",
        "",
        &["accounts.json: the file is empty"],
    ))
    .await;
}

#[tokio::test]
async fn accounts_json_of_whitespace_is_empty() {
    refused_at_once(Bad::accounts(
        "bad_input_whitespace_503",
        "\n  \n",
        &["accounts.json: the file is empty"],
    ))
    .await;
}

/// Cut in the middle of the second account, as a crashed non-atomic writer leaves it.
#[tokio::test]
async fn truncated_accounts_json() {
    let good = good_accounts();
    let cut = good.find("\"rt-b").expect("B's refresh token") + 6;
    let truncated = &good[..cut];
    let line = truncated.lines().count();
    let column = truncated.lines().last().unwrap().len();
    refused_at_once(Bad::accounts(
        "bad_input_truncated_503",
        truncated,
        &[
            "accounts.json: ",
            &format!("at line {line} column {column}"),
            "EOF",
        ],
    ))
    .await;
}

#[tokio::test]
async fn accounts_json_that_is_not_json() {
    refused_at_once(Bad::accounts(
        "bad_input_not_json_503",
        "email,access_token,refresh_token\na@example.com,at-a-0123456789,rt-a-0123456789\n",
        &["accounts.json: ", "at line 1 column 1"],
    ))
    .await;
}

#[tokio::test]
async fn accounts_json_with_a_wrong_type() {
    let text = good_accounts().replacen(
        &format!("\"token_refresh_at\": {}", NOW + 86_400),
        "\"token_refresh_at\": \"tomorrow\"",
        2,
    );
    let text = text.replacen("\"tomorrow\"", &(NOW + 86_400).to_string(), 1);
    refused_at_once(Bad::accounts(
        "bad_input_wrong_type_503",
        &text,
        &[
            "accounts.json: accounts[1] (b@example.com): ",
            "invalid type: string (8 characters)",
        ],
    ))
    .await;
}

/// A helper script added a field gibby does not know.
#[tokio::test]
async fn accounts_json_with_an_unknown_field() {
    let text = good_accounts().replacen(
        "\"disabled\": false",
        "\"disabled\": false,\n      \"plan\": \"plus\"",
        1,
    );
    refused_at_once(Bad::accounts(
        "bad_input_unknown_field_503",
        &text,
        &[
            "accounts.json: accounts[0] (a@example.com): ",
            "unknown field `plan`",
        ],
    ))
    .await;
}

#[tokio::test]
async fn accounts_json_with_a_duplicate_email() {
    let mut again = fixed(A, 50);
    again.access_token = Secret::new("at-a-again-0123456789");
    let text = pool(Some(A), vec![fixed(A, 10), fixed(B, 30), again]).to_text();
    refused_at_once(Bad::accounts(
        "bad_input_duplicate_email_503",
        &text,
        &[
            "accounts.json: accounts[2] (a@example.com): ",
            "duplicate email, already used by accounts[0]",
        ],
    ))
    .await;
}

#[tokio::test]
async fn missing_accounts_json() {
    refused_at_once(Bad {
        snapshot: "bad_input_missing_503",
        accounts: None,
        failed: Some(good_failed()),
        names: vec!["accounts.json: the file does not exist".into()],
    })
    .await;
}

/// A byte that is not UTF-8 (a Latin-1 editor): named by line and column, and byte.
#[tokio::test]
async fn accounts_json_that_is_not_utf8() {
    let good = good_accounts();
    let at = good.find("b@example.com").unwrap();
    let line = good[..at].lines().count();
    let column = at - good[..at].rfind('\n').unwrap();
    let mut bytes = good.into_bytes();
    bytes[at] = 0xff;
    let mut bad = Bad::accounts("bad_input_not_utf8_503", "", &[]);
    bad.accounts = Some(bytes);
    bad.names = vec![
        "accounts.json: cannot be read: not UTF-8".into(),
        format!("at line {line} column {column} (byte {at})"),
    ];
    refused_at_once(bad).await;
}

/// SPEC.md section 6: the validation declares the active account invalid, it must move, and
/// failed.json does not parse. The account stays in accounts.json, failed.json stays as it
/// is, and the request answers 503 saying so, although B could have been served.
#[tokio::test]
async fn corrupt_failed_json_when_an_account_must_move() {
    let mut failed = good_failed();
    failed.truncate(failed.find("\"usage\"").unwrap());
    let line = failed.lines().count();
    let column = failed.lines().last().unwrap().len();
    refused_at_a_move(
        "bad_input_failed_json_at_move_503",
        failed,
        vec![
            "failed.json: ".into(),
            format!("at line {line} column {column}"),
            format!("{A} stays in accounts.json"),
        ],
    )
    .await;
}

/// A move is needed (A's validation answers 401) and failed.json, as given, is refused:
/// 503 naming failed.json and the position, both files byte for byte.
async fn refused_at_a_move(snapshot: &'static str, failed: String, names: Vec<String>) {
    let bad = Bad {
        snapshot,
        accounts: None,
        failed: Some(failed),
        names,
    };
    let h = refused(bad, |h| {
        let file = pool(Some(A), vec![h.account(A, 10, 20), h.account(B, 30, 20)]);
        h.write_accounts(&file);
        h.fake.push_reply(
            Endpoint::Models,
            Some(A),
            Reply::json(
                401,
                json!({"detail": "Could not parse your authentication token."}),
            ),
        );
    })
    .await;
    let calls: Vec<_> = h
        .fake
        .calls()
        .into_iter()
        .map(|c| (c.endpoint, c.email, c.status))
        .collect();
    assert_eq!(
        calls,
        [(Endpoint::Models, Some(A.to_owned()), 401)],
        "A's validation was the only call"
    );
    h.stop().await;
}

/// failed.json parses as JSON but an entry has a wrong type (`disabled: "no"`).
#[tokio::test]
async fn failed_json_with_a_wrong_type_when_an_account_must_move() {
    let failed = good_failed().replace("\"disabled\": false", "\"disabled\": \"no\"");
    refused_at_a_move(
        "bad_input_failed_json_wrong_type_at_move_503",
        failed,
        vec![
            "failed.json: ".into(),
            // The position: the entry's index and email (DESIGN.md, as for accounts.json).
            "accounts[0] (old@example.com)".into(),
            "invalid type: string (2 characters), expected a boolean".into(),
            format!("{A} stays in accounts.json"),
        ],
    )
    .await;
}

/// failed.json parses as JSON but an entry carries a field SPEC.md does not know.
#[tokio::test]
async fn failed_json_with_an_unknown_field_when_an_account_must_move() {
    let failed = good_failed().replace(
        "\"disabled\": false",
        "\"disabled\": false,\n      \"note\": \"hand-written\"",
    );
    refused_at_a_move(
        "bad_input_failed_json_unknown_field_at_move_503",
        failed,
        vec![
            "failed.json: ".into(),
            "accounts[0] (old@example.com)".into(),
            "unknown field `note`".into(),
            format!("{A} stays in accounts.json"),
        ],
    )
    .await;
}

/// DESIGN.md: a failed.json that does not parse does not stop ordinary requests, only
/// moves: the active account is served, a warning names failed.json, nothing is written.
#[tokio::test]
async fn corrupt_failed_json_without_a_move_still_serves() {
    let (logs, _guard) = capture_logs();
    let h = Harness::start().await;
    h.write_accounts(&pool(Some(A), vec![h.account(A, 10, 20)]));
    h.write_text("failed.json", "{\"accounts\": [\n");
    let accounts_before = h.read_text("accounts.json");
    let names_before = h.files_in_dir();

    let answer = h.token().await;

    assert_eq!(answer.status, 200, "{}", scrub(&answer.text));
    assert_eq!(answer.body["email"], A);
    assert!(
        h.read_text("accounts.json") == accounts_before,
        "accounts.json changed"
    );
    assert_eq!(
        h.read_text("failed.json").as_deref(),
        Some("{\"accounts\": [\n")
    );
    assert_eq!(h.files_in_dir(), names_before);
    let logged = logs.text();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("WARN") && l.contains("failed.json: EOF while parsing")),
        "no warning about failed.json in:\n{}",
        scrub(&logged)
    );
    h.stop().await;
}
