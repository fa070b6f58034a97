use super::*;
use reqwest::Client;
use std::time::Instant;

const USAGE: &str = "/backend-api/wham/usage";
const MODELS: &str = "/backend-api/codex/models?client_version=0.50.0";

async fn setup() -> (FakeUpstream, RunningFake, Client) {
    let fake = FakeUpstream::new();
    let running = fake.start(0).await.expect("bind 127.0.0.1");
    // No proxy: an http_proxy in the environment must not capture loopback traffic.
    let client = Client::builder().no_proxy().build().unwrap();
    (fake, running, client)
}

async fn refresh(c: &Client, run: &RunningFake, rt: &str) -> (u16, Value) {
    let body = json!({"client_id": CLIENT_ID, "grant_type": "refresh_token",
                      "refresh_token": rt, "scope": "openid profile email"});
    let resp = c
        .post(format!("{}/oauth/token", run.base_url))
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn get(c: &Client, run: &RunningFake, path: &str, token: &str) -> (u16, Value) {
    let resp = c
        .get(format!("{}{path}", run.base_url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn refresh_rotates_and_reuse_is_counted() {
    let (fake, run, c) = setup().await;
    let first = fake.add_account(AccountSpec::new("a@x.test"));

    let (status, body) = refresh(&c, &run, &first.refresh_token).await;
    assert_eq!(status, 200);
    assert_eq!(body["expires_in"], 864_000);
    assert_eq!(body["token_type"], "Bearer");
    let new_rt = body["refresh_token"].as_str().unwrap();
    assert!(new_rt.starts_with("rt_") && new_rt != first.refresh_token);
    assert_ne!(body["access_token"].as_str().unwrap(), first.access_token);
    assert!(body["id_token"].as_str().unwrap().split('.').count() == 3);
    assert_eq!(fake.reused_refresh_tokens(), 0);

    let (status, body) = refresh(&c, &run, &first.refresh_token).await;
    assert_eq!((status, code(&body)), (401, "refresh_token_reused"));
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(
        body["error"]["message"],
        "Your refresh token has already been used to generate a new access token. \
         Please try signing in again."
    );
    assert!(body["error"]["param"].is_null());
    assert_eq!(fake.reused_refresh_tokens(), 1);

    // The rotated token works, and the old access token lives on until its exp.
    assert_eq!(refresh(&c, &run, new_rt).await.0, 200);
    assert_eq!(get(&c, &run, USAGE, &first.access_token).await.0, 200);

    let (status, body) = refresh(&c, &run, "rt_never_issued").await;
    assert_eq!((status, code(&body)), (401, "token_expired"));
    assert_eq!(fake.reused_refresh_tokens(), 1);
    assert_eq!(fake.count(Endpoint::Refresh), 4);
    let call = &fake.calls()[1];
    assert_eq!(call.email.as_deref(), Some("a@x.test"));
    assert_eq!(call.refresh_token.as_deref(), Some(&*first.refresh_token));
    assert_eq!(call.status, 401);
}

#[tokio::test]
async fn every_issued_token_is_listed() {
    let (fake, run, c) = setup().await;
    let first = fake.add_account(AccountSpec::new("a@x.test"));
    let (_, body) = refresh(&c, &run, &first.refresh_token).await;
    let again = fake.login("a@x.test");
    let issued = fake.issued_tokens();
    let mut expected = vec![first.access_token, first.refresh_token, first.id_token];
    for key in ["access_token", "refresh_token", "id_token"] {
        expected.push(body[key].as_str().unwrap().to_owned());
    }
    expected.extend([again.access_token, again.refresh_token, again.id_token]);
    assert_eq!(issued, expected);
}

#[tokio::test]
async fn form_encoded_refresh_and_bad_requests() {
    let (fake, run, c) = setup().await;
    let t = fake.add_account(AccountSpec::new("a@x.test"));
    let url = format!("{}/oauth/token", run.base_url);
    let form = [
        ("client_id", CLIENT_ID),
        ("grant_type", "refresh_token"),
        ("refresh_token", &t.refresh_token),
        ("scope", "openid profile email"),
    ];
    let resp = c.post(&url).form(&form).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body["access_token"].is_string());

    let bad = [
        ("client_id", "someone_else"),
        ("grant_type", "refresh_token"),
    ];
    let resp = c.post(&url).form(&bad).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    assert!(body["error_description"].is_string());

    let resp = c.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(fake.reused_refresh_tokens(), 0);
}

#[tokio::test]
async fn usage_reports_the_configured_windows() {
    let (fake, run, c) = setup().await;
    fake.set_now(Some(1_700_000_000));
    let t = fake.add_account(AccountSpec::new("a@x.test"));
    let (status, body) = get(&c, &run, USAGE, &t.access_token).await;
    assert_eq!(status, 200);
    assert_eq!(body["plan_type"], "plus");
    assert_eq!(
        body["rate_limit"]["primary_window"],
        json!({"used_percent": 10, "limit_window_seconds": 18000,
               "reset_after_seconds": 18000, "reset_at": 1_700_018_000})
    );
    assert_eq!(body["rate_limit"]["secondary_window"]["used_percent"], 20);
    assert_eq!(body["credits"]["balance"], "0");
    assert!(body["additional_rate_limits"].is_null());

    // Weekly-only plans put their one window in the primary slot.
    let weekly = Window::new(Number::from_f64(99.5).unwrap(), 604_800, 1000);
    fake.set_usage("a@x.test", Some(weekly), None);
    let (_, body) = get(&c, &run, USAGE, &t.access_token).await;
    assert_eq!(body["rate_limit"]["primary_window"]["used_percent"], 99.5);
    assert_eq!(
        body["rate_limit"]["primary_window"]["reset_at"],
        1_700_001_000
    );
    assert!(body["rate_limit"]["secondary_window"].is_null());
}

#[tokio::test]
async fn models_needs_client_version() {
    let (fake, run, c) = setup().await;
    let t = fake.add_account(AccountSpec::new("a@x.test"));
    let (status, body) = get(&c, &run, "/backend-api/codex/models", &t.access_token).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"detail": [{"type": "missing", "loc": ["query", "client_version"],
                           "msg": "Field required", "input": null}]})
    );

    let resp = c
        .get(format!("{}{MODELS}", run.base_url))
        .bearer_auth(&t.access_token)
        .header("ChatGPT-Account-Id", &t.account_id)
        .header("User-Agent", "gibby/0.1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("etag"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["models"][0]["slug"], "gpt-5-codex");
    assert_eq!(body["models"][0]["display_name"], "gpt-5-codex");

    let call = fake.calls().pop().unwrap();
    assert_eq!(call.endpoint, Endpoint::Models);
    assert_eq!(call.email.as_deref(), Some("a@x.test"));
    assert_eq!(call.bearer.as_deref(), Some(&*t.access_token));
    assert_eq!(call.account_id_header.as_deref(), Some(&*t.account_id));
    assert_eq!(call.user_agent.as_deref(), Some("gibby/0.1.0"));
    assert_eq!(call.query.as_deref(), Some("client_version=0.50.0"));
    assert_eq!(call.status, 200);
}

#[tokio::test]
async fn unknown_and_expired_tokens_get_detail_401() {
    let (fake, run, c) = setup().await;
    let detail = json!({"detail": "Could not parse your authentication token. Please try signing in again."});
    assert_eq!(get(&c, &run, USAGE, "garbage").await, (401, detail.clone()));
    assert_eq!(
        get(&c, &run, MODELS, "garbage").await,
        (401, detail.clone())
    );

    fake.set_now(Some(1_000_000));
    fake.set_token_lifetime(60);
    let t = fake.add_account(AccountSpec::new("a@x.test"));
    assert_eq!(t.expires_at, 1_000_060);
    assert_eq!(get(&c, &run, USAGE, &t.access_token).await.0, 200);
    fake.set_now(Some(1_000_060));
    assert_eq!(get(&c, &run, USAGE, &t.access_token).await, (401, detail));
    // The fake still knows whose the expired token was.
    assert_eq!(
        fake.calls().pop().unwrap().email.as_deref(),
        Some("a@x.test")
    );
}

#[tokio::test]
async fn revoked_account_is_refused_everywhere() {
    let (fake, run, c) = setup().await;
    let t = fake.add_account(AccountSpec::new("a@x.test"));
    fake.revoke("a@x.test");
    let (status, body) = get(&c, &run, USAGE, &t.access_token).await;
    assert_eq!((status, code(&body)), (401, "account_deactivated"));
    let (status, body) = get(&c, &run, MODELS, &t.access_token).await;
    assert_eq!((status, code(&body)), (401, "account_deactivated"));
    let (status, body) = refresh(&c, &run, &t.refresh_token).await;
    assert_eq!((status, code(&body)), (401, "refresh_token_invalidated"));
    // A new login does not lift the revocation.
    let again = fake.login("a@x.test");
    assert_eq!(get(&c, &run, USAGE, &again.access_token).await.0, 401);
}

#[tokio::test]
async fn scripted_replies_are_consumed_in_order_and_by_email() {
    let (fake, run, c) = setup().await;
    let a = fake.add_account(AccountSpec::new("a@x.test"));
    let b = fake.add_account(AccountSpec::new("b@x.test"));
    fake.push_reply(
        Endpoint::Usage,
        Some("b@x.test"),
        Reply::json(429, json!({})),
    );
    fake.push_reply(Endpoint::Usage, None, Reply::cloudflare_challenge());
    fake.push_reply(Endpoint::Usage, None, Reply::json(500, json!({"n": 2})));
    fake.push_reply(Endpoint::Refresh, None, Reply::json(502, json!({})));

    // a skips b's reply and takes the first one for anyone.
    let resp = c
        .get(format!("{}{USAGE}", run.base_url))
        .bearer_auth(&a.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["cf-mitigated"], "challenge");
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(get(&c, &run, USAGE, &b.access_token).await.0, 429);
    assert_eq!(
        get(&c, &run, USAGE, &b.access_token).await,
        (500, json!({"n": 2}))
    );
    assert_eq!(get(&c, &run, USAGE, &b.access_token).await.0, 200);

    // A scripted answer to a refresh leaves the refresh token alive.
    assert_eq!(refresh(&c, &run, &a.refresh_token).await.0, 502);
    assert_eq!(refresh(&c, &run, &a.refresh_token).await.0, 200);
    let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, [403, 429, 500, 200, 502, 200]);
    fake.clear_calls();
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn latency_and_delay_are_applied() {
    let (fake, run, c) = setup().await;
    let t = fake.add_account(AccountSpec::new("a@x.test"));
    fake.set_latency(Duration::from_millis(50));
    let start = Instant::now();
    assert_eq!(get(&c, &run, USAGE, &t.access_token).await.0, 200);
    assert!(start.elapsed() >= Duration::from_millis(50));

    fake.set_latency(Duration::ZERO);
    let delayed = Reply::Delay(
        Duration::from_millis(80),
        Box::new(Reply::json(503, json!({}))),
    );
    fake.push_reply(Endpoint::Usage, None, delayed);
    let start = Instant::now();
    assert_eq!(get(&c, &run, USAGE, &t.access_token).await.0, 503);
    assert!(start.elapsed() >= Duration::from_millis(80));
}

#[tokio::test]
async fn hang_drop_and_shutdown() {
    let (fake, run, c) = setup().await;
    let t = fake.add_account(AccountSpec::new("a@x.test"));
    let url = format!("{}{USAGE}", run.base_url);
    fake.push_reply(Endpoint::Usage, None, Reply::Hang);
    let err = c
        .get(&url)
        .bearer_auth(&t.access_token)
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    fake.push_reply(Endpoint::Usage, None, Reply::Drop);
    let err = c
        .get(&url)
        .bearer_auth(&t.access_token)
        .send()
        .await
        .unwrap_err();
    assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
    let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, [0, 0]);

    // A pooled keep-alive connection must not outlive the server either.
    assert_eq!(get(&c, &run, USAGE, &t.access_token).await.0, 200);
    fake.push_reply(Endpoint::Usage, None, Reply::Hang);
    let hung = tokio::spawn(c.get(&url).bearer_auth(&t.access_token).send());
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::timeout(Duration::from_secs(5), run.shutdown())
        .await
        .expect("shutdown is not held up by a hanging reply");
    assert!(hung.await.unwrap().is_err());
    assert!(c.get(&url).send().await.is_err());
}

