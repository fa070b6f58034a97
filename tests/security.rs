//! What keeps tokens from the wrong hands: the API key, browsers refused, nothing cached.
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;

async fn get_with(
    h: &Harness,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut request = h.client.get(format!("{}{path}", h.url));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

/// With GIBBY_API_KEY set, /token needs exactly `Authorization: Bearer <key>` (the scheme in
/// any case); /health does not.
#[tokio::test]
async fn api_key_is_required_when_set() {
    let h = Harness::start_with(|s| s.api_key = Some("s3cret-key".into())).await;
    let a = h.account("a@example.com", 10, 10);
    h.write_accounts(&pool(Some("a@example.com"), vec![a]));
    for headers in [
        &[][..],
        &[("authorization", "Bearer wrong")],
        &[("authorization", "Bearer s3cret-key-and-more")],
        &[("authorization", "Bearer s3cret-ke")],
        &[("authorization", "Basic s3cret-key")],
        &[("authorization", "s3cret-key")],
    ] {
        let (status, head, body) = get_with(&h, "/token", headers).await;
        assert_eq!(status, 401, "{headers:?}");
        assert_eq!(head["www-authenticate"], "Bearer");
        assert_eq!(head["cache-control"], "no-store");
        assert!(!body.contains("s3cret"), "{body}");
    }
    assert_eq!(h.fake.calls().len(), 0, "no upstream call without the key");
    let (status, _, _) = get_with(&h, "/token", &[("authorization", "Bearer s3cret-key")]).await;
    assert_eq!(status, 200);
    // The scheme is case-insensitive.
    let (status, _, _) = get_with(&h, "/token", &[("authorization", "bearer s3cret-key")]).await;
    assert_eq!(status, 200);
    let (status, _, body) = get_with(&h, "/health", &[]).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    h.stop().await;
}

/// Any request with an Origin header is refused before anything else happens.
#[tokio::test]
async fn requests_from_web_pages_are_refused() {
    let h = Harness::start_with(|s| s.api_key = Some("k".into())).await;
    let a = h.account("a@example.com", 10, 10);
    h.write_accounts(&pool(Some("a@example.com"), vec![a]));
    for path in ["/token", "/health"] {
        for origin in ["http://evil.example", "null", "http://127.0.0.1:8080"] {
            let (status, head, body) = get_with(
                &h,
                path,
                &[("origin", origin), ("authorization", "Bearer k")],
            )
            .await;
            assert_eq!(status, 403, "{path} {origin}");
            assert_eq!(head["cache-control"], "no-store");
            assert!(body.contains("origin_refused"), "{body}");
        }
    }
    assert_eq!(h.fake.calls().len(), 0);
    h.stop().await;
}

/// Without an API key, a `/token` request that names this machine by a DNS name is refused
/// (a web page that rebinds its own name to 127.0.0.1 sends no `Origin` on a same-origin
/// fetch, but its name in `Host`); an IP address or localhost is served. With a key, any
/// name is served: a rebinding page cannot know the key.
#[tokio::test]
async fn host_names_are_refused_without_an_api_key() {
    let h = Harness::start().await;
    let a = h.account("a@example.com", 10, 10);
    h.write_accounts(&pool(Some("a@example.com"), vec![a]));
    let before = std::fs::read(h.dir.path().join("accounts.json")).unwrap();
    for host in [
        "evil.example",
        "evil.example:8080",
        "localhost.evil.example",
        "127.0.0.1.nip.io:80",
    ] {
        let (status, head, body) = get_with(&h, "/token", &[("host", host)]).await;
        assert_eq!(status, 403, "{host}");
        assert_eq!(head["cache-control"], "no-store");
        assert!(body.contains("host_refused"), "{body}");
        assert!(!body.contains("access_token"), "{body}");
    }
    assert_eq!(
        h.fake.calls().len(),
        0,
        "no upstream call for a refused request"
    );
    assert_eq!(
        std::fs::read(h.dir.path().join("accounts.json")).unwrap(),
        before
    );
    for host in [
        "127.0.0.1",
        "127.0.0.1:8080",
        "localhost:8080",
        "LOCALHOST",
        "[::1]:8080",
    ] {
        let (status, _, body) = get_with(&h, "/token", &[("host", host)]).await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    // /health carries no secret and answers any name.
    let (status, _, _) = get_with(&h, "/health", &[("host", "evil.example")]).await;
    assert_eq!(status, 200);
    h.stop().await;

    let h = Harness::start_with(|s| s.api_key = Some("k".into())).await;
    let a = h.account("a@example.com", 10, 10);
    h.write_accounts(&pool(Some("a@example.com"), vec![a]));
    let (status, _, body) = get_with(
        &h,
        "/token",
        &[
            ("host", "gibby.internal:8080"),
            ("authorization", "Bearer k"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    h.stop().await;
}

/// A HEAD would run the whole request (upstream calls, writes) to send no token: 405.
#[tokio::test]
async fn head_token_is_not_allowed() {
    let h = Harness::start().await;
    let a = h.account("a@example.com", 10, 10);
    h.write_accounts(&pool(Some("a@example.com"), vec![a]));
    let response = h
        .client
        .head(format!("{}/token", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(response.headers()["allow"], "GET");
    let response = h
        .client
        .post(format!("{}/token", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(response.headers()["allow"], "GET");
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("method_not_allowed"));
    assert_eq!(h.fake.calls().len(), 0);
    h.stop().await;
}
