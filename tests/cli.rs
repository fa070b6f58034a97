//! `gibby status`, `check` and `import`, run as an operator runs them.
#![allow(clippy::disallowed_methods)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use gibby::model::{AccountsFile, Secret};

fn gibby(dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gibby"));
    for (name, _) in std::env::vars() {
        if name.starts_with("GIBBY_") {
            command.env_remove(name);
        }
    }
    command
        .env("GIBBY_DATA_DIR", dir)
        .args(args)
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn jwt(payload: serde_json::Value) -> String {
    format!(
        "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
        URL_SAFE_NO_PAD.encode(payload.to_string())
    )
}

fn auth_json(email: &str, refresh: &str) -> String {
    let access = jwt(serde_json::json!({
        "exp": 4_000_000_000i64,
        "https://api.openai.com/profile": {"email": email},
        "https://api.openai.com/auth": {"chatgpt_account_id": "acc"},
    }));
    let id = jwt(serde_json::json!({"email": email}));
    serde_json::json!({
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": null,
        "tokens": {"id_token": id, "access_token": access, "refresh_token": refresh, "account_id": "acc"},
        "last_refresh": "2026-12-01T00:00:00Z"
    })
    .to_string()
}

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// import adds a new account, updates one in place, and leaves every other account as it was.
#[test]
fn import_adds_then_updates_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let auth = dir.path().join("auth.json");
    write(
        dir.path(),
        "auth.json",
        &auth_json("new@example.com", "rt-1"),
    );

    let first = gibby(&data, &["import", auth.to_str().unwrap()]);
    assert_eq!(first.status.code(), Some(0), "{}", out(&first));
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o700,
        "import creates the data directory for its user only"
    );
    assert!(
        out(&first).contains("new@example.com: added"),
        "{}",
        out(&first)
    );
    let mode = std::fs::metadata(data.join("accounts.json"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // Another account appears (a hand edit), then the same login is imported again.
    let mut file =
        AccountsFile::parse(&std::fs::read_to_string(data.join("accounts.json")).unwrap()).unwrap();
    let mut other = file.accounts[0].clone();
    other.email = "other@example.com".into();
    other.disabled = true;
    file.accounts.insert(0, other.clone());
    file.accounts[1].disabled = true;
    write(&data, "accounts.json", &file.to_text());
    write(
        dir.path(),
        "auth.json",
        &auth_json("new@example.com", "rt-2"),
    );

    let second = gibby(&data, &["import", auth.to_str().unwrap()]);
    assert!(
        out(&second).contains("new@example.com: updated"),
        "{}",
        out(&second)
    );
    let after =
        AccountsFile::parse(&std::fs::read_to_string(data.join("accounts.json")).unwrap()).unwrap();
    assert_eq!(after.accounts.len(), 2);
    assert_eq!(after.accounts[0], other, "the other account is untouched");
    let updated = &after.accounts[1];
    assert_eq!(updated.refresh_token, Secret::new("rt-2"));
    assert!(updated.disabled, "import changes only the tokens");
    assert_eq!(updated.token_refresh_at, Some(4_000_000_000 - 86_400));

    let third = gibby(&data, &["import", auth.to_str().unwrap()]);
    assert!(
        out(&third).contains("already up to date"),
        "{}",
        out(&third)
    );
}

/// An auth.json without ChatGPT tokens, or one that is broken, is refused with a clear message.
#[test]
fn import_refuses_what_it_cannot_pool() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"{"auth_mode": "apikey", "OPENAI_API_KEY": "sk-x", "tokens": null}"#,
            "no ChatGPT tokens",
        ),
        (r#"{"OPENAI_API_KEY": "sk-x"}"#, "no ChatGPT tokens"),
        (
            r#"{"tokens": {"access_token": "opaque", "refresh_token": "r"}}"#,
            "cannot tell the account's email",
        ),
        (
            r#"{"tokens": {"refresh_token": "r"}}"#,
            "tokens.access_token is missing",
        ),
        ("{not json", "auth.json: key must be a string"),
    ];
    // A claim that is no usable email (a token, a line break that would forge a log line)
    // is refused, and not repeated.
    let no_at = auth_json("SECRETNOATtokenlikestring0123456789abcdef", "r");
    let newline = auth_json("a@x.io\n2026 INFO forged", "r");
    let cases: Vec<(&str, &str)> = cases
        .into_iter()
        .chain([
            (
                no_at.as_str(),
                "email must be an email address (41 characters, no @)",
            ),
            (newline.as_str(), "with whitespace or control characters"),
        ])
        .collect();
    for (text, message) in cases {
        write(dir.path(), "auth.json", text);
        let o = gibby(
            &dir.path().join("data"),
            &["import", dir.path().join("auth.json").to_str().unwrap()],
        );
        assert_eq!(o.status.code(), Some(1), "{text}");
        assert!(out(&o).contains(message), "{text}: {}", out(&o));
        assert!(!out(&o).contains("SECRETNOAT") && !out(&o).contains("forged"));
        assert!(!dir.path().join("data/accounts.json").exists());
    }
    // A broken accounts.json is not overwritten by an import.
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write(&data, "accounts.json", "{\"accounts\": [");
    write(dir.path(), "auth.json", &auth_json("x@example.com", "r"));
    let o = gibby(
        &data,
        &["import", dir.path().join("auth.json").to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("nothing was imported"), "{}", out(&o));
    assert_eq!(
        std::fs::read_to_string(data.join("accounts.json")).unwrap(),
        "{\"accounts\": ["
    );
}