#[tokio::test]
async fn tokens_have_the_claim_layout() {
    let fake = FakeUpstream::new();
    fake.set_now(Some(1_700_000_000));
    let spec = AccountSpec {
        plan_type: "pro".into(),
        ..AccountSpec::new("a@x.test")
    };
    let t = fake.add_account(spec);
    let header = t.access_token.split('.').next().unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
                .unwrap()
        )
        .unwrap(),
        json!({"alg": "RS256", "typ": "JWT"})
    );
    let at = jwt::decode_payload(&t.access_token).unwrap();
    assert_eq!(
        (at["iat"].as_i64(), at["exp"].as_i64()),
        (Some(1_700_000_000), Some(1_700_864_000))
    );
    assert_eq!(t.expires_at, 1_700_864_000);
    assert_eq!(at["iss"], ISSUER);
    assert_eq!(at["client_id"], CLIENT_ID);
    assert!(at["jti"].is_string());
    let auth = &at[AUTH_CLAIM];
    assert_eq!(auth["chatgpt_account_id"], t.account_id.as_str());
    assert_eq!(auth["chatgpt_plan_type"], "pro");
    assert!(auth["chatgpt_user_id"]
        .as_str()
        .unwrap()
        .starts_with("user-"));
    assert_eq!(
        at[PROFILE_CLAIM],
        json!({"email": "a@x.test", "email_verified": true})
    );

    let id = jwt::decode_payload(&t.id_token).unwrap();
    assert_eq!(id["email"], "a@x.test");
    assert_eq!(id["aud"], CLIENT_ID);
    assert_eq!(id["iss"], ISSUER);
    assert_eq!(&id[AUTH_CLAIM], auth);

    // Every token differs, even for the same account at the same instant; ids are stable.
    let again = fake.login("a@x.test");
    assert_ne!(again.access_token, t.access_token);
    assert_ne!(again.id_token, t.id_token);
    assert_ne!(again.refresh_token, t.refresh_token);
    assert_eq!(again.account_id, t.account_id);
    let other = FakeUpstream::new().add_account(AccountSpec::new("a@x.test"));
    assert_eq!(other.account_id, t.account_id);
    assert_ne!(other.refresh_token, t.refresh_token);

    // Debug never shows a whole token.
    let shown = format!("{t:?} {fake:?}");
    assert!(!shown.contains(&t.access_token) && !shown.contains(&t.refresh_token));
}

