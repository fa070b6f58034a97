//! The real `gibby` binary, as an operator starts it.
#![allow(clippy::disallowed_methods)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod support;

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn gibby() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gibby"));
    for (name, _) in std::env::vars() {
        if name.starts_with("GIBBY_") {
            command.env_remove(name);
        }
    }
    command
}

/// The README's first command, on a fresh directory: the demo serves a token.
#[tokio::test]
async fn demo_serves_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = gibby()
        .args(["demo", "--data-dir"])
        .arg(dir.path().join("demo-data"))
        .env("GIBBY_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _running = Running(child);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    // Poll /health until the server is up (bounded: 300 tries, 20 ms apart).
    let mut up = false;
    for _ in 0..300 {
        if client.get(format!("{url}/health")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "gibby demo did not come up");
    let response = client.get(format!("{url}/token")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["email"], "alice@demo.invalid");
    assert!(body["access_token"].as_str().unwrap().starts_with("eyJ"));
}

/// A bad setting stops startup with exit code 2 and names the variable.
#[test]
fn a_bad_setting_stops_startup() {
    for (variable, value) in [
        ("GIBBY_EXHAUSTED_USAGE_THRESHOLD", "lots"),
        ("GIBBY_LISTEN", "nowhere"),
        ("GIBBY_UPSTREAM_TIMEOUT_SECONDS", "-3"),
        ("GIBBY_CHATGPT_BASE_URL", "http://127.0.0.1:99999"),
        ("RUST_LOG", "gibby=["),
    ] {
        let output = gibby().arg("serve").env(variable, value).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{variable}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("{variable}=\"{value}\"")),
            "{stderr}"
        );
    }
}

/// A recording folder that cannot be made stops startup naming GIBBY_RECORD_DIR, instead of
/// a warning on every request; one that can is made 0700.
#[test]
fn an_unusable_record_dir_stops_startup() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-file"), "").unwrap();
    let output = gibby()
        .arg("serve")
        .env("GIBBY_DATA_DIR", dir.path())
        .env("GIBBY_LISTEN", "127.0.0.1:0")
        .env("GIBBY_RECORD_DIR", dir.path().join("a-file/sub"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("GIBBY_RECORD_DIR="), "{stderr}");

    let record = dir.path().join("record/deeper");
    let record_env = record.to_string_lossy().into_owned();
    let gibby = support::Gibby::start(
        dir.path(),
        "http://127.0.0.1:9",
        &[("GIBBY_RECORD_DIR", record_env.as_str())],
    );
    let mode = std::fs::metadata(&record).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    drop(gibby);
}

/// Usage errors exit 2 too, and --help works for every subcommand.
#[test]
fn command_line_usage() {
    assert_eq!(
        gibby().arg("bogus").output().unwrap().status.code(),
        Some(2)
    );
    for sub in [
        &["--help"][..],
        &["serve", "--help"],
        &["demo", "--help"],
        &["status", "--help"],
        &["check", "--help"],
        &["import", "--help"],
        &["replay", "--help"],
    ] {
        let output = gibby().args(sub).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{sub:?}");
    }
    // serve --help lists every setting.
    let help = gibby().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for variable in [
        "GIBBY_DATA_DIR",
        "GIBBY_LISTEN",
        "GIBBY_EXHAUSTED_USAGE_THRESHOLD",
        "GIBBY_USAGE_STALE_SECONDS",
        "GIBBY_API_KEY",
        "GIBBY_CHATGPT_BASE_URL",
        "GIBBY_AUTH_BASE_URL",
        "GIBBY_CODEX_CLIENT_VERSION",
        "GIBBY_UPSTREAM_TIMEOUT_SECONDS",
        "GIBBY_RECORD_DIR",
    ] {
        assert!(
            help.contains(variable),
            "{variable} missing from serve --help"
        );
    }
}