/// check reports every problem with its position, and files other users can read.
#[test]
fn check_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let broken = r#"{"accounts": [
        {"email": "a@x", "access_token": "x", "refresh_token": "y", "colour": "red"},
        {"email": "a@x", "access_token": "x", "refresh_token": "y"}
    ]}"#;
    write(dir.path(), "accounts.json", broken);
    write(dir.path(), "failed.json", "{\"accounts\": 1}");
    std::fs::set_permissions(
        dir.path().join("failed.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let o = gibby(dir.path(), &["check"]);
    assert_eq!(o.status.code(), Some(1));
    let text = out(&o);
    for expected in [
        "accounts.json: accounts[0] (a@x): unknown field `colour`",
        "failed.json: accounts must be an array, found a number",
        "failed.json: mode 0644 lets other users read the tokens",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("accounts.json")).unwrap(),
        broken,
        "check changes nothing"
    );

    write(
        dir.path(),
        "accounts.json",
        r#"{"active_account": null, "accounts": []}"#,
    );
    std::fs::remove_file(dir.path().join("failed.json")).unwrap();
    let ok = gibby(dir.path(), &["check"]);
    assert_eq!(ok.status.code(), Some(0), "{}", out(&ok));
}

/// status --json is for scripts: it parses, and it never carries a token.
#[test]
fn status_json_has_no_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(
        dir.path(),
        "auth.json",
        &auth_json("s@example.com", "refresh-secret"),
    );
    gibby(
        &data,
        &["import", dir.path().join("auth.json").to_str().unwrap()],
    );
    for args in [&["status", "--json"][..], &["status"]] {
        let o = gibby(&data, args);
        assert_eq!(o.status.code(), Some(0), "{}", out(&o));
        let text = out(&o);
        assert!(text.contains("s@example.com"));
        assert!(
            !text.contains("refresh-secret") && !text.contains("eyJ"),
            "{text}"
        );
    }
    let json: serde_json::Value =
        serde_json::from_slice(&gibby(&data, &["status", "--json"]).stdout).unwrap();
    assert_eq!(json["accounts"][0]["state"], "stale");
    let missing = gibby(&dir.path().join("nowhere"), &["status"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(out(&missing).contains("accounts.json: does not exist"));

    // A token pasted into active_account is shown by its length, in JSON too.
    let text = std::fs::read_to_string(data.join("accounts.json")).unwrap();
    let pasted = text.replacen(
        "\"active_account\": null",
        "\"active_account\": \"sk-SECRETTOKEN0123456789abcdefSECRET\"",
        1,
    );
    assert_ne!(pasted, text);
    write(&data, "accounts.json", &pasted);
    for args in [&["status", "--json"][..], &["status"]] {
        let text = out(&gibby(&data, args));
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("a string of 36 characters"), "{text}");
    }
}

/// A token pasted into `email` is a problem for check, shown only by its length, and status
/// never prints it as the account's name.
#[test]
fn a_token_pasted_into_email_is_a_problem_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let token = jwt(serde_json::json!({"exp": 4_000_000_000i64}));
    let text = format!(
        r#"{{"active_account": null, "accounts": [{{"email": "{token}", "access_token": "x", "refresh_token": "y"}}]}}"#
    );
    write(dir.path(), "accounts.json", &text);
    let o = gibby(dir.path(), &["check"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let expected = format!(
        "accounts.json: accounts[0]: email must be an email address ({} characters, no @)",
        token.len()
    );
    assert!(out(&o).contains(&expected), "{}", out(&o));
    assert!(!out(&o).contains(&token), "{}", out(&o));
    let status = gibby(dir.path(), &["status"]);
    assert!(!out(&status).contains(&token), "{}", out(&status));
}
