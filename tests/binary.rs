//! The real `gibby` binary, as an operator starts it.
#![allow(clippy::disallowed_methods)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

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

/// Usage errors exit 2 too, and --help works for every subcommand.
#[test]
fn command_line_usage() {
    assert_eq!(
        gibby().arg("bogus").output().unwrap().status.code(),
        Some(2)
    );
    for sub in [&["--help"][..], &["serve", "--help"], &["demo", "--help"]] {
        let output = gibby().args(sub).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{sub:?}");
    }
}