#[tokio::test]
async fn a_gate_holds_answers_until_opened_and_calls_can_be_awaited() {
    let (fake, run, c) = setup().await;
    let t = fake.add_account(AccountSpec::new("a@x.test"));
    let gate = fake.hold(Endpoint::Refresh);
    let (c2, run2, rt) = (c.clone(), run.base_url.clone(), t.refresh_token.clone());
    let held = tokio::spawn(async move {
        let body = json!({"client_id": CLIENT_ID, "grant_type": "refresh_token",
                          "refresh_token": rt});
        c2.post(format!("{run2}/oauth/token"))
            .json(&body)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert!(
        fake.wait_for_calls(Endpoint::Refresh, 1, Duration::from_secs(10))
            .await
    );
    // The call is recorded and the token already rotated, but no answer went out.
    assert_eq!(fake.count(Endpoint::Refresh), 1);
    assert!(!held.is_finished());
    assert!(
        !fake
            .wait_for_calls(Endpoint::Refresh, 2, Duration::from_millis(50))
            .await
    );
    // Other endpoints are not held.
    assert_eq!(get(&c, &run, USAGE, &t.access_token).await.0, 200);
    gate.open();
    assert_eq!(held.await.unwrap().unwrap(), 200);
    assert_eq!(refresh(&c, &run, &t.refresh_token).await.0, 401);
    fake.clear_calls();
    assert!(
        !fake
            .wait_for_calls(Endpoint::Refresh, 1, Duration::from_millis(10))
            .await
    );
}
