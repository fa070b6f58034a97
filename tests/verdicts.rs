//! SPEC.md section 5 "Verdicts", end to end: gibby and the fake upstream on 127.0.0.1, one
//! table row per upstream answer, each run through a real `GET /token`.
//!
//! A row is (endpoint, status, body shape, verdict). The account under test, A, is set up so
//! that the row's endpoint is the one asked about it: stale usage for the usage call, a due
//! token for the refresh call, neither for the validation call. The fake answers that one
//! call with the row's reply and everything else normally. Each row runs twice: beside a
//! healthy account B and an earlier failed.json (so the reselection is seen), and alone with
//! no failed.json (so the 503's reason and the creation of failed.json are seen).
//!
//! - invalid: A leaves accounts.json and is appended, whole, to failed.json.
//! - transient: A stays byte for byte. A failed usage call falls back to the stored usage and
//!   a failed refresh keeps the old tokens, so A is still served with its old token; a failed
//!   validation passes A over for this request.
//!
//! The last test is an upstream outage: 1,000 requests against an upstream that fails every
//! call leave both files byte for byte as they were.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use gibby::fake_upstream::{Endpoint, Reply};
use gibby::model::{Account, FailedFile};
use serde_json::{json, Value};

const A: &str = "a@example.com";
const B: &str = "b@example.com";
/// Already in failed.json before the request.
const OLD: &str = "old@example.com";
/// Upstream timeout for rows where the fake never answers (every other row keeps the
/// harness's 2 s, so a slow machine cannot turn a normal answer into a timeout).
const SHORT_TIMEOUT: Duration = Duration::from_millis(400);

use Body::*;
use Endpoint::{Models as Validation, Refresh, Usage};
use Verdict::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Verdict {
    Invalid,
    Transient,
}

