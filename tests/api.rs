mod common;

use common::*;

#[tokio::test]
async fn health_says_ok() {
    let h = Harness::start().await;
    let answer = h.get("/health").await;
    assert_eq!((answer.status, answer.body), (200, serde_json::json!("ok")));
    h.stop().await;
}

#[tokio::test]
async fn snapshot_path_smoke() {
    let h = Harness::start().await;
    let a = h.account("a@example.com", 10, 20);
    h.write_accounts(&pool(Some("a@example.com"), vec![a]));
    let answer = h.token().await;
    assert_eq!(answer.status, 200);
    snapshots(|| insta::assert_snapshot!("smoke_accounts", scrub(&h.read_text("accounts.json").unwrap())));
    h.stop().await;
}
