//! End-to-end tests of gibby's HTTP API (SPEC.md sections 1 and 3 to 6): gibby and the fake
//! upstream each serve on a 127.0.0.1 socket, the data directory is a temporary folder, and
//! both run on the fixed clock `NOW`.

mod common;

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use gibby::fake_upstream::{self, Endpoint, Reply};
use gibby::model::{Account, FailedFile, Usage, Window};
use serde_json::{json, Value};

const A: &str = "a@example.com";
const B: &str = "b@example.com";
const C: &str = "c@example.com";
const D: &str = "d@example.com";

/// The default 5-hour threshold (`GIBBY_EXHAUSTED_USAGE_THRESHOLD`).
const THRESHOLD: i64 = 95;
/// The default `GIBBY_USAGE_STALE_SECONDS`.
const STALE: i64 = 3600;
/// What the fake's 5-hour and weekly windows report as `reset_at`.
const FAKE_FIVE_HOUR_RESET: i64 = NOW + 18_000;
const FAKE_WEEKLY_RESET: i64 = NOW + 604_800;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `GET /token`, checking what every answer must satisfy whatever its status: it carries
/// `Cache-Control: no-store` and no refresh token (neither the key nor any refresh token that
/// was in the files before or after, or that gibby presented to the fake).
async fn get_token(h: &Harness) -> Answer {
    let mut secrets = refresh_tokens_on_disk(h);
    let answer = h.token().await;
    secrets.extend(refresh_tokens_on_disk(h));
    secrets.extend(h.fake.calls().into_iter().filter_map(|c| c.refresh_token));
    let text = answer.body.to_string();
    assert!(
        !text.contains("refresh_token"),
        "a /token body mentions a refresh token: {}",
        scrub(&text)
    );
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        assert!(
            !text.contains(secret.as_str()),
            "a /token body carries a refresh token"
        );
    }
    assert_eq!(
        header(&answer, "cache-control").as_deref(),
        Some("no-store"),
        "every /token answer is no-store"
    );
    answer
}

/// `GET /token` that must answer 200 with `email`'s token: exactly the four keys, `account_id`
/// and `expires_at` read from the token's own claims. Returns the access token.
async fn expect_token(h: &Harness, email: &str) -> String {
    let answer = get_token(h).await;
    assert_eq!(
        answer.status,
        200,
        "expected a token for {email}, got {}",
        scrub(&answer.body.to_string())
    );
    let body = answer.body.as_object().expect("a JSON object");
    let keys: Vec<&str> = body.keys().map(String::as_str).collect();
    assert_eq!(keys, ["access_token", "account_id", "email", "expires_at"]);
    assert_eq!(body["email"], json!(email));
    let token = body["access_token"].as_str().expect("a string").to_owned();
    let claims = jwt_claims(&token);
    assert_eq!(
        body["account_id"],
        claims["https://api.openai.com/auth"]["chatgpt_account_id"]
    );
    assert_eq!(body["expires_at"], claims["exp"]);
    token
}

/// `GET /token` that must answer 503 `no_usable_account`; returns email → reason.
async fn expect_no_usable_account(h: &Harness) -> (Answer, BTreeMap<String, String>) {
    let answer = get_token(h).await;
    assert_eq!(answer.status, 503, "{}", scrub(&answer.body.to_string()));
    assert_eq!(answer.body["error"], "no_usable_account");
    let reasons = answer.body["accounts"]
        .as_array()
        .expect("an accounts array")
        .iter()
        .map(|p| {
            let email = p["email"].as_str().expect("email").to_owned();
            let reason = p["reason"].as_str().expect("reason").to_owned();
            (email, reason)
        })
        .collect();
    (answer, reasons)
}

fn header(answer: &Answer, name: &str) -> Option<String> {
    answer
        .headers
        .get(name)
        .map(|v| v.to_str().expect("ASCII header").to_owned())
}

/// The payload of a JWT-shaped token, decoded here rather than with gibby's own code.
fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

