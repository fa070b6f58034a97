//! Property tests: the request machine driven by a simulated world — random pools, random
//! clocks, a random but consistent upstream — and SPEC.md's invariants checked against the
//! simulation's own record of what happened.
//!
//! The simulation judges every upstream answer itself (it decides to answer "success",
//! "invalid" or "transient" before it renders the reply), and the checks use reference
//! functions written here, not the core's own `verdict`, `select` or `stage` code.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{json, Number, Value};

use super::*;
use crate::model::{Account, AccountsFile, FailedFile, Secret, Usage, Window};
use crate::settings::Policy;

/// Failures are saved in `proptest-regressions/core/properties.txt` and replayed first.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 192,
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated world
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Usage,
    Refresh,
    Validate,
}

/// How the simulated upstream answers one call, decided before the reply is rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Ok,
    /// The n-th reply of [`invalid_reply`] for the call.
    Invalid(usize),
    /// The n-th reply of [`transient_reply`].
    Transient(usize),
}

/// A 200 usage body: a 5-hour and a weekly window, either of them absent.
#[derive(Clone, Debug)]
struct UsageBody {
    short: Option<Number>,
    weekly: Option<Number>,
    /// The weekly window sent in the primary slot (and the 5-hour one in the secondary).
    swapped: bool,
    /// `rate_limit: null`: no limits reported.
    no_limits: bool,
}

#[derive(Clone, Debug)]
struct RefreshBody {
    /// A new refresh token comes back (else the old one is kept).
    rotates: bool,
    expires_in: Option<i64>,
}

/// What the upstream says about one account, for its original token (0) and for the one a
/// refresh issues (1). Consistent: the same question always gets the same answer.
#[derive(Clone, Debug)]
struct Behaviour {
    usage: [Fate; 2],
    usage_body: [UsageBody; 2],
    refresh: Fate,
    refresh_body: RefreshBody,
    validate: [Fate; 2],
}

#[derive(Clone, Debug)]
struct Case {
    now: i64,
    policy: Policy,
    /// The pool as gibby reads it; `accounts_text` is the file itself.
    accounts: AccountsFile,
    /// accounts.json as written by hand: canonical, except that some accounts lack some of
    /// the optional keys (`disabled`, `usage`, `usage_checked_at`, `token_refresh_at`)
    /// altogether; `accounts` then holds null (false) for them, as absent reads.
    accounts_text: String,
    failed: FileRead,
    /// By account index: `u{i}@example.com` has tokens `at-{i}-{gen}` and `rt-{i}-{gen}`.
    behaviour: Vec<Behaviour>,
}

/// One upstream call the core made.
#[derive(Clone, Debug)]
struct Call {
    kind: Kind,
    email: String,
    token: String,
    /// 0: the token from the file; 1: one a refresh issued in this request.
    generation: usize,
    fate: Fate,
}

struct Run {
    outcome: Outcome,
    calls: Vec<Call>,
    /// Every write that was done: the file and its new text.
    writes: Vec<(StateFile, String)>,
    accounts_after: AccountsFile,
    failed_after: FileRead,
    /// Broken rules seen while the request ran (lock discipline, writes).
    problems: Vec<String>,
}

fn email(i: usize) -> String {
    format!("u{i}@example.com")
}

/// `at-3-0` → (3, 0).
fn token_parts(token: &str, prefix: &str) -> Option<(usize, usize)> {
    let rest = token.strip_prefix(prefix)?;
    let (i, g) = rest.split_once('-')?;
    Some((i.parse().ok()?, g.parse().ok()?))
}

fn http(status: u16, body: impl Into<String>) -> Reply {
    Reply::Http(HttpReply::json(status, body))
}

fn html(status: u16, challenge: bool) -> Reply {
    Reply::Http(HttpReply {
        status,
        content_type: Some("text/html; charset=utf-8".into()),
        challenge,
        body: "<!DOCTYPE html><html><body>Just a moment...</body></html>".into(),
    })
}

fn envelope(code: &str) -> String {
    json!({"error": {"message": "m", "type": "invalid_request_error", "param": null, "code": code}})
        .to_string()
}

fn oauth(code: &str) -> String {
    json!({"error": code, "error_description": "d"}).to_string()
}

fn detail(code: &str) -> String {
    json!({"detail": {"code": code}}).to_string()
}

/// Every "the account is dead" answer SPEC.md and UPSTREAM.md list, per call.
fn invalid_replies(kind: Kind) -> Vec<Reply> {
    match kind {
        Kind::Refresh => vec![
            http(401, envelope("refresh_token_reused")),
            http(400, envelope("refresh_token_reused")),
            http(401, envelope("refresh_token_invalidated")),
            http(401, envelope("token_expired")),
            http(401, envelope("refresh_token_expired")),
            http(400, oauth("invalid_grant")),
            http(401, oauth("refresh_token_expired")),
        ],
        Kind::Usage | Kind::Validate => vec![
            http(
                401,
                r#"{"detail": "Could not parse your authentication token. Please try signing in again."}"#,
            ),
            http(401, envelope("account_deactivated")),
            http(401, detail("account_deactivated")),
            http(401, envelope("token_invalidated")),
            http(401, envelope("token_revoked")),
            http(401, envelope("app_session_terminated")),
            http(401, "not json"),
            http(402, detail("deactivated_workspace")),
            http(403, detail("invalid_workspace_selected")),
            http(403, envelope("token_revoked")),
            http(402, oauth("account_deactivated")),
        ],
    }
}

/// The call was answered with a 402/403 that carries a dead account or workspace code.
fn account_gone(c: &Call) -> bool {
    let Fate::Invalid(n) = c.fate else {
        return false;
    };
    let all = invalid_replies(c.kind);
    matches!(&all[n % all.len()], Reply::Http(h) if h.status != 401)
}