/// The body shapes of SPEC.md section 5, and the answers that are no HTTP answer at all.
#[derive(Clone, Copy, Debug)]
enum Body {
    /// `{"error": {"message", "type", "param", "code"}}`: the auth server's and backend's envelope.
    Envelope(&'static str),
    /// `{"error": "<code>", "error_description": ...}`: plain OAuth.
    OAuth(&'static str),
    /// `{"detail": {"code": ...}}`.
    DetailCode(&'static str),
    /// `{"detail": "<message>"}`: a message, no code.
    DetailMessage,
    /// Any other JSON text, as `application/json`.
    Json(&'static str),
    /// No body and no content type.
    Empty,
    /// A plain-text body that is not JSON (a proxy's error line).
    Text,
    /// An HTML page from a proxy.
    Html,
    /// Cloudflare's browser check: HTML with `cf-mitigated: challenge`.
    Challenge,
    /// The fake never answers: the client times out.
    Timeout,
    /// The fake closes the connection without an answer.
    Dropped,
}

impl Body {
    fn reply(self, status: u16) -> Reply {
        let json = |body: Value| Reply::json(status, body);
        match self {
            Envelope(code) => json(
                json!({"error": {"message": "m", "type": "invalid_request_error",
                                                    "param": null, "code": code}}),
            ),
            OAuth(code) => json(json!({"error": code, "error_description": "d"})),
            DetailCode(code) => json(json!({"detail": {"code": code}})),
            DetailMessage => json(json!({"detail":
                "Could not parse your authentication token. Please try signing in again."})),
            Json(text) => Reply::Status {
                status,
                headers: vec![("content-type".into(), "application/json".into())],
                body: text.into(),
            },
            Empty => Reply::Status {
                status,
                headers: vec![],
                body: String::new(),
            },
            Text => Reply::Status {
                status,
                headers: vec![("content-type".into(), "text/plain".into())],
                body: "upstream connect error or disconnect/reset before headers".into(),
            },
            Html => Reply::html(
                status,
                "<html><head><title>Sign in</title></head><body>proxy</body></html>",
            ),
            Challenge => match Reply::cloudflare_challenge() {
                Reply::Status { headers, body, .. } => Reply::Status {
                    status,
                    headers,
                    body,
                },
                other => other,
            },
            Timeout => Reply::Hang,
            Dropped => Reply::Drop,
        }
    }

    /// The status the fake records for this reply (0: no HTTP answer).
    fn recorded_status(self, status: u16) -> u16 {
        match self {
            Timeout | Dropped => 0,
            _ => status,
        }
    }
}

/// One upstream answer and the verdict it must lead to. Status 0 is "no answer".
type Row = (Endpoint, u16, Body, Verdict);

/// The usage call for A's stale usage (A's token is not due).
const USAGE_ROWS: &[Row] = &[
    (Usage, 401, DetailMessage, Invalid),
    (Usage, 401, Envelope("account_deactivated"), Invalid),
    (Usage, 401, DetailCode("token_revoked"), Invalid),
    (Usage, 401, OAuth("token_invalidated"), Invalid),
    (Usage, 401, Empty, Invalid),
    (Usage, 402, DetailCode("deactivated_workspace"), Invalid),
    (Usage, 402, OAuth("account_deactivated"), Invalid),
    (
        Usage,
        403,
        DetailCode("invalid_workspace_selected"),
        Invalid,
    ),
    (Usage, 403, Envelope("token_revoked"), Invalid),
    (Usage, 402, Empty, Transient),
    (Usage, 402, DetailMessage, Transient),
    (Usage, 403, Json("{}"), Transient),
    (Usage, 404, Empty, Transient),
    (Usage, 404, DetailCode("account_deactivated"), Transient),
    (Usage, 408, Empty, Transient),
    (Usage, 429, Envelope("rate_limit_exceeded"), Transient),
    (Usage, 500, Envelope("account_deactivated"), Transient),
    (Usage, 502, Text, Transient),
    (Usage, 503, DetailMessage, Transient),
    (Usage, 401, Html, Transient),
    (Usage, 403, Challenge, Transient),
    (Usage, 200, Text, Transient),
    (Usage, 200, Html, Transient),
    (
        Usage,
        200,
        Json(r#"{"rate_limit": {"primary_window": {"used_percent": "lots"}}}"#),
        Transient,
    ),
    (Usage, 0, Timeout, Transient),
    (Usage, 0, Dropped, Transient),
];

/// The refresh of A's due token (A's usage is fresh).
const REFRESH_ROWS: &[Row] = &[
    (Refresh, 401, Envelope("refresh_token_reused"), Invalid),
    (Refresh, 400, Envelope("refresh_token_reused"), Invalid),
    (Refresh, 401, Envelope("refresh_token_invalidated"), Invalid),
    (Refresh, 401, Envelope("token_expired"), Invalid),
    (Refresh, 401, Envelope("refresh_token_expired"), Invalid),
    (Refresh, 400, OAuth("invalid_grant"), Invalid),
    (Refresh, 401, OAuth("invalid_grant"), Invalid),
    (Refresh, 400, DetailCode("invalid_grant"), Invalid),
    (Refresh, 401, DetailMessage, Transient),
    (Refresh, 401, Empty, Transient),
    (Refresh, 400, OAuth("invalid_request"), Transient),
    (Refresh, 403, OAuth("invalid_grant"), Transient),
    (Refresh, 404, Empty, Transient),
    (Refresh, 429, Envelope("rate_limit_exceeded"), Transient),
    (Refresh, 500, Envelope("token_expired"), Transient),
    (Refresh, 503, Text, Transient),
    (Refresh, 401, Html, Transient),
    (Refresh, 403, Challenge, Transient),
    (Refresh, 200, Text, Transient),
    (Refresh, 200, Json("{}"), Transient),
    (Refresh, 0, Timeout, Transient),
    (Refresh, 0, Dropped, Transient),
];

/// The validation of A's token (not due, usage fresh).
const VALIDATION_ROWS: &[Row] = &[
    (Validation, 401, DetailMessage, Invalid),
    (Validation, 401, Envelope("token_expired"), Invalid),
    (Validation, 401, Empty, Invalid),
    (Validation, 403, OAuth("token_invalidated"), Invalid),
    (
        Validation,
        402,
        DetailCode("deactivated_workspace"),
        Invalid,
    ),
    (
        Validation,
        403,
        DetailCode("invalid_workspace_selected"),
        Invalid,
    ),
    (
        Validation,
        400,
        Json(r#"{"detail": [{"type": "missing", "msg": "Field required"}]}"#),
        Transient,
    ),
    (Validation, 400, Envelope("account_deactivated"), Transient),
    (Validation, 402, Empty, Transient),
    (Validation, 403, DetailMessage, Transient),
    (
        Validation,
        404,
        Json(r#"{"detail": "Not Found"}"#),
        Transient,
    ),
    (Validation, 408, Empty, Transient),
    (Validation, 429, Envelope("rate_limit_exceeded"), Transient),
    (Validation, 500, DetailMessage, Transient),
    (Validation, 502, Html, Transient),
    (Validation, 401, Html, Transient),
    (Validation, 403, Challenge, Transient),
    (Validation, 200, Json("{}"), Transient),
    (Validation, 200, Json(r#"{"models": null}"#), Transient),
    (Validation, 200, Text, Transient),
    (Validation, 200, Html, Transient),
    (Validation, 0, Timeout, Transient),
    (Validation, 0, Dropped, Transient),
];

/// What A looks like before the request.
#[derive(Clone, Copy, Debug)]
struct Setup {
    /// `token_refresh_at` has passed.
    due: bool,
    /// `usage_checked_at` is older than the stale limit (the stored figures stay).
    stale: bool,
}

/// Where A ends up and what the request answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Moved whole to failed.json; B is served (or 503 when A was alone).
    Moved,
    /// Kept byte for byte and served with its old access token.
    Served,
    /// Kept byte for byte and passed over: B is served (or 503 when A was alone).
    PassedOver,
}

/// A scenario: A's setup, the replies scripted for A's calls (in order), the outcome.
#[derive(Debug)]
struct Case {
    name: String,
    setup: Setup,
    replies: Vec<(Endpoint, u16, Body)>,
    expect: Expect,
    timeout: Duration,
}

impl Case {
    fn from_row(&(endpoint, status, body, verdict): &Row) -> Case {
        let setup = Setup {
            due: endpoint == Refresh,
            stale: endpoint == Usage,
        };
        let expect = match (verdict, endpoint) {
            (Invalid, _) => Expect::Moved,
            (Transient, Validation) => Expect::PassedOver,
            (Transient, _) => Expect::Served,
        };
        Case {
            name: format!("{endpoint:?} {status} {body:?} -> {verdict:?}"),
            setup,
            replies: vec![(endpoint, status, body)],
            expect,
            timeout: timeout_for(&[body]),
        }
    }
}

fn timeout_for(bodies: &[Body]) -> Duration {
    if bodies.iter().any(|b| matches!(b, Timeout)) {
        SHORT_TIMEOUT
    } else {
        Duration::from_secs(2)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pool {
    /// accounts.json holds A (active) and a healthy B; failed.json holds an earlier failure.
    WithFallback,
    /// accounts.json holds A alone; there is no failed.json.
    Alone,
}

/// Runs the case on one pool and returns every way the result differs from the expectation.
async fn run(case: &Case, shape: Pool) -> Vec<String> {
    let h = Harness::start_with(|s| s.upstream_timeout = case.timeout).await;
    let mut a = h.account(A, 10, 20);
    if case.setup.due {
        a.token_refresh_at = Some(NOW - 1);
    }
    if case.setup.stale {
        a.usage_checked_at = Some(NOW - 7200);
    }
    let b = h.account(B, 30, 20);
    let old = h.account(OLD, 5, 5);
    let before = match shape {
        Pool::WithFallback => pool(Some(A), vec![a.clone(), b.clone()]),
        Pool::Alone => pool(Some(A), vec![a.clone()]),
    };
    let earlier = FailedFile {
        accounts: vec![old.clone()],
    };
    h.write_accounts(&before);
    if shape == Pool::WithFallback {
        h.write_text("failed.json", &earlier.to_text());
    }
    let accounts_before = h.read_text("accounts.json").unwrap();
    let failed_before = h.read_text("failed.json");
    for &(endpoint, status, body) in &case.replies {
        h.fake.push_reply(endpoint, Some(A), body.reply(status));
    }

    let answer = h.token().await;

    let mut problems = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    let served = answer.body["email"].as_str().map(str::to_owned);
    let reason_of_a = answer.body["accounts"]
        .as_array()
        .and_then(|list| list.iter().find(|p| p["email"] == A))
        .and_then(|p| p["reason"].as_str())
        .map(str::to_owned);
    let (accounts_after, failed_after) = (h.read_text("accounts.json"), h.read_text("failed.json"));

    // The answer.
    let fallback = shape == Pool::WithFallback;
    match (case.expect, fallback) {
        (Expect::Served, _) => {
            check(
                answer.status == 200 && served.as_deref() == Some(A),
                format!("expected 200 for {A}, got {} {:?}", answer.status, served),
            );
            check(
                answer.body["access_token"].as_str() == Some(a.access_token.expose()),
                "A was not served with its old access token".into(),
            );
        }
        (Expect::Moved | Expect::PassedOver, true) => check(
            answer.status == 200 && served.as_deref() == Some(B),
            format!("expected 200 for {B}, got {} {:?}", answer.status, served),
        ),
        (Expect::Moved | Expect::PassedOver, false) => {
            let prefix = match case.expect {
                Expect::Moved => "invalid (",
                _ => "upstream unavailable: ",
            };
            check(
                answer.status == 503 && answer.body["error"] == "no_usable_account",
                format!("expected 503 no_usable_account, got {}", answer.status),
            );
            check(
                reason_of_a
                    .as_deref()
                    .is_some_and(|r| r.starts_with(prefix)),
                format!("A's reason should start with {prefix:?}: {reason_of_a:?}"),
            );
        }
    }

    // Where A ended up, and the bytes of both files.
    let (accounts_expected, failed_expected) = match (case.expect, fallback) {
        (Expect::Moved, true) => (
            pool(Some(B), vec![b.clone()]).to_text(),
            Some(
                FailedFile {
                    accounts: vec![old, a.clone()],
                }
                .to_text(),
            ),
        ),
        (Expect::Moved, false) => (
            pool(None, vec![]).to_text(),
            Some(
                FailedFile {
                    accounts: vec![a.clone()],
                }
                .to_text(),
            ),
        ),
        (Expect::PassedOver, true) => (
            pool(Some(B), vec![a.clone(), b.clone()]).to_text(),
            failed_before.clone(),
        ),
        (Expect::Served | Expect::PassedOver, _) => {
            (accounts_before.clone(), failed_before.clone())
        }
    };
    if let Some(diff) = differs(
        "accounts.json",
        accounts_after.as_deref(),
        Some(&accounts_expected),
    ) {
        problems.push(diff);
    }
    if let Some(diff) = differs(
        "failed.json",
        failed_after.as_deref(),
        failed_expected.as_deref(),
    ) {
        problems.push(diff);
    }
    if case.expect != Expect::Moved {
        let a_text = account_text(&a);
        problems.extend(
            (!accounts_after.as_deref().unwrap_or("").contains(&a_text))
                .then(|| "A's object is no longer byte for byte in accounts.json".to_owned()),
        );
    }
    let stray: Vec<String> = h
        .files_in_dir()
        .into_iter()
        .filter(|n| !["accounts.json", "failed.json", ".gibby.lock"].contains(&n.as_str()))
        .collect();
    if !stray.is_empty() {
        problems.push(format!("stray files in the data dir: {stray:?}"));
    }

    // The scripted replies were all asked for, once each and in order, and no call for A
    // went to those endpoints besides them (no retry, no second refresh).
    let calls = h.fake.calls();
    for endpoint in [Usage, Refresh, Validation] {
        let scripted: Vec<u16> = case
            .replies
            .iter()
            .filter(|r| r.0 == endpoint)
            .map(|&(_, status, body)| body.recorded_status(status))
            .collect();
        if scripted.is_empty() {
            continue;
        }
        let seen: Vec<u16> = calls
            .iter()
            .filter(|c| c.endpoint == endpoint && c.email.as_deref() == Some(A))
            .map(|c| c.status)
            .collect();
        if seen != scripted {
            problems.push(format!(
                "{endpoint:?} calls for A answered {seen:?}, scripted {scripted:?}"
            ));
        }
    }
    if h.fake.reused_refresh_tokens() != 0 {
        problems.push("a spent refresh token was presented again".into());
    }
    for rt in [&a.refresh_token, &b.refresh_token] {
        if answer.text.contains(rt.expose()) {
            problems.push("the answer carries a refresh token".into());
        }
    }
    h.stop().await;
    problems
        .into_iter()
        .map(|p| format!("{} [{shape:?}]: {p}", case.name))
        .collect()
}

/// An account object as it stands in a file gibby wrote.
fn account_text(account: &Account) -> String {
    let text = serde_json::to_string_pretty(account).unwrap();
    let indented: Vec<String> = text.lines().map(|l| format!("    {l}")).collect();
    indented.join("\n")
}

/// A message when `actual` is not `expected`, with tokens scrubbed (never printed).
fn differs(name: &str, actual: Option<&str>, expected: Option<&str>) -> Option<String> {
    (actual != expected).then(|| {
        let show = |t: Option<&str>| t.map_or("(missing)".to_owned(), scrub);
        format!(
            "{name} is not as expected.\n--- expected\n{}\n--- actual\n{}",
            show(expected),
            show(actual)
        )
    })
}

async fn run_all(cases: Vec<Case>) {
    let mut problems = Vec::new();
    for case in &cases {
        for shape in [Pool::WithFallback, Pool::Alone] {
            problems.extend(run(case, shape).await);
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} runs differ:\n\n{}",
        problems.len(),
        cases.len() * 2,
        problems.join("\n\n")
    );
}

/// A token that was due when an answer came: SPEC.md section 5's "one refresh and one retry
/// first", and "a due token whose refresh failed only transiently and is then rejected is not
/// a verdict".
fn due_token_cases() -> Vec<Case> {
    let due_and_stale = Setup {
        due: true,
        stale: true,
    };
    let rejected = (Usage, 401, DetailMessage);
    let cases = [
        (
            "usage 401 for a due token, refresh rejected as invalid",
            due_and_stale,
            vec![
                rejected,
                (Refresh, 401, Envelope("refresh_token_invalidated")),
            ],
            Expect::Moved,
        ),
        (
            "usage 401 for a due token, refresh 500, usage 401 again, validation 401",
            due_and_stale,
            vec![
                rejected,
                (Refresh, 500, Empty),
                rejected,
                (Validation, 401, DetailMessage),
            ],
            Expect::PassedOver,
        ),
        (
            "usage 401 for a due token, refresh timed out, usage 401 again, validation 200",
            due_and_stale,
            vec![rejected, (Refresh, 0, Timeout), rejected],
            Expect::Served,
        ),
        // DESIGN.md: a coded 402/403 names the account, not the token's age: a verdict
        // for a due token too, without a refresh call.
        (
            "usage 403 invalid_workspace_selected for a due token",
            due_and_stale,
            vec![(Usage, 403, DetailCode("invalid_workspace_selected"))],
            Expect::Moved,
        ),
        (
            "usage 402 deactivated_workspace for a due token",
            due_and_stale,
            vec![(Usage, 402, DetailCode("deactivated_workspace"))],
            Expect::Moved,
        ),
        (
            "due token, refresh 503 HTML, validation 401 for the old token",
            Setup {
                due: true,
                stale: false,
            },
            vec![(Refresh, 503, Html), (Validation, 401, DetailMessage)],
            Expect::PassedOver,
        ),
    ];
    cases
        .into_iter()
        .map(|(name, setup, replies, expect)| Case {
            name: name.to_owned(),
            setup,
            timeout: timeout_for(&replies.iter().map(|r| r.2).collect::<Vec<_>>()),
            replies,
            expect,
        })
        .collect()
}

#[tokio::test]
async fn usage_answers() {
    run_all(USAGE_ROWS.iter().map(Case::from_row).collect()).await;
}

#[tokio::test]
async fn refresh_answers() {
    run_all(REFRESH_ROWS.iter().map(Case::from_row).collect()).await;
}

#[tokio::test]
async fn validation_answers() {
    run_all(VALIDATION_ROWS.iter().map(Case::from_row).collect()).await;
}

#[tokio::test]
async fn answers_for_a_due_token() {
    run_all(due_token_cases()).await;
}

/// SPEC.md section 5: "An upstream outage must never empty the pool." Every call fails
/// (5xx, bare 404, Cloudflare challenge, HTML login page, 429, timeouts, dropped
/// connections) for 1,000 requests against a pool where every kind of call is asked for:
/// stale usage with and without stored figures, due tokens, an unrefreshable token. Both
/// files stay byte for byte as they were, and once the outage ends the pool serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_1000_requests_leaves_both_files_byte_for_byte() {
    const REQUESTS: usize = 1000;
    const CONCURRENT: usize = 8;
    // Every call fails anyway, so a short timeout costs nothing but waiting.
    // Refreshes run under the lock, one at a time: each that times out holds up the rest.
    let h = Harness::start_with(|s| s.upstream_timeout = Duration::from_millis(25)).await;
    // A: active, token due. B: stale usage, figures stored. C: stale, nothing stored.
    // D: stale (a window's reset passed). E: fresh. F: disabled. G: empty refresh token
    // (never refreshed), stale usage and no token_refresh_at.
    let mut a = h.account(A, 10, 20);
    a.token_refresh_at = Some(NOW - 1);
    let mut b = h.account(B, 40, 20);
    b.usage_checked_at = Some(NOW - 7200);
    let mut c = h.account("c@example.com", 0, 0);
    (c.usage, c.usage_checked_at) = (None, None);
    let mut d = h.account("d@example.com", 50, 20);
    if let Some(w) = d.usage.as_mut().and_then(|u| u.primary.as_mut()) {
        w.reset_at = NOW - 5;
    }
    let e = h.account("e@example.com", 30, 20);
    let mut f = h.account("f@example.com", 0, 0);
    f.disabled = true;
    let mut g = h.account("g@example.com", 20, 20);
    g.refresh_token = gibby::model::Secret::new("");
    (g.usage_checked_at, g.token_refresh_at) = (Some(NOW - 7200), None);
    let everyone = vec![a, b, c, d, e, f, g];
    h.write_accounts(&pool(Some(A), everyone.clone()));
    let old = h.account(OLD, 5, 5);
    h.write_text(
        "failed.json",
        &FailedFile {
            accounts: vec![old],
        }
        .to_text(),
    );
    let accounts_before = h.read_text("accounts.json").unwrap();
    let failed_before = h.read_text("failed.json").unwrap();

    let slow = |reply: Reply| Reply::Delay(Duration::from_millis(300), Box::new(reply));
    h.fake.set_outage(vec![
        Body::Envelope("server_error").reply(500),
        Body::Empty.reply(404),
        Reply::cloudflare_challenge(),
        Body::Html.reply(502),
        Body::Json(r#"{"detail": "Not Found"}"#).reply(404),
        Body::Text.reply(503),
        Body::Html.reply(401),
        Body::Envelope("rate_limit_exceeded").reply(429),
        Reply::Drop,
        Body::Empty.reply(402),
        Body::DetailMessage.reply(403),
        Body::Empty.reply(504),
        Reply::Hang,
        Body::Empty.reply(408),
        Body::Envelope("server_error").reply(503),
        Body::Html.reply(500),
        Reply::cloudflare_challenge(),
        Body::Empty.reply(404),
        Body::Text.reply(502),
        Reply::Drop,
        Body::Envelope("rate_limit_exceeded").reply(429),
        Body::Empty.reply(503),
        // A good answer that comes too late is a timeout like any other.
        slow(Body::Json(r#"{"models": []}"#).reply(200)),
        Body::Empty.reply(500),
    ]);

    // CONCURRENT clients, each asking in turn until REQUESTS answers are in.
    let asked = std::sync::atomic::AtomicUsize::new(0);
    let client = || async {
        let mut answers = Vec::new();
        while asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < REQUESTS {
            let answer = h.token().await;
            answers.push((answer.status, answer.body));
        }
        answers
    };
    let answers: Vec<(u16, Value)> = join_all((0..CONCURRENT).map(|_| client()))
        .await
        .into_iter()
        .flatten()
        .collect();

    assert_eq!(answers.len(), REQUESTS);
    for (status, body) in &answers {
        assert_eq!(
            *status,
            503,
            "every request is refused: {}",
            scrub(&body.to_string())
        );
        assert_eq!(
            body["error"],
            "no_usable_account",
            "{}",
            scrub(&body.to_string())
        );
        let reasons = body["accounts"].as_array().expect("a list of reasons");
        assert_eq!(
            reasons.len(),
            everyone.len(),
            "{}",
            scrub(&body.to_string())
        );
        for reason in reasons.iter().map(|r| r["reason"].as_str().unwrap()) {
            assert!(
                !reason.contains("invalid") && !reason.contains("failed.json"),
                "{reason}"
            );
        }
    }
    assert_eq!(
        h.read_text("accounts.json").unwrap(),
        accounts_before,
        "accounts.json changed"
    );
    assert_eq!(
        h.read_text("failed.json").unwrap(),
        failed_before,
        "failed.json changed"
    );
    assert_eq!(
        h.files_in_dir(),
        [".gibby.lock", "accounts.json", "failed.json"],
        "no stray file"
    );
    // Every kind of call was tried, and every kind of failure served. The fake counts only
    // the calls that reached it: one that timed out before the fake's handler ran (a loaded
    // machine, a 25 ms timeout) is not counted, so the bounds leave room for those. Each
    // request asks for A's refresh and validation once and for four stale usages.
    for (endpoint, at_least) in [
        (Usage, REQUESTS),
        (Refresh, REQUESTS / 2),
        (Validation, REQUESTS),
    ] {
        let count = h.fake.count(endpoint);
        assert!(count >= at_least, "{endpoint:?}: only {count} calls");
    }
    let calls = h.fake.calls();
    let mut statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    statuses.sort_unstable();
    statuses.dedup();
    assert_eq!(
        statuses,
        [0, 200, 401, 402, 403, 404, 408, 429, 500, 502, 503, 504],
        "every outage reply was served (200: the late one)"
    );
    let refreshed: std::collections::BTreeSet<_> = calls
        .iter()
        .filter(|c| c.endpoint == Refresh)
        .filter_map(|c| c.email.clone())
        .collect();
    assert_eq!(refreshed, [A.to_owned()].into(), "only the due account");
    assert_eq!(h.fake.reused_refresh_tokens(), 0);

    // The upstream is back: the pool is whole and serves the active account.
    h.fake.set_outage(vec![]);
    let answer = h.token().await;
    assert_eq!(answer.status, 200, "{}", scrub(&answer.text));
    assert_eq!(answer.body["email"], A);
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Another writer's tokens, lined up with the fake's gates (no timers)
// ---------------------------------------------------------------------------------------------

/// How long a test waits for gibby to reach a call before it fails.
const SIGNAL: Duration = Duration::from_secs(30);

const REUSED: &str = "refresh_token_reused";

/// A with fresh usage and a due token, alone in the pool (the request's only candidate).
fn due_alone(h: &Harness) -> (Account, String) {
    let mut a = h.account(A, 10, 20);
    a.token_refresh_at = Some(NOW - 1);
    let file = pool(Some(A), vec![a.clone()]);
    h.write_accounts(&file);
    (a, file.to_text())
}

/// A helper's new login for A, as it would write it: `fresh` tokens are live and scheduled
/// a day before their end; otherwise the access token expired yesterday (the refresh token
/// still works) and `token_refresh_at` is null.
fn their_login(h: &Harness, a: &Account, fresh: bool) -> Account {
    let mut theirs = a.clone();
    if fresh {
        let t = h.fake.login(A);
        theirs.access_token = gibby::model::Secret::new(t.access_token);
        theirs.refresh_token = gibby::model::Secret::new(t.refresh_token);
        theirs.token_refresh_at = Some(t.expires_at - 86_400);
    } else {
        h.fake.set_now(Some(NOW - 11 * 86_400));
        let t = h.fake.login(A);
        h.fake.set_now(Some(NOW));
        assert!(t.expires_at < NOW);
        theirs.access_token = gibby::model::Secret::new(t.access_token);
        theirs.refresh_token = gibby::model::Secret::new(t.refresh_token);
        theirs.token_refresh_at = None;
    }
    theirs
}

fn reused_reply() -> Reply {
    Envelope(REUSED).reply(401)
}

/// One `/token` whose refresh of A is answered `refresh_token_reused`; while that call is
/// out (held by the fake), `landing` is stored as the pool, as another writer's login would.
async fn refresh_reused(h: &Harness, landing: Option<&Account>) -> reqwest::Response {
    h.fake.push_reply(Refresh, Some(A), reused_reply());
    let gate = h.fake.hold(Refresh);
    let request = tokio::spawn({
        let (client, url) = (h.client.clone(), h.url.clone());
        async move { client.get(format!("{url}/token")).send().await.unwrap() }
    });
    assert!(h.fake.wait_for_calls(Refresh, 1, SIGNAL).await);
    if let Some(theirs) = landing {
        h.write_accounts(&pool(Some(A), vec![theirs.clone()]));
    }
    gate.open();
    request.await.unwrap()
}

/// SPEC.md section 5: a refresh answered 401 `refresh_token_reused` is a verdict only when a
/// fresh read of accounts.json still shows the same refresh token. Here another writer
/// stores its own new login while gibby's refresh call is out: gibby uses theirs, serves
/// it, and moves nothing.
#[tokio::test]
async fn refresh_token_reused_after_another_writer_rotated_serves_their_tokens() {
    let h = Harness::start().await;
    let (a, _) = due_alone(&h);
    let theirs = their_login(&h, &a, true);
    let answer = refresh_reused(&h, Some(&theirs)).await;

    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["access_token"], theirs.access_token.expose());
    assert_eq!(h.read_text("failed.json"), None, "nothing was moved");
    assert_eq!(h.accounts(), pool(Some(A), vec![theirs]));
    let endpoints: Vec<Endpoint> = h.fake.calls().iter().map(|c| c.endpoint).collect();
    assert_eq!(endpoints, [Refresh, Validation]);
    h.stop().await;
}

/// The same answer with the refresh token unchanged in accounts.json: A is moved to
/// failed.json, whole, and nothing is left to serve.
#[tokio::test]
async fn refresh_token_reused_with_the_same_token_stored_moves_the_account() {
    let h = Harness::start().await;
    let (a, _) = due_alone(&h);
    let answer = refresh_reused(&h, None).await;

    assert_eq!(answer.status(), 503);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"], "no_usable_account");
    let failed = FailedFile::parse(&h.read_text("failed.json").unwrap()).unwrap();
    assert_eq!(failed.accounts, [a]);
    assert_eq!(h.accounts(), pool(None, vec![]));
    h.stop().await;
}

/// SPEC.md section 5, for adopted tokens: gibby's token is due, and while its usage call is
/// out a helper stores a new login whose access token has already expired, with
/// `token_refresh_at` null. Under the lock gibby finds those tokens instead of its own:
/// they are due, so they are refreshed (once) before validation, instead of a 401 for the
/// expired token moving a live account to failed.json.
#[tokio::test]
async fn adopted_due_tokens_are_refreshed_before_validation() {
    let h = Harness::start().await;
    let mut a = h.account(A, 10, 20);
    a.token_refresh_at = Some(NOW - 1);
    a.usage_checked_at = Some(NOW - 7200);
    h.write_accounts(&pool(Some(A), vec![a.clone()]));
    let theirs = their_login(&h, &a, false);
    let gate = h.fake.hold(Usage);

    let request = tokio::spawn({
        let (client, url) = (h.client.clone(), h.url.clone());
        async move { client.get(format!("{url}/token")).send().await.unwrap() }
    });
    assert!(h.fake.wait_for_calls(Usage, 1, SIGNAL).await);
    h.write_accounts(&pool(Some(A), vec![theirs.clone()]));
    gate.open();
    let answer = request.await.unwrap();

    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(h.read_text("failed.json"), None, "nothing was moved");
    let calls = h.fake.calls();
    let endpoints: Vec<Endpoint> = calls.iter().map(|c| c.endpoint).collect();
    assert_eq!(endpoints, [Usage, Refresh, Validation]);
    assert_eq!(
        calls[1].refresh_token.as_deref(),
        Some(theirs.refresh_token.expose()),
        "their refresh token, not ours"
    );
    let stored = &h.accounts().accounts[0];
    assert_eq!(body["access_token"], stored.access_token.expose());
    assert_ne!(stored.access_token, theirs.access_token);
    assert_ne!(stored.refresh_token, theirs.refresh_token);
    assert!(stored.token_refresh_at.is_some_and(|t| t > NOW));
    assert_eq!(h.fake.reused_refresh_tokens(), 0);
    h.stop().await;
}

/// When gibby's own refresh was already sent (and answered `refresh_token_reused`), an
/// adopted due token cannot be refreshed in the same request: it is validated as it is, and
/// the 401 for it is no verdict. A stays in accounts.json with the helper's tokens, and the
/// next request refreshes them.
#[tokio::test]
async fn a_due_token_adopted_after_our_refresh_is_not_moved_on_a_401() {
    let h = Harness::start().await;
    let (a, _) = due_alone(&h);
    let theirs = their_login(&h, &a, false);
    let answer = refresh_reused(&h, Some(&theirs)).await;

    assert_eq!(answer.status(), 503);
    assert_eq!(h.read_text("failed.json"), None, "nothing was moved");
    assert_eq!(h.accounts(), pool(Some(A), vec![theirs.clone()]));
    let endpoints: Vec<Endpoint> = h.fake.calls().iter().map(|c| c.endpoint).collect();
    assert_eq!(endpoints, [Refresh, Validation], "one refresh call");

    // The next request refreshes the helper's due token and serves the new one.
    let next = h.token().await;
    assert_eq!(next.status, 200, "{}", next.text);
    assert_eq!(h.fake.count(Refresh), 2);
    assert_eq!(
        h.fake.calls()[2].refresh_token.as_deref(),
        Some(theirs.refresh_token.expose())
    );
    assert_eq!(h.read_text("failed.json"), None);
    h.stop().await;
}