/// Every `refresh_token` value in accounts.json and failed.json, whether they parse or not.
fn refresh_tokens_on_disk(h: &Harness) -> Vec<String> {
    fn collect(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("refresh_token", Value::String(s)) => out.push(s.clone()),
                        _ => collect(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for name in ["accounts.json", "failed.json"] {
        if let Some(value) = h
            .read_text(name)
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        {
            collect(&value, &mut out);
        }
    }
    out
}

fn window(pct: impl Into<serde_json::Number>, reset_at: i64) -> Window {
    Window {
        used_percent: pct.into(),
        reset_at,
    }
}

/// The usage gibby must store after the fake reported `primary`/`secondary` percent.
fn fake_usage(primary: i64, secondary: i64) -> Usage {
    Usage {
        primary: Some(window(primary, FAKE_FIVE_HOUR_RESET)),
        secondary: Some(window(secondary, FAKE_WEEKLY_RESET)),
    }
}

fn disabled(mut account: Account) -> Account {
    account.disabled = true;
    account
}

fn failed_json(h: &Harness) -> FailedFile {
    FailedFile::parse(&h.read_text("failed.json").expect("failed.json exists")).unwrap()
}

fn models_calls(h: &Harness) -> Vec<fake_upstream::Call> {
    let calls = h.fake.calls().into_iter();
    calls.filter(|c| c.endpoint == Endpoint::Models).collect()
}

/// SPEC.md section 1 "How gibby writes": the data directory holds exactly `names` (besides
/// the lock file), each written by gibby with mode 0600 and a trailing newline, and no
/// temporary file was left behind.
fn assert_written_by_gibby(h: &Harness, names: &[&str]) {
    use std::os::unix::fs::PermissionsExt;
    let mut found: Vec<String> = std::fs::read_dir(h.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name != ".gibby.lock")
        .collect();
    found.sort();
    assert_eq!(found, names);
    for name in names {
        let mode = std::fs::metadata(h.dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
        let text = h.read_text(name).unwrap();
        assert!(text.ends_with("}\n") && !text.ends_with("\n\n"), "{name}");
    }
}

/// An account object as it stands inside either file: pretty-printed, indented by the two
/// levels of `{"accounts": [ ... ]}`.
fn object_text_in_file(account: &Account) -> String {
    let text = serde_json::to_string_pretty(account).unwrap();
    let indented: Vec<String> = text.lines().map(|l| format!("    {l}")).collect();
    indented.join("\n")
}

// ---------------------------------------------------------------------------------------------
// 1. /health
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn health_says_ok() {
    let h = Harness::start().await;
    let answer = h.get("/health").await;
    assert_eq!((answer.status, answer.body), (200, serde_json::json!("ok")));
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. 503 no_usable_account
// ---------------------------------------------------------------------------------------------

/// Disabled, weekly-exhausted and 5-hour-exhausted accounts are each listed with their reason;
/// no Retry-After, because the disabled account has no reset time.
#[tokio::test]
async fn no_usable_account_lists_every_reason_without_retry_after_when_one_never_resets() {
    let h = Harness::start().await;
    let file = pool(
        Some(A),
        vec![
            disabled(h.account(A, 10, 20)),
            h.account(B, 10, 100),
            h.account(C, 97, 20),
        ],
    );
    h.write_accounts(&file);
    let before = h.read_text("accounts.json");

    let (answer, reasons) = expect_no_usable_account(&h).await;

    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(reasons[A], "disabled");
    assert!(
        reasons[B].contains("weekly") && reasons[B].contains("100%"),
        "{}",
        reasons[B]
    );
    assert!(
        reasons[C].contains("5-hour") && reasons[C].contains("97%"),
        "{}",
        reasons[C]
    );
    assert_eq!(header(&answer, "retry-after"), None);
    assert_eq!(h.fake.calls().len(), 0, "fresh usage, no upstream call");
    assert_eq!(h.read_text("accounts.json"), before, "nothing to write");
    h.stop().await;
}

/// Every account exhausted with a known reset: Retry-After is the seconds until the
/// earliest one.
#[tokio::test]
async fn no_usable_account_retry_after_is_the_time_to_the_earliest_reset() {
    let h = Harness::start().await;
    let mut weekly = h.account(A, 10, 100);
    weekly.usage = Some(Usage {
        primary: Some(window(10, NOW + 900)),
        secondary: Some(window(100, NOW + 2000)),
    });
    let mut five_hour = h.account(B, 97, 20);
    five_hour.usage = Some(Usage {
        primary: Some(window(97, NOW + 1234)),
        secondary: Some(window(20, NOW + 500)),
    });
    h.write_accounts(&pool(None, vec![weekly, five_hour]));

    let (answer, reasons) = expect_no_usable_account(&h).await;

    assert_eq!(reasons.keys().collect::<Vec<_>>(), [A, B]);
    // A's 5-hour window (NOW + 900) and B's weekly window (NOW + 500) do not block them.
    assert_eq!(header(&answer, "retry-after").as_deref(), Some("1234"));
    h.stop().await;
}

/// Retry-After never asks a client to wait longer than an hour.
#[tokio::test]
async fn no_usable_account_retry_after_is_capped_at_an_hour() {
    let h = Harness::start().await;
    // h.account's windows reset at NOW + 10_000 (5-hour) and NOW + 500_000 (weekly).
    h.write_accounts(&pool(
        Some(A),
        vec![h.account(A, 10, 100), h.account(B, THRESHOLD, 20)],
    ));

    let (answer, reasons) = expect_no_usable_account(&h).await;

    assert_eq!(reasons.len(), 2);
    assert_eq!(header(&answer, "retry-after").as_deref(), Some("3600"));
    h.stop().await;
}

/// An empty pool has nothing to give: 503 with an empty list and no Retry-After.
#[tokio::test]
async fn empty_pool_answers_no_usable_account() {
    let h = Harness::start().await;
    h.write_accounts(&pool(None, vec![]));

    let (answer, reasons) = expect_no_usable_account(&h).await;

    assert!(reasons.is_empty());
    assert_eq!(answer.body["accounts"], json!([]));
    assert_eq!(header(&answer, "retry-after"), None);
    assert_eq!(h.fake.calls().len(), 0);
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. The active account first
// ---------------------------------------------------------------------------------------------

/// A usable active account is served even though another one is fuller, after exactly one
/// validation call for its token and no refresh.
#[tokio::test]
async fn usable_active_account_is_preferred_over_a_fuller_one() {
    let h = Harness::start().await;
    let a = h.account(A, 10, 20);
    h.write_accounts(&pool(Some(A), vec![h.account(B, 80, 20), a.clone()]));
    let before = h.read_text("accounts.json");

    let token = expect_token(&h, A).await;

    assert_eq!(token, a.access_token.expose());
    let models = models_calls(&h);
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].bearer.as_deref(), Some(a.access_token.expose()));
    assert_eq!(models[0].status, 200);
    assert_eq!(h.fake.count(Endpoint::Refresh), 0);
    assert_eq!(h.fake.count(Endpoint::Usage), 0);
    assert_eq!(h.read_text("accounts.json"), before);
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. No cache between requests
// ---------------------------------------------------------------------------------------------

/// A hand edit of `active_account` between two requests changes the second answer.
#[tokio::test]
async fn each_request_rereads_the_file_when_active_account_is_edited() {
    let h = Harness::start().await;
    let (a, b) = (h.account(A, 10, 20), h.account(B, 10, 20));
    h.write_accounts(&pool(Some(A), vec![a.clone(), b.clone()]));
    expect_token(&h, A).await;

    h.write_accounts(&pool(Some(B), vec![a, b]));
    expect_token(&h, B).await;

    assert_eq!(h.accounts().active_account.as_deref(), Some(B));
    h.stop().await;
}

/// Disabling the served account by hand between two requests moves the second one to
/// another account, which becomes active.
#[tokio::test]
async fn each_request_rereads_the_file_when_an_account_is_disabled() {
    let h = Harness::start().await;
    let (a, b) = (h.account(A, 10, 20), h.account(B, 10, 20));
    h.write_accounts(&pool(Some(A), vec![a.clone(), b.clone()]));
    expect_token(&h, A).await;

    h.write_accounts(&pool(Some(A), vec![disabled(a), b]));
    expect_token(&h, B).await;

    let after = h.accounts();
    assert_eq!(after.active_account.as_deref(), Some(B));
    assert!(after.find(A).unwrap().disabled, "the hand edit survives");
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Stale usage is refreshed before it is trusted
// ---------------------------------------------------------------------------------------------

/// Writes one active account A whose stored usage (10/20) is made stale by `make_stale`, while
/// the fake reports 42/7; one request must fetch usage once, serve A and persist the fake's
/// figures with `usage_checked_at == NOW`.
async fn stale_usage_is_refetched_and_persisted(make_stale: impl FnOnce(&mut Account)) {
    let h = Harness::start().await;
    let mut a = h.account(A, 42, 7);
    a.usage = Some(usage(10, 20));
    make_stale(&mut a);
    h.write_accounts(&pool(Some(A), vec![a.clone()]));

    expect_token(&h, A).await;

    assert_eq!(h.fake.count(Endpoint::Usage), 1);
    let stored = h.accounts().find(A).unwrap().clone();
    assert_eq!(stored.usage, Some(fake_usage(42, 7)));
    assert_eq!(stored.usage_checked_at, Some(NOW));
    let untouched = Account {
        usage: stored.usage.clone(),
        usage_checked_at: stored.usage_checked_at,
        ..a
    };
    assert_eq!(stored, untouched, "only the usage fields change");
    h.stop().await;
}

/// Usage checked more than GIBBY_USAGE_STALE_SECONDS ago is fetched again.
#[tokio::test]
async fn usage_older_than_the_stale_limit_is_refetched_and_persisted() {
    stale_usage_is_refetched_and_persisted(|a| a.usage_checked_at = Some(NOW - STALE - 1)).await;
}

/// Usage never checked (null) is fetched.
#[tokio::test]
async fn missing_usage_is_fetched_and_persisted() {
    stale_usage_is_refetched_and_persisted(|a| {
        a.usage = None;
        a.usage_checked_at = None;
    })
    .await;
}

/// A window whose reset time has passed no longer describes that window: fetched again.
#[tokio::test]
async fn usage_with_a_passed_reset_is_refetched_and_persisted() {
    stale_usage_is_refetched_and_persisted(|a| {
        a.usage = Some(Usage {
            primary: Some(window(10, NOW - 1)),
            secondary: Some(window(20, NOW + 500_000)),
        });
    })
    .await;
}

/// SPEC.md section 4: `usage_checked_at` in the future is stale; the refreshed usage is
/// "persisted with usage_checked_at = now".
#[tokio::test]
async fn usage_checked_in_the_future_is_refetched_and_persisted() {
    stale_usage_is_refetched_and_persisted(|a| a.usage_checked_at = Some(NOW + 600)).await;
}

/// The stored figures say the active account is usable, the fresh ones say its 5-hour
/// window is at 99%: gibby serves another account, makes it active and stores the 99.
#[tokio::test]
async fn refetched_usage_can_change_the_decision() {
    let h = Harness::start().await;
    let mut a = h.account(A, 99, 20);
    a.usage = Some(usage(10, 20));
    a.usage_checked_at = Some(NOW - STALE - 1);
    let b = h.account(B, 30, 20);
    h.write_accounts(&pool(Some(A), vec![a, b.clone()]));

    expect_token(&h, B).await;

    let usage_calls: Vec<_> = h
        .fake
        .calls()
        .into_iter()
        .filter(|c| c.endpoint == Endpoint::Usage)
        .collect();
    assert_eq!(usage_calls.len(), 1, "only A's usage was stale");
    assert_eq!(usage_calls[0].email.as_deref(), Some(A));
    assert_eq!(models_calls(&h).len(), 1, "A is not validated");
    let after = h.accounts();
    assert_eq!(after.active_account.as_deref(), Some(B));
    let stored = after.find(A).unwrap();
    assert_eq!(stored.usage, Some(fake_usage(99, 20)));
    assert_eq!(stored.usage_checked_at, Some(NOW));
    assert_eq!(after.find(B), Some(&b), "B's fresh usage is left as it was");
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Fresh usage is trusted
// ---------------------------------------------------------------------------------------------

/// Usage checked within the stale limit (including exactly at it) is not fetched again, and
/// a request that changes nothing leaves accounts.json byte-for-byte as it was.
#[tokio::test]
async fn fresh_usage_is_not_refetched_and_nothing_is_written() {
    let h = Harness::start().await;
    let mut a = h.account(A, 10, 20);
    a.usage_checked_at = Some(NOW - STALE);
    let mut b = h.account(B, 50, 20);
    b.usage_checked_at = Some(NOW);
    h.write_accounts(&pool(Some(A), vec![a, b]));
    let before = h.read_text("accounts.json").unwrap();

    expect_token(&h, A).await;
    expect_token(&h, A).await;

    assert_eq!(h.fake.count(Endpoint::Usage), 0);
    assert_eq!(h.read_text("accounts.json").unwrap(), before);
    assert_eq!(h.read_text("failed.json"), None);
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Invalid accounts move to failed.json
// ---------------------------------------------------------------------------------------------

/// The revoked active account leaves accounts.json and lands in a newly created failed.json
/// exactly as it stood (same text, same value); the request is served by another account.
#[tokio::test]
async fn revoked_active_account_moves_to_failed_json_byte_for_byte_and_another_is_served() {
    let h = Harness::start().await;
    // A float percentage and a plan without a 5-hour window: both must survive the move.
    let mut a = h.account(A, 10, 20);
    a.usage = Some(Usage {
        primary: None,
        secondary: Some(window(
            serde_json::Number::from_f64(94.99).unwrap(),
            NOW + 500_000,
        )),
    });
    let b = h.account(B, 30, 20);
    h.write_accounts(&pool(Some(A), vec![a.clone(), b.clone()]));
    let accounts_before = h.read_text("accounts.json").unwrap();
    assert_eq!(h.read_text("failed.json"), None);
    h.fake.revoke(A);

    expect_token(&h, B).await;

    let failed_text = h.read_text("failed.json").expect("failed.json is created");
    let object = object_text_in_file(&a);
    assert!(
        accounts_before.contains(&object),
        "the helper finds the object"
    );
    assert!(
        failed_text.contains(&object),
        "the object in failed.json is the text that was in accounts.json"
    );
    let failed = failed_json(&h);
    assert_eq!(failed.accounts, vec![a.clone()]);
    assert_eq!(
        serde_json::to_string_pretty(&failed.accounts[0]).unwrap(),
        serde_json::to_string_pretty(&a).unwrap()
    );
    let after = h.accounts();
    assert_eq!(after.accounts, vec![b]);
    assert_ne!(
        after.active_account.as_deref(),
        Some(A),
        "no longer names A"
    );
    let validated: Vec<_> = models_calls(&h).into_iter().map(|c| c.email).collect();
    assert_eq!(validated, [Some(A.to_owned()), Some(B.to_owned())]);
    h.stop().await;
}

/// A 401 from validation for a token not due for refresh is a verdict: the account is
/// appended to an existing failed.json, whose earlier entries stay, in order.
#[tokio::test]
async fn validation_401_appends_the_account_to_an_existing_failed_json() {
    let h = Harness::start().await;
    let old_one = h.account("old-one@example.com", 5, 5);
    let old_two = disabled(h.account("old-two@example.com", 50, 60));
    let earlier = FailedFile {
        accounts: vec![old_one.clone(), old_two.clone()],
    };
    h.write_text("failed.json", &earlier.to_text());
    // Fallback tries the fullest account first: C (60%), which the upstream refuses.
    let c = h.account(C, 60, 20);
    let b = h.account(B, 30, 20);
    h.write_accounts(&pool(None, vec![b.clone(), c.clone()]));
    h.fake.push_reply(
        Endpoint::Models,
        Some(C),
        Reply::json(
            401,
            json!({"detail": "Could not parse your authentication token. Please try signing in again."}),
        ),
    );

    expect_token(&h, B).await;

    let expected = FailedFile {
        accounts: vec![old_one, old_two, c],
    };
    assert_eq!(failed_json(&h), expected);
    assert_eq!(h.read_text("failed.json").unwrap(), expected.to_text());
    let after = h.accounts();
    assert_eq!(after.accounts, vec![b]);
    assert_eq!(after.active_account.as_deref(), Some(B));
    h.stop().await;
}

/// SPEC.md section 4 steps 5 and 7: after the active account was moved out (which clears
/// `active_account`), selection goes back to fallback, and the account it serves differs from
/// `active_account`, so its email is written there.
#[tokio::test]
async fn account_served_after_the_active_one_was_moved_becomes_active() {
    let h = Harness::start().await;
    h.write_accounts(&pool(
        Some(A),
        vec![h.account(A, 10, 20), h.account(B, 30, 20)],
    ));
    h.fake.revoke(A);

    expect_token(&h, B).await;

    assert_eq!(h.accounts().active_account.as_deref(), Some(B));
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Fallback
// ---------------------------------------------------------------------------------------------

/// Writes the pool, asks for a token and checks that `chosen` was served, validated alone,
/// and written into `active_account`.
async fn fallback_serves(h: &Harness, active: Option<&str>, accounts: Vec<Account>, chosen: &str) {
    h.write_accounts(&pool(active, accounts.clone()));

    expect_token(h, chosen).await;

    let validated: Vec<_> = models_calls(h).into_iter().map(|c| c.email).collect();
    assert_eq!(validated, [Some(chosen.to_owned())]);
    assert_eq!(h.fake.count(Endpoint::Usage), 0);
    assert_eq!(h.fake.count(Endpoint::Refresh), 0);
    let after = h.accounts();
    assert_eq!(after.active_account.as_deref(), Some(chosen));
    assert_eq!(after.accounts, accounts, "only active_account changes");
}

/// The active account is 5-hour exhausted: the fullest usable other account is served.
#[tokio::test]
async fn fallback_when_active_is_unusable_takes_the_fullest_usable_account() {
    let h = Harness::start().await;
    let accounts = vec![
        h.account(A, 97, 20),
        h.account(B, 30, 20),
        h.account(C, 60, 20),
        h.account(D, 40, 20),
    ];
    fallback_serves(&h, Some(A), accounts, C).await;
    h.stop().await;
}

/// No active account: the fullest usable account is served and becomes active.
#[tokio::test]
async fn fallback_with_no_active_account_takes_the_fullest_usable_account() {
    let h = Harness::start().await;
    let accounts = vec![h.account(A, 30, 20), h.account(B, 60, 90)];
    fallback_serves(&h, None, accounts, B).await;
    h.stop().await;
}

/// An `active_account` naming no account counts as none.
#[tokio::test]
async fn fallback_when_active_names_no_account() {
    let h = Harness::start().await;
    let accounts = vec![h.account(A, 30, 20), h.account(B, 60, 20)];
    fallback_serves(&h, Some("ghost@example.com"), accounts, B).await;
    h.stop().await;
}

/// A disabled account is never chosen, even with the highest usage.
#[tokio::test]
async fn fallback_skips_a_disabled_account_with_the_highest_usage() {
    let h = Harness::start().await;
    let accounts = vec![
        disabled(h.account(A, 90, 20)),
        h.account(B, 30, 20),
        h.account(C, 60, 20),
    ];
    fallback_serves(&h, None, accounts, C).await;
    h.stop().await;
}

/// Two accounts with the same primary usage: the earlier in the file wins.
#[tokio::test]
async fn fallback_tie_goes_to_the_earlier_account_in_the_file() {
    let h = Harness::start().await;
    let accounts = vec![
        h.account(A, 20, 20),
        h.account(C, 60, 20),
        h.account(B, 60, 20),
    ];
    fallback_serves(&h, None, accounts, C).await;
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Token refresh
// ---------------------------------------------------------------------------------------------

/// A's token is due (`token_refresh_at` set by `make_due`): the first request refreshes it
/// once, stores the new tokens with `token_refresh_at = exp - 24 h` and serves the new access
/// token; two more requests use it without refreshing, and no refresh token is used twice.
async fn due_token_is_refreshed_once(make_due: impl FnOnce(&mut Account)) {
    let h = Harness::start().await;
    let mut a = h.account(A, 10, 20);
    make_due(&mut a);
    h.write_accounts(&pool(Some(A), vec![a.clone(), h.account(B, 50, 20)]));

    let token = expect_token(&h, A).await;

    let stored = h.accounts().find(A).unwrap().clone();
    assert_ne!(
        token,
        a.access_token.expose(),
        "a new access token is served"
    );
    assert_eq!(stored.access_token.expose(), token, "and persisted");
    assert_ne!(
        stored.refresh_token, a.refresh_token,
        "the refresh token rotated"
    );
    assert!(!stored.refresh_token.is_empty());
    // The fake's tokens live 10 days from NOW; the safety margin is min(24 h, half of that).
    assert_eq!(jwt_claims(&token)["exp"], json!(NOW + 864_000));
    assert_eq!(stored.token_refresh_at, Some(NOW + 864_000 - 86_400));
    let refreshes: Vec<_> = h
        .fake
        .calls()
        .into_iter()
        .filter(|c| c.endpoint == Endpoint::Refresh)
        .collect();
    assert_eq!(refreshes.len(), 1);
    assert_eq!(
        refreshes[0].refresh_token.as_deref(),
        Some(a.refresh_token.expose())
    );
    assert_eq!(refreshes[0].status, 200);
    let validated: Vec<_> = models_calls(&h).into_iter().map(|c| c.bearer).collect();
    assert_eq!(
        validated,
        [Some(token.clone())],
        "the new token is validated"
    );

    assert_eq!(expect_token(&h, A).await, token);
    assert_eq!(expect_token(&h, A).await, token);

    assert_eq!(h.fake.reused_refresh_tokens(), 0);
    assert_eq!(h.fake.count(Endpoint::Refresh), 1);
    assert_eq!(h.accounts().find(A), Some(&stored));
    h.stop().await;
}

/// `token_refresh_at == NOW` is due (refresh is due when now >= token_refresh_at).
#[tokio::test]
async fn due_token_is_refreshed_once_and_persisted() {
    due_token_is_refreshed_once(|a| a.token_refresh_at = Some(NOW)).await;
}

/// A missing `token_refresh_at` means "refresh now".
#[tokio::test]
async fn missing_token_refresh_at_means_refresh_now() {
    due_token_is_refreshed_once(|a| a.token_refresh_at = None).await;
}

// ---------------------------------------------------------------------------------------------
// 10. Snapshots of what gibby writes and answers
// ---------------------------------------------------------------------------------------------

/// accounts.json after A's stale usage was refreshed (5-hour now at 99%) and B became active.
#[tokio::test]
async fn snapshot_accounts_json_after_usage_refresh_and_active_change() {
    let h = Harness::start().await;
    let mut a = h.account(A, 99, 20);
    a.usage_checked_at = Some(NOW - STALE - 1);
    h.write_accounts(&pool(Some(A), vec![a, h.account(B, 30, 40)]));

    expect_token(&h, B).await;

    assert_written_by_gibby(&h, &["accounts.json"]);
    let text = h.read_text("accounts.json").unwrap();
    snapshots(|| insta::assert_snapshot!("accounts_after_usage_refresh", scrub(&text)));
    h.stop().await;
}

/// failed.json after the revoked A was moved out of accounts.json.
#[tokio::test]
async fn snapshot_failed_json_after_a_move() {
    let h = Harness::start().await;
    h.write_accounts(&pool(
        Some(A),
        vec![h.account(A, 10, 20), h.account(B, 30, 40)],
    ));
    h.fake.revoke(A);

    expect_token(&h, B).await;

    assert_written_by_gibby(&h, &["accounts.json", "failed.json"]);
    let text = h.read_text("failed.json").unwrap();
    snapshots(|| insta::assert_snapshot!("failed_after_move", scrub(&text)));
    h.stop().await;
}

/// The 200 body of `/token`.
#[tokio::test]
async fn snapshot_token_body() {
    let h = Harness::start().await;
    h.write_accounts(&pool(Some(A), vec![h.account(A, 10, 20)]));

    let answer = get_token(&h).await;

    assert_eq!(answer.status, 200);
    let text = answer.text;
    snapshots(|| insta::assert_snapshot!("token_200", scrub(&text)));
    h.stop().await;
}

/// The 503 body when no account is usable.
#[tokio::test]
async fn snapshot_no_usable_account_body() {
    let h = Harness::start().await;
    h.write_accounts(&pool(
        Some(A),
        vec![
            disabled(h.account(A, 10, 20)),
            h.account(B, 10, 100),
            h.account(C, 97, 20),
        ],
    ));

    let answer = get_token(&h).await;

    assert_eq!(answer.status, 503);
    let text = answer.text;
    snapshots(|| insta::assert_snapshot!("no_usable_account_503", scrub(&text)));
    h.stop().await;
}

/// A broken accounts.json: 503 invalid_state_file naming the file and the position, no
/// upstream call, and the file is left byte-for-byte as it was.
#[tokio::test]
async fn snapshot_invalid_state_file_body_and_the_file_is_left_alone() {
    let h = Harness::start().await;
    let broken = "{\n  \"active_account\": null,\n  \"accounts\": [\n    {\"email\": \"a@example.com\",}\n  ]\n}\n";
    h.write_text("accounts.json", broken);

    let answer = get_token(&h).await;

    assert_eq!(answer.status, 503);
    assert_eq!(answer.body["error"], "invalid_state_file");
    let detail = answer.body["detail"].as_str().unwrap();
    assert!(detail.contains("accounts.json"), "{detail}");
    assert!(detail.contains("line 4"), "{detail}");
    assert_eq!(h.read_text("accounts.json").as_deref(), Some(broken));
    assert_eq!(h.read_text("failed.json"), None);
    assert_eq!(h.fake.calls().len(), 0);
    let text = answer.text;
    snapshots(|| insta::assert_snapshot!("invalid_state_file_503", scrub(&text)));
    h.stop().await;
}

/// An accounts.json that parses but breaks a rule (a duplicate email) is just as invalid:
/// the detail names the account index and email, and the file is not touched.
#[tokio::test]
async fn duplicate_email_is_an_invalid_state_file_naming_the_account() {
    let h = Harness::start().await;
    let a = h.account(A, 10, 20);
    h.write_accounts(&pool(Some(A), vec![a.clone(), a]));
    let before = h.read_text("accounts.json");

    let answer = get_token(&h).await;

    assert_eq!(answer.status, 503);
    assert_eq!(answer.body["error"], "invalid_state_file");
    let detail = answer.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("accounts[1]") && detail.contains(A),
        "{detail}"
    );
    assert_eq!(h.read_text("accounts.json"), before);
    assert_eq!(h.fake.calls().len(), 0);
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Shared validations
// ---------------------------------------------------------------------------------------------

/// Requests that arrive while a validation of the same token is in flight take its answer
/// instead of sending their own; a request after it has answered sends a new one.
#[tokio::test]
async fn concurrent_requests_share_a_validation_in_flight() {
    let h = Harness::start().await;
    let a = h.account(A, 10, 20);
    h.write_accounts(&pool(Some(A), vec![a.clone()]));
    let before = h.read_text("accounts.json");
    // Long enough that all requests arrive while the first validation is still out.
    h.fake.set_latency(std::time::Duration::from_millis(1500));

    let answers = futures_util::future::join_all((0..16).map(|_| h.token())).await;

    for answer in &answers {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body["access_token"], a.access_token.expose());
    }
    let shared = models_calls(&h).len();
    assert!(
        (1..16).contains(&shared),
        "16 concurrent requests sent {shared} validations"
    );
    assert_eq!(h.read_text("accounts.json"), before, "nothing to write");

    h.fake.set_latency(std::time::Duration::ZERO);
    assert_eq!(h.token().await.status, 200);
    assert_eq!(
        models_calls(&h).len(),
        shared + 1,
        "a finished validation is not reused"
    );
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Import

/// A Codex login whose access token has already expired (the refresh token still works)
/// is due at once after `gibby import`: the first `/token` refreshes it and serves the new
/// token, instead of sending the expired one and taking the 401 for a dead account.
#[tokio::test]
async fn an_imported_login_with_an_expired_access_token_is_refreshed_not_moved() {
    let h = Harness::start().await;
    h.fake.set_now(Some(NOW - 11 * 86_400));
    let old = h
        .fake
        .add_account(gibby::fake_upstream::AccountSpec::new("old@example.com"));
    h.fake.set_now(Some(NOW));
    assert!(
        old.expires_at < NOW,
        "the imported access token has expired"
    );
    let auth = json!({
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": null,
        "tokens": {"id_token": old.id_token, "access_token": old.access_token,
                   "refresh_token": old.refresh_token, "account_id": old.account_id},
        "last_refresh": "2026-11-20T00:00:00Z"
    });
    let imported = gibby::cmd::import::parse_auth(&auth.to_string(), "auth.json", NOW).unwrap();
    let store = gibby::io::Store::new(h.dir.path());
    gibby::cmd::import::run(&store, &imported).await.unwrap();

    let answer = h.token().await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["email"], "old@example.com");
    assert_ne!(answer.body["access_token"], old.access_token.as_str());
    assert_eq!(h.fake.count(Endpoint::Refresh), 1);
    assert_eq!(h.read_text("failed.json"), None, "nothing was moved");
    let stored = h.accounts();
    assert_eq!(
        stored.accounts[0].access_token.expose(),
        answer.body["access_token"]
    );
}

// ---------------------------------------------------------------------------------------------
// What gibby sends upstream (SPEC.md section 5)
// ---------------------------------------------------------------------------------------------

/// Every call carries `Accept: application/json` and a `User-Agent` naming gibby and its
/// version; usage and validation carry `Authorization: Bearer <access token>` and the
/// account id from the token's claims; validation asks with `client_version` set to
/// `GIBBY_CODEX_CLIENT_VERSION`; the refresh is a JSON body with the Codex client id, the
/// grant, the refresh token and the scope, and no `Authorization` header.
#[tokio::test]
async fn upstream_calls_carry_the_documented_headers_and_bodies() {
    let h = Harness::start_with(|s| s.codex_client_version = "9.8.7".into()).await;
    let mut a = h.account(A, 10, 20);
    a.usage_checked_at = Some(NOW - STALE - 1);
    a.token_refresh_at = Some(NOW - 1);
    let account_id = jwt_claims(a.access_token.expose())[fake_upstream::AUTH_CLAIM]
        ["chatgpt_account_id"]
        .as_str()
        .unwrap()
        .to_owned();
    h.write_accounts(&pool(Some(A), vec![a.clone()]));

    let answer = get_token(&h).await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    let calls = h.fake.calls();
    let kinds: Vec<Endpoint> = calls.iter().map(|c| c.endpoint).collect();
    assert_eq!(
        kinds,
        [Endpoint::Usage, Endpoint::Refresh, Endpoint::Models]
    );
    let user_agent = format!("gibby/{}", env!("CARGO_PKG_VERSION"));
    for call in &calls {
        assert_eq!(call.accept.as_deref(), Some("application/json"), "{call:?}");
        assert_eq!(
            call.user_agent.as_deref(),
            Some(user_agent.as_str()),
            "{call:?}"
        );
    }
    let (usage, refresh, models) = (&calls[0], &calls[1], &calls[2]);
    let new_token = answer.body["access_token"].as_str().unwrap();
    for (call, token) in [(usage, a.access_token.expose()), (models, new_token)] {
        assert_eq!(call.authorization_scheme.as_deref(), Some("Bearer"));
        assert_eq!(call.bearer.as_deref(), Some(token));
        assert_eq!(
            call.account_id_header.as_deref(),
            Some(account_id.as_str()),
            "{call:?}"
        );
    }
    assert_eq!(usage.query, None);
    assert_eq!(models.query.as_deref(), Some("client_version=9.8.7"));
    assert_eq!(
        refresh.authorization_scheme, None,
        "the refresh carries no bearer"
    );
    assert_eq!(refresh.account_id_header, None);
    assert_eq!(refresh.content_type.as_deref(), Some("application/json"));
    assert_eq!(refresh.client_id.as_deref(), Some(fake_upstream::CLIENT_ID));
    assert_eq!(
        refresh.client_id.as_deref(),
        Some("app_EMoamEEZ73f0CkXaXp7hrann")
    );
    assert_eq!(refresh.grant_type.as_deref(), Some("refresh_token"));
    assert_eq!(
        refresh.refresh_token.as_deref(),
        Some(a.refresh_token.expose())
    );
    assert_eq!(refresh.scope.as_deref(), Some("openid profile email"));
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Lean and odd upstream bodies are served, never a 500
// ---------------------------------------------------------------------------------------------

/// A refresh 200 with nothing but an opaque (non-JWT) access token: no `refresh_token`
/// (the stored one is kept), no `expires_in` (8 days assumed), no `id_token`. The token is
/// served with `account_id` and `expires_at` null, validated without `ChatGPT-Account-Id`,
/// and accounts.json holds it.
#[tokio::test]
async fn a_lean_refresh_answer_with_an_opaque_token_is_served_and_stored() {
    let h = Harness::start().await;
    let mut a = h.account(A, 10, 20);
    a.token_refresh_at = Some(NOW - 1);
    h.write_accounts(&pool(Some(A), vec![a.clone()]));
    h.fake.push_reply(
        Endpoint::Refresh,
        Some(A),
        Reply::json(200, json!({"access_token": "opaque-access-token"})),
    );
    // The fake does not know the opaque token: its validation is scripted.
    h.fake.push_reply(
        Endpoint::Models,
        None,
        Reply::json(200, json!({"models": []})),
    );

    let answer = get_token(&h).await;

    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        answer.body,
        json!({"email": A, "access_token": "opaque-access-token", "account_id": null,
               "expires_at": null})
    );
    let models = models_calls(&h);
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].bearer.as_deref(), Some("opaque-access-token"));
    assert_eq!(
        models[0].account_id_header, None,
        "no claims, no account id"
    );
    let mut expected = a.clone();
    expected.access_token = gibby::model::Secret::new("opaque-access-token");
    expected.token_refresh_at = Some(NOW + 7 * 86_400);
    assert_eq!(h.accounts(), pool(Some(A), vec![expected]));
    assert_written_by_gibby(&h, &["accounts.json"]);
    h.stop().await;
}

/// Usage bodies as real plans send them: `rate_limit: null`, no windows at all, a weekly
/// window alone in the primary slot with a float percentage and no `reset_at`, float
/// percentages in both slots. Each is served and persisted as SPEC.md section 5 reads it.
#[tokio::test]
async fn odd_usage_bodies_are_served_and_persisted() {
    let w = |pct: Value, len: i64, after: i64| json!({"used_percent": pct, "limit_window_seconds": len, "reset_after_seconds": after});
    let cases = [
        (json!({"plan_type": "free", "rate_limit": null}), None, None),
        (json!({"rate_limit": {}}), None, None),
        (json!({}), None, None),
        (
            json!({"rate_limit": {"primary_window": null, "secondary_window": null}}),
            None,
            None,
        ),
        (
            json!({"rate_limit": {"primary_window": w(json!(12.5), 604_800, 1000),
                                  "secondary_window": null}}),
            None,
            Some(window(
                serde_json::Number::from_f64(12.5).unwrap(),
                NOW + 1000,
            )),
        ),
        (
            json!({"rate_limit": {"primary_window": w(json!(40.25), 18_000, 60),
                                  "secondary_window": w(json!(99.0), 604_800, 600)},
                   "credits": null, "additional_rate_limits": null}),
            Some(window(
                serde_json::Number::from_f64(40.25).unwrap(),
                NOW + 60,
            )),
            Some(window(
                serde_json::Number::from_f64(99.0).unwrap(),
                NOW + 600,
            )),
        ),
    ];
    for (body, primary, secondary) in cases {
        let h = Harness::start().await;
        let mut a = h.account(A, 10, 20);
        a.usage_checked_at = Some(NOW - STALE - 1);
        h.write_accounts(&pool(Some(A), vec![a.clone()]));
        h.fake
            .push_reply(Endpoint::Usage, Some(A), Reply::json(200, body.clone()));

        let answer = get_token(&h).await;

        assert_eq!(answer.status, 200, "{body}: {}", answer.text);
        let mut expected = a.clone();
        expected.usage = Some(Usage { primary, secondary });
        expected.usage_checked_at = Some(NOW);
        assert_eq!(h.accounts(), pool(Some(A), vec![expected]), "{body}");
        h.stop().await;
    }
}