/// Answers that are never a verdict: outages, throttling, challenges, bare codes, bodies
/// that do not parse.
fn transient_replies(kind: Kind) -> Vec<Reply> {
    let mut replies = vec![
        Reply::Transport("timed out".into()),
        Reply::Transport("connection refused".into()),
        http(500, ""),
        http(502, envelope("token_expired")),
        http(
            503,
            r#"{"detail": "Could not parse your authentication token."}"#,
        ),
        http(408, ""),
        http(429, envelope("rate_limit_exceeded")),
        http(402, "{}"),
        http(403, ""),
        http(404, detail("account_deactivated")),
        html(403, true),
        html(401, false),
        html(200, false),
    ];
    match kind {
        Kind::Usage => replies.extend([http(200, "{"), http(200, r#"{"rate_limit": 3}"#)]),
        Kind::Refresh => replies.extend([
            http(200, "{}"),
            http(200, r#"{"access_token": ""}"#),
            http(403, oauth("invalid_grant")),
            http(400, oauth("invalid_request")),
        ]),
        Kind::Validate => replies.extend([
            http(200, r#"{"models": null}"#),
            http(400, r#"{"detail": [{"msg": "Field required"}]}"#),
        ]),
    }
    replies
}

const FIVE_HOURS: i64 = 18_000;
const WEEK: i64 = 604_800;
/// The weekly window's `reset_at` in a usage answer, relative to now.
const WEEKLY_RESET_IN: i64 = 300_000;

fn usage_reply(body: &UsageBody) -> Reply {
    if body.no_limits {
        return http(200, r#"{"plan_type": "free", "rate_limit": null}"#);
    }
    // The 5-hour window gives only `reset_after_seconds`, the weekly one `reset_at`.
    let short = body.short.as_ref().map(|p| {
        json!({"used_percent": p, "limit_window_seconds": FIVE_HOURS, "reset_after_seconds": FIVE_HOURS})
    });
    let weekly = body.weekly.as_ref().map(|p| {
        json!({"used_percent": p, "limit_window_seconds": WEEK, "reset_after_seconds": 1, "reset_at": "later"})
    });
    let (first, second) = if body.swapped {
        (weekly, short)
    } else {
        (short, weekly)
    };
    let text = json!({
        "plan_type": "plus",
        "rate_limit": {"allowed": true, "primary_window": first, "secondary_window": second},
        "credits": {"has_credits": false},
    })
    .to_string();
    Reply::Http(HttpReply::json(200, text))
}

/// The sim renders `reset_at` only when it knows `now`.
fn with_now(reply: Reply, now: i64) -> Reply {
    match reply {
        Reply::Http(mut h) => {
            h.body = h
                .body
                .replace("\"later\"", &(now + WEEKLY_RESET_IN).to_string());
            Reply::Http(h)
        }
        other => other,
    }
}

/// The usage a 200 body stands for, worked out here rather than with `core::wire`.
fn expected_usage(body: &UsageBody, now: i64) -> Usage {
    if body.no_limits {
        return Usage::default();
    }
    Usage {
        primary: body.short.clone().map(|p| Window {
            used_percent: p,
            reset_at: now + FIVE_HOURS,
        }),
        secondary: body.weekly.clone().map(|p| Window {
            used_percent: p,
            reset_at: now + WEEKLY_RESET_IN,
        }),
    }
}

struct Sim<'a> {
    case: &'a Case,
    accounts: FileRead,
    failed: FileRead,
    locked: bool,
    /// Refresh tokens already spent (a second use would be `refresh_token_reused`).
    spent: BTreeSet<String>,
    calls: Vec<Call>,
    writes: Vec<(StateFile, String)>,
    problems: Vec<String>,
}

impl<'a> Sim<'a> {
    fn new(case: &'a Case) -> Self {
        Sim {
            case,
            accounts: FileRead::Text(case.accounts_text.as_str().into()),
            failed: case.failed.clone(),
            locked: false,
            spent: BTreeSet::new(),
            calls: Vec::new(),
            writes: Vec::new(),
            problems: Vec::new(),
        }
    }

    fn call(&mut self, kind: Kind, email: &str, token: &Secret) -> Reply {
        let token = token.expose().to_owned();
        let prefix = if kind == Kind::Refresh { "rt-" } else { "at-" };
        let Some((i, generation)) = token_parts(&token, prefix) else {
            self.problems
                .push(format!("{kind:?} for {email} with a token nobody issued"));
            return Reply::Transport("unknown token".into());
        };
        if email != self::email(i) {
            self.problems.push(format!(
                "{kind:?} for {email} with {}'s token",
                self::email(i)
            ));
        }
        let b = &self.case.behaviour[i];
        let g = generation.min(1);
        let mut fate = match kind {
            Kind::Usage => b.usage[g],
            Kind::Validate => b.validate[g],
            // A refresh token issued in this request is never due again in it.
            Kind::Refresh if g == 1 => Fate::Transient(0),
            Kind::Refresh => b.refresh,
        };
        if kind == Kind::Refresh && !self.spent.insert(token.clone()) {
            fate = Fate::Invalid(0); // refresh_token_reused
        }
        self.calls.push(Call {
            kind,
            email: email.to_owned(),
            token: token.clone(),
            generation,
            fate,
        });
        let now = self.case.now;
        match (kind, fate) {
            (Kind::Usage, Fate::Ok) => with_now(usage_reply(&b.usage_body[g]), now),
            (Kind::Validate, Fate::Ok) => http(200, r#"{"models": [{"slug": "gpt-5-codex"}]}"#),
            (Kind::Refresh, Fate::Ok) => {
                let mut body = json!({"access_token": format!("at-{i}-1"), "id_token": "id", "token_type": "Bearer"});
                if b.refresh_body.rotates {
                    body["refresh_token"] = json!(format!("rt-{i}-1"));
                }
                if let Some(e) = b.refresh_body.expires_in {
                    body["expires_in"] = json!(e);
                }
                http(200, body.to_string())
            }
            (kind, Fate::Invalid(n)) => {
                let all = invalid_replies(kind);
                all[n % all.len()].clone()
            }
            (kind, Fate::Transient(n)) => {
                let all = transient_replies(kind);
                all[n % all.len()].clone()
            }
        }
    }

    fn write(&mut self, file: StateFile, content: &FileText, expected: &FileRead) -> WriteResult {
        if !self.locked {
            self.problems
                .push(format!("{} written without the lock", file.name()));
        }
        if let Err(why) = schema_problem(file, &content.0) {
            self.problems
                .push(format!("{} written off schema: {why}", file.name()));
        }
        // A move appends exactly the object accounts.json holds now.
        if file == StateFile::Failed {
            let before = parse_failed(&self.failed).unwrap_or_default();
            let now_holds = parse_accounts(&self.accounts);
            match FailedFile::parse(&content.0) {
                Ok(after) if after.accounts.starts_with(&before.accounts) => {
                    for added in &after.accounts[before.accounts.len()..] {
                        if !now_holds.accounts.contains(added) {
                            self.problems.push(format!(
                                "failed.json gained {} as accounts.json does not hold it",
                                added.email
                            ));
                        }
                    }
                }
                _ => self
                    .problems
                    .push("failed.json lost or reordered records".into()),
            }
        }
        let slot = match file {
            StateFile::Accounts => &mut self.accounts,
            StateFile::Failed => &mut self.failed,
        };
        if slot != expected {
            // Nobody else writes in the simulation.
            self.problems
                .push(format!("{} write expected other content", file.name()));
            return WriteResult::Conflict;
        }
        *slot = FileRead::Text(content.0.as_str().into());
        self.writes.push((file, content.0.clone()));
        WriteResult::Done
    }

    fn run(mut self) -> Run {
        let mut request = TokenRequest::new(self.case.now, self.case.policy);
        let mut steps = 0;
        while let Some(effect) = request.poll_effect() {
            steps += 1;
            assert!(steps < 10_000, "the request does not end");
            let event = match effect {
                Effect::ReadFiles => Event::FilesRead {
                    accounts: self.accounts.clone(),
                    failed: self.failed.clone(),
                },
                Effect::Lock => {
                    if self.locked {
                        self.problems.push("lock taken twice".into());
                    }
                    self.locked = true;
                    Event::Locked
                }
                Effect::Unlock => {
                    if !self.locked {
                        self.problems.push("unlock without lock".into());
                    }
                    self.locked = false;
                    Event::Unlocked
                }
                Effect::Write {
                    file,
                    content,
                    expected,
                } => Event::Written {
                    file,
                    result: self.write(file, &content, &expected),
                },
                Effect::FetchUsage {
                    email,
                    access_token,
                    ..
                } => Event::UsageFetched {
                    reply: self.call(Kind::Usage, &email, &access_token),
                    email,
                    access_token,
                },
                Effect::RefreshToken {
                    email,
                    refresh_token,
                } => Event::TokenRefreshed {
                    reply: self.call(Kind::Refresh, &email, &refresh_token),
                    email,
                    refresh_token,
                },
                Effect::Validate {
                    email,
                    access_token,
                    ..
                } => Event::ValidationAnswered {
                    reply: self.call(Kind::Validate, &email, &access_token),
                    email,
                    access_token,
                },
            };
            request.handle(event);
        }
        if self.locked {
            self.problems.push("the lock was left held".into());
        }
        let outcome = request
            .into_outcome()
            .expect("an outcome once the effects run out");
        Run {
            outcome,
            calls: self.calls,
            writes: self.writes,
            accounts_after: parse_accounts(&self.accounts),
            failed_after: self.failed,
            problems: self.problems,
        }
    }
}

fn parse_accounts(read: &FileRead) -> AccountsFile {
    match read {
        FileRead::Text(t) => AccountsFile::parse(t).expect("accounts.json stays valid"),
        other => panic!("accounts.json is {other:?}"),
    }
}

fn parse_failed(read: &FileRead) -> Option<FailedFile> {
    match read {
        FileRead::Missing => Some(FailedFile::default()),
        FileRead::Text(t) => FailedFile::parse(t).ok(),
        FileRead::Unreadable(_) => None,
    }
}

/// SPEC.md section 1, checked on the raw JSON rather than with the model's parser.
fn schema_problem(file: StateFile, text: &str) -> Result<(), String> {
    if !text.ends_with("}\n") || !text.starts_with("{\n  \"") {
        return Err("not pretty-printed with a trailing newline".into());
    }
    let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let top = value.as_object().ok_or("top level is not an object")?;
    let keys: BTreeSet<&str> = top.keys().map(String::as_str).collect();
    let wanted: BTreeSet<&str> = match file {
        StateFile::Accounts => ["active_account", "accounts"].into(),
        StateFile::Failed => ["accounts"].into(),
    };
    if keys != wanted {
        return Err(format!("top-level keys {keys:?}"));
    }
    if file == StateFile::Accounts
        && !matches!(top["active_account"], Value::Null | Value::String(_))
    {
        return Err("active_account is neither a string nor null".into());
    }
    let accounts = top["accounts"]
        .as_array()
        .ok_or("accounts is not an array")?;
    let mut emails = BTreeSet::new();
    for a in accounts {
        let a = a.as_object().ok_or("an account is not an object")?;
        let keys: Vec<&str> = a.keys().map(String::as_str).collect();
        let mut seven = vec![
            "access_token",
            "disabled",
            "email",
            "refresh_token",
            "token_refresh_at",
            "usage",
            "usage_checked_at",
        ];
        seven.sort_unstable();
        if keys != seven {
            return Err(format!("account keys {keys:?}"));
        }
        let email = a["email"]
            .as_str()
            .filter(|e| !e.is_empty())
            .ok_or("email")?;
        if file == StateFile::Accounts && !emails.insert(email.to_owned()) {
            return Err(format!("duplicate email {email}"));
        }
        let string = |k: &str| a[k].is_string();
        let int_or_null = |k: &str| a[k].is_null() || a[k].is_i64();
        if !(string("access_token") && string("refresh_token") && a["disabled"].is_boolean()) {
            return Err(format!("{email}: token or disabled type"));
        }
        if !(int_or_null("token_refresh_at") && int_or_null("usage_checked_at")) {
            return Err(format!("{email}: a time is not an integer"));
        }
        match &a["usage"] {
            Value::Null => {}
            Value::Object(u) => {
                let keys: Vec<&str> = u.keys().map(String::as_str).collect();
                if keys != ["primary", "secondary"] {
                    return Err(format!("{email}: usage keys {keys:?}"));
                }
                for w in u.values().filter(|w| !w.is_null()) {
                    let ok = w.as_object().is_some_and(|w| {
                        w.len() == 2
                            && w.get("used_percent")
                                .and_then(Value::as_f64)
                                .is_some_and(|p| p >= 0.0)
                            && w.get("reset_at").is_some_and(Value::is_i64)
                    });
                    if !ok {
                        return Err(format!("{email}: a usage window {w}"));
                    }
                }
            }
            other => return Err(format!("{email}: usage {other}")),
        }
    }
    // And gibby's own parser takes it back, writing the very same text.
    match file {
        StateFile::Accounts => {
            let parsed = AccountsFile::parse(text).map_err(|e| e.to_string())?;
            (parsed.to_text() == text)
                .then_some(())
                .ok_or("not canonical")?;
        }
        StateFile::Failed => {
            let parsed = FailedFile::parse(text).map_err(|e| e.to_string())?;
            (parsed.to_text() == text)
                .then_some(())
                .ok_or("not canonical")?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn percent() -> impl Strategy<Value = Number> {
    prop_oneof![
        4 => (0u64..=100).prop_map(Number::from),
        2 => prop::sample::select(vec![0u64, 1, 50, 94, 95, 96, 99, 100]).prop_map(Number::from),
        1 => (0u32..=10_000).prop_map(|h| Number::from_f64(f64::from(h) / 100.0).unwrap()),
    ]
}

/// A time relative to now: near it, on either side, or far away.
fn offset() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        -100i64..100,
        -10_000i64..10_000,
        -2_000_000i64..2_000_000,
    ]
}

fn stored_window(now: i64) -> impl Strategy<Value = Window> {
    (
        percent(),
        prop_oneof![3 => 1i64..600_000, 1 => -5_000i64..=0],
    )
        .prop_map(move |(p, reset)| Window {
            used_percent: p,
            reset_at: now + reset,
        })
}

fn account(i: usize, now: i64, stale: i64) -> impl Strategy<Value = Account> {
    let usage = prop::option::weighted(
        0.8,
        (
            prop::option::weighted(0.8, stored_window(now)),
            prop::option::weighted(0.8, stored_window(now)),
        )
            .prop_map(|(primary, secondary)| Usage { primary, secondary }),
    );
    let checked = prop_oneof![
        1 => Just(None),
        3 => (0..=stale).prop_map(move |age| Some(now - age)),
        1 => prop::sample::select(vec![stale, stale + 1, 1, -1, -60]).prop_map(move |age| Some(now - age)),
        2 => offset().prop_map(move |o| Some(now + o)),
    ];
    (
        prop::bool::weighted(0.1),
        prop::option::weighted(0.85, offset()),
        usage,
        checked,
        prop::bool::weighted(0.2),
    )
        .prop_map(
            move |(no_rt, refresh_at, usage, checked, disabled)| Account {
                email: email(i),
                access_token: Secret::new(format!("at-{i}-0")),
                refresh_token: Secret::new(if no_rt {
                    String::new()
                } else {
                    format!("rt-{i}-0")
                }),
                token_refresh_at: refresh_at.map(|o| now + o),
                usage,
                usage_checked_at: checked,
                disabled,
            },
        )
}

fn fate(invalid_weight: u32, transient_weight: u32) -> impl Strategy<Value = Fate> {
    prop_oneof![
        6 => Just(Fate::Ok),
        invalid_weight => (0usize..32).prop_map(Fate::Invalid),
        transient_weight => (0usize..32).prop_map(Fate::Transient),
    ]
}

fn usage_body() -> impl Strategy<Value = UsageBody> {
    (
        prop::option::weighted(0.8, percent()),
        prop::option::weighted(0.9, percent()),
        any::<bool>(),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(short, weekly, swapped, no_limits)| UsageBody {
            short,
            weekly,
            swapped,
            no_limits,
        })
}

fn behaviour() -> impl Strategy<Value = Behaviour> {
    (
        [fate(2, 2), fate(1, 2)],
        [usage_body(), usage_body()],
        fate(2, 2),
        (
            any::<bool>(),
            prop::option::of(prop_oneof![0i64..120, 3_600i64..2_000_000]),
        ),
        [fate(2, 2), fate(1, 2)],
    )
        .prop_map(
            |(usage, usage_body, refresh, (rotates, expires_in), validate)| Behaviour {
                usage,
                usage_body,
                refresh,
                refresh_body: RefreshBody {
                    rotates,
                    expires_in,
                },
                validate,
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    let policy = (
        prop::sample::select(vec![95.0, 50.5, 100.0, 1.0]),
        prop::sample::select(vec![3_600i64, 0, 60, 86_400]),
    )
        .prop_map(|(exhausted_threshold, usage_stale_seconds)| Policy {
            exhausted_threshold,
            usage_stale_seconds,
        });
    (1_000_000_000i64..3_000_000_000, policy, 0usize..=30)
        .prop_flat_map(|(now, policy, n)| {
            let accounts: Vec<_> = (0..n)
                .map(|i| account(i, now, policy.usage_stale_seconds))
                .collect();
            let behaviour = prop::collection::vec(behaviour(), n);
            // Which optional keys each account's JSON leaves out (a bit per key of
            // OPTIONAL_KEYS); most accounts have them all.
            let absent = prop::collection::vec(prop_oneof![3 => Just(0u8), 1 => 1u8..16], n);
            (Just(now), Just(policy), accounts, behaviour, absent)
        })
        .prop_map(|(now, policy, mut accounts, behaviour, absent)| {
            for (account, bits) in accounts.iter_mut().zip(&absent) {
                leave_out(account, *bits);
            }
            (now, policy, accounts, behaviour, absent)
        })
        .prop_flat_map(|(now, policy, accounts, behaviour, absent)| {
            let n = accounts.len();
            let mut actives: Vec<Option<String>> = (0..n).map(|i| Some(email(i))).collect();
            actives.push(None);
            actives.push(Some("nobody@example.com".into()));
            (
                Just((now, policy, accounts, behaviour, absent)),
                prop::sample::select(actives),
                0u8..10,
                0usize..n.max(1),
            )
        })
        .prop_map(
            |((now, policy, accounts, behaviour, absent), active, failed_kind, pick)| {
                let old = |email: &str| Account {
                    email: email.into(),
                    access_token: Secret::new("at-old"),
                    refresh_token: Secret::new("rt-old"),
                    token_refresh_at: None,
                    usage: None,
                    usage_checked_at: None,
                    disabled: false,
                };
                let failed = match failed_kind {
                    0..=4 => FileRead::Missing,
                    5 | 6 => FileRead::Text(
                        FailedFile {
                            accounts: vec![old("gone@example.com"), old(&email(pick))],
                        }
                        .to_text()
                        .into(),
                    ),
                    // A move to failed.json that a crash interrupted.
                    7 | 8 if !accounts.is_empty() => FileRead::Text(
                        FailedFile {
                            accounts: vec![old("gone@example.com"), accounts[pick].clone()],
                        }
                        .to_text()
                        .into(),
                    ),
                    7 | 8 => FileRead::Text("{\"accounts\": []}\n".into()),
                    _ => FileRead::Text("{not json".into()),
                };
                let accounts = AccountsFile {
                    active_account: active,
                    accounts,
                };
                Case {
                    now,
                    policy,
                    accounts_text: render_leaving_out(&accounts, &absent),
                    accounts,
                    failed,
                    behaviour,
                }
            },
        )
}

#[test]
fn generated_pools_sometimes_lack_each_optional_key() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut lacking = [false; 4];
    for _ in 0..100 {
        let case = case().new_tree(&mut runner).unwrap().current();
        let json: Value = serde_json::from_str(&case.accounts_text).unwrap();
        for account in json["accounts"].as_array().unwrap() {
            for (i, key) in OPTIONAL_KEYS.iter().enumerate() {
                lacking[i] |= account.get(*key).is_none();
            }
        }
    }
    assert_eq!(lacking, [true; 4], "absent keys for {OPTIONAL_KEYS:?}");
}

/// The keys of an account that may be absent from the file (absent reads as null, or
/// false for `disabled`).
const OPTIONAL_KEYS: [&str; 4] = ["disabled", "usage", "usage_checked_at", "token_refresh_at"];

/// The account as it reads when the keys of `bits` are absent from its JSON.
fn leave_out(account: &mut Account, bits: u8) {
    for (bit, key) in OPTIONAL_KEYS.iter().enumerate() {
        if bits & (1 << bit) != 0 {
            match *key {
                "disabled" => account.disabled = false,
                "usage" => account.usage = None,
                "usage_checked_at" => account.usage_checked_at = None,
                _ => account.token_refresh_at = None,
            }
        }
    }
}

/// The canonical text of `file`, with the keys of `absent[i]` removed from account i.
fn render_leaving_out(file: &AccountsFile, absent: &[u8]) -> String {
    let mut json = serde_json::to_value(file).expect("a pool serialises");
    let accounts = json["accounts"].as_array_mut().expect("an array");
    for (account, bits) in accounts.iter_mut().zip(absent) {
        let object = account.as_object_mut().expect("an object");
        for (bit, key) in OPTIONAL_KEYS.iter().enumerate() {
            if bits & (1 << bit) != 0 {
                object.remove(*key);
            }
        }
    }
    let text = serde_json::to_string_pretty(&json).expect("JSON serialises") + "\n";
    debug_assert_eq!(AccountsFile::parse(&text).as_ref(), Ok(file));
    text
}

// ---------------------------------------------------------------------------------------------
// Reference functions: what SPEC.md says, written out plainly
// ---------------------------------------------------------------------------------------------

/// SPEC.md 5: refresh is due when `now >= token_refresh_at` (a missing one means now),
/// and an empty refresh token cannot be refreshed.
fn due(a: &Account, now: i64) -> bool {
    !a.refresh_token.expose().is_empty()
        && match a.token_refresh_at {
            None => true,
            Some(at) => now >= at,
        }
}

/// SPEC.md 4.4, with the two seconds of clock slack of `stage::CLOCK_SLACK_SECONDS`.
fn fresh(a: &Account, case: &Case) -> bool {
    let (Some(usage), Some(checked)) = (&a.usage, a.usage_checked_at) else {
        return false;
    };
    let now = case.now;
    let windows_current = [&usage.primary, &usage.secondary]
        .into_iter()
        .flatten()
        .all(|w| w.reset_at > now);
    checked <= now + 2 && now - checked <= case.policy.usage_stale_seconds && windows_current
}

fn pct(w: &Option<Window>) -> f64 {
    w.as_ref()
        .map_or(0.0, |w| w.used_percent.as_f64().expect("a number"))
}

/// SPEC.md 4.3: under both limits (a missing window does not limit).
fn under_limits(usage: &Usage, policy: &Policy) -> bool {
    let weekly_ok = usage.secondary.is_none() || pct(&usage.secondary) < 100.0;
    let five_hour_ok = usage.primary.is_none() || pct(&usage.primary) < policy.exhausted_threshold;
    weekly_ok && five_hour_ok
}

/// What the decision about an account could rest on.
#[derive(Clone, Debug, PartialEq)]
enum Basis {
    /// Fresh stored usage, usage fetched in this request, or (after a transient usage
    /// failure, as DESIGN.md documents) the stale stored figures.
    Known(Usage),
    /// Stale, not fetched: nothing may be decided on it.
    Unknown,
    /// The fetch failed and nothing was stored.
    Unavailable,
}

fn start_account<'c>(case: &'c Case, email: &str) -> &'c Account {
    case.accounts
        .accounts
        .iter()
        .find(|a| a.email == email)
        .expect("an account of the pool")
}

fn index_of(email: &str) -> usize {
    email
        .strip_prefix('u')
        .and_then(|r| r.strip_suffix("@example.com"))
        .and_then(|i| i.parse().ok())
        .expect("u{i}@example.com")
}

fn basis(case: &Case, run: &Run, email: &str) -> Basis {
    let a = start_account(case, email);
    let last_usage = run
        .calls
        .iter()
        .rev()
        .find(|c| c.kind == Kind::Usage && c.email == email);
    match last_usage {
        Some(c) if c.fate == Fate::Ok => {
            let body = &case.behaviour[index_of(email)].usage_body[c.generation.min(1)];
            Basis::Known(expected_usage(body, case.now))
        }
        Some(_) => match &a.usage {
            Some(u) => Basis::Known(u.clone()),
            None => Basis::Unavailable,
        },
        None if fresh(a, case) => Basis::Known(a.usage.clone().expect("fresh usage exists")),
        None => Basis::Unknown,
    }
}

/// SPEC.md 4.3 and 4.5: the active account when usable; else the usable one with the highest
/// primary figure, the earliest in the file on a tie. `Err` when the rule needs an account
/// whose usage the request never learnt.
fn reference_pick(
    case: &Case,
    run: &Run,
    out: &BTreeSet<String>,
) -> Result<Option<String>, String> {
    let usable = |a: &Account| -> Result<Option<f64>, String> {
        if a.disabled {
            return Ok(None);
        }
        match basis(case, run, &a.email) {
            Basis::Known(u) if under_limits(&u, &case.policy) => Ok(Some(pct(&u.primary))),
            Basis::Known(_) | Basis::Unavailable => Ok(None),
            Basis::Unknown => Err(format!("{} judged without its usage", a.email)),
        }
    };
    let running: Vec<&Account> = case
        .accounts
        .accounts
        .iter()
        .filter(|a| !out.contains(&a.email))
        .collect();
    let active = case.accounts.active_account.as_deref();
    if let Some(a) = running.iter().find(|a| Some(a.email.as_str()) == active) {
        if usable(a)?.is_some() {
            return Ok(Some(a.email.clone()));
        }
    }
    let mut best: Option<(&str, f64)> = None;
    for a in running {
        if let Some(p) = usable(a)? {
            if best.is_none() || p > best.expect("some").1 {
                best = Some((&a.email, p));
            }
        }
    }
    Ok(best.map(|(e, _)| e.to_owned()))
}

/// The accounts the request picked, in order: each pick made a refresh call (not followed
/// by a usage retry) or a validation call, or both (refresh, then validate).
fn picks(run: &Run) -> Vec<String> {
    let mut picks = Vec::new();
    let mut refreshed_for_pick: BTreeSet<&str> = BTreeSet::new();
    for (i, c) in run.calls.iter().enumerate() {
        match c.kind {
            Kind::Usage => {}
            Kind::Refresh => {
                // The documented retry: usage rejected the due token (its first usage call).
                let mut earlier = run.calls[..i].iter().filter(|p| p.email == c.email);
                let first = earlier.next();
                let retry = first
                    .is_some_and(|p| p.kind == Kind::Usage && matches!(p.fate, Fate::Invalid(_)))
                    && earlier.next().is_none();
                if !retry {
                    picks.push(c.email.clone());
                    refreshed_for_pick.insert(&c.email);
                }
            }
            Kind::Validate => {
                if !refreshed_for_pick.remove(c.email.as_str()) {
                    picks.push(c.email.clone());
                }
            }
        }
    }
    picks
}

/// Accounts of the starting accounts.json that stand identically in failed.json.
fn interrupted(case: &Case) -> Vec<String> {
    match parse_failed(&case.failed) {
        Some(f) => case
            .accounts
            .accounts
            .iter()
            .filter(|a| f.accounts.contains(a))
            .map(|a| a.email.clone())
            .collect(),
        None => Vec::new(),
    }
}

/// The records failed.json gained in this request.
fn appended(case: &Case, run: &Run) -> Vec<Account> {
    let before = parse_failed(&case.failed)
        .map(|f| f.accounts.len())
        .unwrap_or(0);
    match parse_failed(&run.failed_after) {
        Some(f) if f.accounts.len() >= before => f.accounts[before..].to_vec(),
        _ => Vec::new(),
    }
}

/// The account with the tokens a successful refresh in this request gave it.
fn with_refresh(case: &Case, run: &Run, mut a: Account) -> (Account, bool) {
    let i = index_of(&a.email);
    let refreshed = run
        .calls
        .iter()
        .any(|c| c.kind == Kind::Refresh && c.email == a.email && c.fate == Fate::Ok);
    if refreshed {
        a.access_token = Secret::new(format!("at-{i}-1"));
        if case.behaviour[i].refresh_body.rotates {
            a.refresh_token = Secret::new(format!("rt-{i}-1"));
        }
    }
    (a, refreshed)
}

fn run(case: &Case) -> Run {
    Sim::new(case).run()
}

fn token_answer(run: &Run) -> Option<&TokenAnswer> {
    match &run.outcome {
        Outcome::Token { answer, .. } => Some(answer),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// A returned token was validated with a 200 in this request, for the account returned.
    #[test]
    fn a_returned_token_was_validated_for_that_account(case in case()) {
        let run = run(&case);
        if let Some(answer) = token_answer(&run) {
            let validated = run.calls.iter().any(|c| {
                c.kind == Kind::Validate
                    && c.fate == Fate::Ok
                    && c.email == answer.email()
                    && c.token == answer.access_token().expose()
            });
            prop_assert!(validated, "{} served without a 200 for its token: {:?}", answer.email(), run.calls);
        }
        // And every validation 200 for the token... is the answer itself: a 200 ends the request.
        let ok_validations = run.calls.iter().filter(|c| c.kind == Kind::Validate && c.fate == Fate::Ok).count();
        prop_assert_eq!(ok_validations, usize::from(token_answer(&run).is_some()));
    }

    /// The returned account was usable when it was chosen: not disabled, under both limits,
    /// judged on fresh usage (stored fresh or fetched now; the stored figures only after a
    /// transient usage failure, as DESIGN.md documents).
    #[test]
    fn the_returned_account_was_usable(case in case()) {
        let run = run(&case);
        if let Some(answer) = token_answer(&run) {
            let a = start_account(&case, answer.email());
            prop_assert!(!a.disabled, "{} is disabled", a.email);
            match basis(&case, &run, &a.email) {
                Basis::Known(u) => prop_assert!(
                    under_limits(&u, &case.policy),
                    "{} served over a limit: {:?}", a.email, u
                ),
                other => prop_assert!(false, "{} served on {:?} usage", a.email, other),
            }
        }
    }

    /// Every account ends in exactly one file, and both files together change only by what
    /// the upstream's answers justify: refreshed tokens, fetched usage, moves. Nothing lost,
    /// duplicated or invented.
    #[test]
    fn accounts_are_conserved(case in case()) {
        let run = run(&case);
        prop_assert!(run.problems.is_empty(), "{:?}", run.problems);
        let now = case.now;
        let appended = appended(&case, &run);
        let interrupted = interrupted(&case);
        let after = &run.accounts_after;
        let persisted = !matches!(run.outcome, Outcome::InvalidStateFile { .. });

        // failed.json: the old records stay as they were, in order.
        if let (Some(before), Some(f)) = (parse_failed(&case.failed), parse_failed(&run.failed_after)) {
            prop_assert!(f.accounts.starts_with(&before.accounts), "failed.json lost a record");
        }
        if parse_failed(&case.failed).is_none() {
            prop_assert_eq!(&run.failed_after, &case.failed, "an unparseable failed.json was written");
        }

        let mut kept_order = Vec::new();
        for start in &case.accounts.accounts {
            let e = &start.email;
            let in_accounts: Vec<&Account> = after.accounts.iter().filter(|a| &a.email == e).collect();
            let in_appended: Vec<&Account> = appended.iter().filter(|a| &a.email == e).collect();
            let was_interrupted = interrupted.contains(e);
            prop_assert!(in_accounts.len() <= 1 && in_appended.len() <= 1, "{} duplicated", e);
            let places = in_accounts.len() + in_appended.len() + usize::from(was_interrupted && in_accounts.is_empty());
            prop_assert_eq!(places, 1, "{} is in {} places", e, places);

            let (refreshed, had_refresh) = with_refresh(&case, &run, start.clone());
            if let Some(stored) = in_accounts.first() {
                kept_order.push(e.clone());
                let mut expected = refreshed.clone();
                if had_refresh {
                    let at = stored.token_refresh_at.expect("a refresh schedules the next one");
                    prop_assert!(at >= now + 60, "{} next refresh at {} (now {})", e, at, now);
                    expected.token_refresh_at = stored.token_refresh_at;
                }
                let fetched = run.calls.iter().rev().find(|c| c.kind == Kind::Usage && &c.email == e && c.fate == Fate::Ok);
                if let (Some(c), true) = (fetched, persisted) {
                    expected.usage = Some(expected_usage(&case.behaviour[index_of(e)].usage_body[c.generation.min(1)], now));
                    expected.usage_checked_at = Some(now);
                }
                prop_assert_eq!(
                    *stored, &expected,
                    "{} changed unjustifiably; outcome {:?}; its calls {:?}",
                    e, run.outcome, run.calls.iter().filter(|c| &c.email == e).collect::<Vec<_>>()
                );
            }
            if let Some(record) = in_appended.first() {
                // The object as it stood in accounts.json when it was moved.
                let mut expected = refreshed.clone();
                if had_refresh {
                    expected.token_refresh_at = record.token_refresh_at;
                }
                prop_assert_eq!(*record, &expected, "{} recorded unlike it stood", e);
            }
        }
        // Nobody new, order kept.
        let emails_after: Vec<String> = after.accounts.iter().map(|a| a.email.clone()).collect();
        prop_assert_eq!(&emails_after, &kept_order, "accounts.json gained or reordered accounts");
        prop_assert!(appended.iter().all(|r| case.accounts.find(&r.email).is_some()), "failed.json gained a stranger");

        // active_account: the served account; else as it was, unless its account left.
        let start_active = case.accounts.active_account.clone();
        let expected_active = match (&run.outcome, persisted) {
            (Outcome::Token { answer, .. }, _) => Some(answer.email().to_owned()),
            _ => start_active.filter(|e| {
                !(appended.iter().any(|r| &r.email == e) || interrupted.contains(e))
            }),
        };
        prop_assert_eq!(&after.active_account, &expected_active);
    }

    /// An account reaches failed.json only on an invalid verdict about the very tokens it
    /// is recorded with, never on a transient answer: a refresh rejected as dead, a usage
    /// or validation 401 for a token that was not due (or was just refreshed), or a 402/403
    /// with a dead code.
    #[test]
    fn only_invalid_verdicts_move_accounts(case in case()) {
        let run = run(&case);
        for record in appended(&case, &run) {
            let e = &record.email;
            let start = start_account(&case, e);
            let refresh_failed_transiently = run.calls.iter().any(|c| {
                c.kind == Kind::Refresh && &c.email == e && matches!(c.fate, Fate::Transient(_))
            });
            let justified = run.calls.iter().any(|c| {
                &c.email == e
                    && matches!(c.fate, Fate::Invalid(_))
                    && match c.kind {
                        Kind::Refresh => record.refresh_token.expose() == c.token,
                        // A 402/403 with a dead code is a verdict whatever the token's
                        // state (DESIGN.md); a 401 only for a token that was not due.
                        Kind::Usage | Kind::Validate => {
                            record.access_token.expose() == c.token
                                && (c.generation == 1
                                    || account_gone(c)
                                    || (!due(start, case.now) && !refresh_failed_transiently))
                        }
                    }
            });
            prop_assert!(justified, "{} moved without a verdict: {:?}", e, run.calls);
        }
        // Transient answers alone never move anybody.
        for start in &case.accounts.accounts {
            let all_transient_or_ok = run
                .calls
                .iter()
                .filter(|c| c.email == start.email)
                .all(|c| !matches!(c.fate, Fate::Invalid(_)));
            if all_transient_or_ok {
                prop_assert!(
                    appended(&case, &run).iter().all(|r| r.email != start.email),
                    "{} moved on transient answers", start.email
                );
            }
        }
    }

    /// Fresh usage is never fetched; stale usage at most once per account, plus the one
    /// documented retry: a usage rejection of a token due for refresh is followed by one
    /// refresh and one more usage call. A refresh token goes upstream at most once.
    #[test]
    fn upstream_calls_are_not_repeated(case in case()) {
        let run = run(&case);
        for a in &case.accounts.accounts {
            let usage: Vec<(usize, &Call)> = run
                .calls
                .iter()
                .enumerate()
                .filter(|(_, c)| c.kind == Kind::Usage && c.email == a.email)
                .collect();
            if fresh(a, &case) {
                prop_assert!(usage.is_empty(), "fresh usage of {} fetched", a.email);
            }
            if a.disabled {
                prop_assert!(run.calls.iter().all(|c| c.email != a.email), "disabled {} called", a.email);
            }
            match usage.as_slice() {
                [] | [_] => {}
                [(i, first), (j, _)] => {
                    prop_assert!(
                        matches!(first.fate, Fate::Invalid(_)) && due(a, case.now),
                        "{}: a second usage call without a rejected due token", a.email
                    );
                    let refreshes = run.calls[i + 1..*j]
                        .iter()
                        .filter(|c| c.kind == Kind::Refresh && c.email == a.email)
                        .count();
                    prop_assert_eq!(refreshes, 1, "{}: the retry follows one refresh", a.email);
                }
                more => prop_assert!(false, "{}: {} usage calls", a.email, more.len()),
            }
        }
        let mut sent = BTreeSet::new();
        for c in run.calls.iter().filter(|c| c.kind == Kind::Refresh) {
            prop_assert!(sent.insert(&c.token), "refresh token of {} sent twice: {:?}", c.email, run.calls);
        }
    }

    /// The choice matches the written rule, for every pick of the request (a pick that
    /// fails passes over to the next).
    #[test]
    fn the_choice_follows_the_rule(case in case()) {
        let run = run(&case);
        if matches!(run.outcome, Outcome::InvalidStateFile { .. }) {
            return Ok(());
        }
        let picks = picks(&run);
        // Out of the running before any pick: moved by a usage verdict, or found in failed.json.
        let mut out: BTreeSet<String> = interrupted(&case).into_iter().collect();
        out.extend(appended(&case, &run).into_iter().map(|r| r.email).filter(|e| !picks.contains(e)));
        for pick in &picks {
            let expected = reference_pick(&case, &run, &out);
            prop_assert_eq!(expected, Ok(Some(pick.clone())), "picks {:?}", picks);
            out.insert(pick.clone());
        }
        match &run.outcome {
            Outcome::Token { answer, .. } => prop_assert_eq!(picks.last().map(String::as_str), Some(answer.email())),
            _ => prop_assert_eq!(reference_pick(&case, &run, &out), Ok(None), "a usable account was left: {:?}", picks),
        }
    }

    /// Whatever gibby writes to accounts.json parses and has the exact schema of SPEC.md 1.
    #[test]
    fn written_files_match_the_schema(case in case()) {
        let run = run(&case);
        for (file, text) in &run.writes {
            prop_assert_eq!(schema_problem(*file, text), Ok(()), "{}", file.name());
        }
        // A request that changed something left a parseable accounts.json behind.
        prop_assert!(AccountsFile::parse(&run.accounts_after.to_text()).is_ok());
    }
}

/// The simulation itself: its upstream answers as it says it does.
#[test]
fn the_simulated_upstream_is_judged_as_the_sim_says() {
    use super::verdict::{classify, Call as C, Verdict};
    for (kind, call) in [
        (Kind::Usage, C::Usage),
        (Kind::Refresh, C::Refresh),
        (Kind::Validate, C::Validation),
    ] {
        for r in invalid_replies(kind) {
            assert!(
                matches!(classify(call, &r), Verdict::Invalid(_)),
                "{kind:?} {r:?}"
            );
        }
        for r in transient_replies(kind) {
            let v = classify(call, &r);
            let transient = match v {
                Verdict::Transient(_) => true,
                // 200s whose body does not parse are transient one level up.
                Verdict::Success(body) => match kind {
                    Kind::Usage => super::wire::usage_from_body(body, 0).is_none(),
                    Kind::Refresh => super::wire::tokens_from_body(body, 0).is_none(),
                    Kind::Validate => !super::wire::models_listed(body),
                },
                Verdict::Invalid(_) => false,
            };
            assert!(transient, "{kind:?} {r:?}");
        }
    }
    let body = UsageBody {
        short: Some(10.into()),
        weekly: Some(20.into()),
        swapped: true,
        no_limits: false,
    };
    let reply = with_now(usage_reply(&body), 1000);
    let Reply::Http(h) = &reply else {
        unreachable!()
    };
    assert_eq!(
        super::wire::usage_from_body(&h.body, 1000),
        Some(expected_usage(&body, 1000))
    );
}