/// SIGTERM lets the request in flight finish with its token, then gibby exits 0; the
/// one log line per /token names the account chosen and why the others were passed over.
#[tokio::test]
async fn sigterm_finishes_requests_in_flight() {
    use gibby::fake_upstream::{AccountSpec, FakeUpstream};
    use gibby::model::{Account, AccountsFile, Secret};

    let fake = FakeUpstream::new();
    let upstream = fake.start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let issued = fake.add_account(AccountSpec::new("a@example.com"));
    let mut disabled = Account {
        email: "a@example.com".into(),
        access_token: Secret::new(issued.access_token),
        refresh_token: Secret::new(issued.refresh_token),
        token_refresh_at: Some(issued.expires_at - 86_400),
        usage: None,
        usage_checked_at: None,
        disabled: false,
    };
    let served = disabled.clone();
    disabled.email = "off@example.com".into();
    disabled.disabled = true;
    let file = AccountsFile {
        active_account: None,
        accounts: vec![disabled, served],
    };
    std::fs::write(dir.path().join("accounts.json"), file.to_text()).unwrap();
    fake.set_latency(Duration::from_millis(400));

    let port = free_port();
    let child = gibby()
        .arg("serve")
        .env("GIBBY_LISTEN", format!("127.0.0.1:{port}"))
        .env("GIBBY_DATA_DIR", dir.path())
        .env("GIBBY_CHATGPT_BASE_URL", &upstream.base_url)
        .env("GIBBY_AUTH_BASE_URL", &upstream.base_url)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut running = Running(child);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..300 {
        if client.get(format!("{url}/health")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "gibby serve did not come up");

    let in_flight = tokio::spawn(client.get(format!("{url}/token")).send());
    // Wait until the request has reached the upstream (bounded), then ask gibby to stop.
    for _ in 0..500 {
        if !fake.calls().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !fake.calls().is_empty(),
        "the request never reached the upstream"
    );
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let status = tokio::task::spawn_blocking(move || {
        let status = running.0.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(running.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        (status, stderr)
    })
    .await
    .unwrap();
    assert_eq!(status.0.code(), Some(0), "{}", status.1);
    let line = status
        .1
        .lines()
        .find(|l| l.contains("token served"))
        .unwrap_or_else(|| panic!("no log line per /token:\n{}", status.1));
    assert!(
        line.contains("a@example.com") && line.contains("off@example.com: disabled"),
        "{line}"
    );
    // Every other account is accounted for too: here none is left over.
    assert!(line.contains("others=none"), "{line}");
}

/// `gibby serve` warns at startup about a state file other users can read (it holds
/// tokens), naming the file and its mode, and says nothing about a 0600 one.
#[test]
fn serve_warns_about_state_files_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let set_mode = |name: &str, mode: u32| {
        std::fs::set_permissions(dir.path().join(name), std::fs::Permissions::from_mode(mode))
            .unwrap();
    };
    std::fs::write(
        dir.path().join("accounts.json"),
        "{\"active_account\": null, \"accounts\": []}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("failed.json"), "{\"accounts\": []}\n").unwrap();
    let warning = |name: &str, mode: &str| {
        format!(
            "{}: mode {mode} lets other users read the tokens; run chmod 600 on it",
            dir.path().join(name).display()
        )
    };

    set_mode("accounts.json", 0o644);
    set_mode("failed.json", 0o600);
    let log = support::Gibby::start(dir.path(), "http://127.0.0.1:9", &[]).log();
    assert!(log.contains(&warning("accounts.json", "0644")), "{log}");
    assert!(!log.contains("failed.json: mode"), "{log}");

    set_mode("accounts.json", 0o600);
    set_mode("failed.json", 0o640);
    let log = support::Gibby::start(dir.path(), "http://127.0.0.1:9", &[]).log();
    assert!(log.contains(&warning("failed.json", "0640")), "{log}");
    assert!(!log.contains("accounts.json: mode"), "{log}");
}

/// Refused requests leave a log line (without the key or any token), so an operator sees
/// wrong keys, browser pages and rebinding attempts.
#[tokio::test]
async fn refused_requests_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("accounts.json"),
        "{\"active_account\": null, \"accounts\": []}\n",
    )
    .unwrap();
    let client = support::client();
    let open = support::Gibby::start(dir.path(), "http://127.0.0.1:9", &[]);
    let response = client
        .get(format!("{}/token", open.url))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    let log = open.log_handle();
    assert!(
        log.wait_for_line("refused /token for a host name", Duration::from_secs(10)),
        "{}",
        open.log()
    );
    drop(open);

    let keyed = support::Gibby::start(
        dir.path(),
        "http://127.0.0.1:9",
        &[("GIBBY_API_KEY", "k3y-value")],
    );
    for (header, value, line) in [
        (
            "authorization",
            "Bearer wrong",
            "refused /token: unauthorized",
        ),
        (
            "origin",
            "http://evil.example",
            "refused a request from a web page",
        ),
    ] {
        let response = client
            .get(format!("{}/token", keyed.url))
            .header(header, value)
            .send()
            .await
            .unwrap();
        assert!([401, 403].contains(&response.status().as_u16()));
        assert!(
            keyed
                .log_handle()
                .wait_for_line(line, Duration::from_secs(10)),
            "{}",
            keyed.log()
        );
    }
    assert!(!keyed.log().contains("k3y-value"));
}
