//! A fake of the upstream gibby talks to: the OpenAI auth server (`POST /oauth/token`) and the
//! ChatGPT backend (`/backend-api/wham/usage`, `/backend-api/codex/models`), speaking the wire
//! format of UPSTREAM.md. Tests, the demo and benchmarks drive it through [`FakeUpstream`]; it
//! only ever binds to 127.0.0.1.

#![allow(clippy::disallowed_methods)] // a stand-in for the world: it has its own clock

mod jwt;
mod server;
#[cfg(test)]
mod tests;

pub use server::RunningFake;

use serde_json::{json, Number, Value};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The Codex CLI's public OAuth client id: the only one the fake accepts.
pub const CLIENT_ID: &str = "app_EMoamEEZ73f0CkXaXp7hrann";
pub const ISSUER: &str = "https://auth.openai.com";
pub const AUTH_CLAIM: &str = "https://api.openai.com/auth";
pub const PROFILE_CLAIM: &str = "https://api.openai.com/profile";
/// exp - iat of real access tokens (10 days).
pub const DEFAULT_TOKEN_LIFETIME: i64 = 864_000;

/// Handle on one fake upstream; clones share the same state.
#[derive(Clone)]
pub struct FakeUpstream {
    state: Arc<Mutex<State>>,
    /// Calls received per endpoint, for tests that wait for a call instead of sleeping.
    /// Kept outside `state` so that a waiter never holds one lock while taking the other.
    seen: Arc<tokio::sync::watch::Sender<[usize; 3]>>,
}

/// Holds every answer of one endpoint until it is opened (or dropped): see
/// [`FakeUpstream::hold`].
#[derive(Debug)]
pub struct Gate {
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    /// Lets every held answer, and every later one, go out.
    pub fn open(self) {}
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open.send_replace(true);
    }
}

#[derive(Clone, Debug)]
pub struct AccountSpec {
    pub email: String,
    pub plan_type: String,
    /// None = derive a stable UUID-shaped id from the email.
    pub account_id: Option<String>,
    pub primary: Option<Window>,
    pub secondary: Option<Window>,
}

impl AccountSpec {
    /// A plus account with its 5-hour window at 10% and its weekly window at 20%.
    pub fn new(email: &str) -> Self {
        AccountSpec {
            email: email.to_owned(),
            plan_type: "plus".to_owned(),
            account_id: None,
            primary: Some(Window::five_hour(10)),
            secondary: Some(Window::weekly(20)),
        }
    }
}

/// One usage window. `reset_at` is computed as now + `reset_after_seconds` when answering, so it
/// follows [`FakeUpstream::set_now`].
#[derive(Clone, Debug)]
pub struct Window {
    /// A Number so tests can send integers (as live) or floats (as some clients expect).
    pub used_percent: Number,
    pub limit_window_seconds: i64,
    pub reset_after_seconds: i64,
}

impl Window {
    /// A fresh 5-hour window (resets in 5 hours).
    pub fn five_hour(pct: impl Into<Number>) -> Self {
        Window::new(pct, 18_000, 18_000)
    }
    /// A fresh weekly window (resets in 7 days).
    pub fn weekly(pct: impl Into<Number>) -> Self {
        Window::new(pct, 604_800, 604_800)
    }
    pub fn new(
        pct: impl Into<Number>,
        limit_window_seconds: i64,
        reset_after_seconds: i64,
    ) -> Self {
        Window {
            used_percent: pct.into(),
            limit_window_seconds,
            reset_after_seconds,
        }
    }
}

#[derive(Clone)]
pub struct IssuedTokens {
    pub access_token: String,
    pub refresh_token: String,
    pub id_token: String,
    pub account_id: String,
    /// The access token's `exp` (unix seconds).
    pub expires_at: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Refresh,
    Usage,
    Models,
}

impl Endpoint {
    fn index(self) -> usize {
        match self {
            Endpoint::Refresh => 0,
            Endpoint::Usage => 1,
            Endpoint::Models => 2,
        }
    }
}

/// A scripted answer, queued with [`FakeUpstream::push_reply`].
#[derive(Clone, Debug)]
pub enum Reply {
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Waits, then answers with the inner reply.
    Delay(Duration, Box<Reply>),
    /// Never answers (until the client gives up or the server shuts down): for client timeouts.
    Hang,
    /// Closes the connection without an answer. Needs the server of [`FakeUpstream::start`];
    /// under a bare [`FakeUpstream::router`] it degrades to an empty 502 with `connection: close`.
    Drop,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Self {
        Reply::with_type(status, "application/json", body.to_string())
    }
    pub fn html(status: u16, body: &str) -> Self {
        Reply::with_type(status, "text/html; charset=utf-8", body.to_owned())
    }
    /// What Cloudflare answers when it wants a browser check: never a verdict on the account.
    pub fn cloudflare_challenge() -> Self {
        let mut reply = Reply::html(
            403,
            "<!DOCTYPE html><html><head><title>Just a moment...</title></head>\
             <body><noscript>Enable JavaScript and cookies to continue</noscript></body></html>",
        );
        if let Reply::Status { headers, .. } = &mut reply {
            headers.push(("cf-mitigated".into(), "challenge".into()));
        }
        reply
    }
    fn with_type(status: u16, content_type: &str, body: String) -> Self {
        Reply::Status {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body,
        }
    }
    /// The status recorded for this reply; 0 when no HTTP answer is ever sent.
    fn final_status(&self) -> u16 {
        match self {
            Reply::Status { status, .. } => *status,
            Reply::Delay(_, inner) => inner.final_status(),
            Reply::Hang | Reply::Drop => 0,
        }
    }
}

/// One request the fake received.
#[derive(Clone)]
pub struct Call {
    pub endpoint: Endpoint,
    /// The account the presented token belongs to, whatever state that token is in.
    pub email: Option<String>,
    pub bearer: Option<String>,
    pub refresh_token: Option<String>,
    /// The refresh body's other fields (JSON or form), as sent.
    pub client_id: Option<String>,
    pub grant_type: Option<String>,
    pub scope: Option<String>,
    /// The scheme of the `Authorization` header (`Bearer`), as sent.
    pub authorization_scheme: Option<String>,
    pub accept: Option<String>,
    pub content_type: Option<String>,
    pub account_id_header: Option<String>,
    pub user_agent: Option<String>,
    pub query: Option<String>,
    /// The HTTP status answered; 0 for [`Reply::Hang`] and [`Reply::Drop`].
    pub status: u16,
}

struct Account {
    plan_type: String,
    account_id: String,
    user_id: String,
    primary: Option<Window>,
    secondary: Option<Window>,
    revoked: bool,
}

struct Scripted {
    endpoint: Endpoint,
    email: Option<String>,
    reply: Reply,
}

struct State {
    seed: u64,
    counter: u64,
    accounts: HashMap<String, Account>,
    /// access token -> (email, exp)
    access: HashMap<String, (String, i64)>,
    /// refresh token -> (email, already used)
    refresh: HashMap<String, (String, bool)>,
    /// Every token handed out (access, refresh and id tokens), in order.
    issued: Vec<String>,
    replies: VecDeque<Scripted>,
    /// While not empty, every unscripted call gets the next of these, in turn.
    outage: Vec<Reply>,
    outage_next: usize,
    latency: Duration,
    now: Option<i64>,
    lifetime: i64,
    calls: Vec<Call>,
    reused: usize,
    /// Answers of these endpoints wait until the gate's sender says `true`.
    gates: HashMap<Endpoint, tokio::sync::watch::Receiver<bool>>,
}

impl Default for FakeUpstream {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeUpstream {
    pub fn new() -> Self {
        // Per-instance seed: the clock, plus a process-wide counter so two fakes created in the
        // same nanosecond still hand out different tokens.
        static INSTANCES: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = mix(nanos ^ INSTANCES.fetch_add(1, Ordering::Relaxed).rotate_left(32));
        FakeUpstream {
            state: Arc::new(Mutex::new(State {
                seed,
                counter: 0,
                accounts: HashMap::new(),
                access: HashMap::new(),
                refresh: HashMap::new(),
                issued: Vec::new(),
                replies: VecDeque::new(),
                outage: Vec::new(),
                outage_next: 0,
                latency: Duration::ZERO,
                now: None,
                lifetime: DEFAULT_TOKEN_LIFETIME,
                calls: Vec::new(),
                reused: 0,
                gates: HashMap::new(),
            })),
            seen: Arc::new(tokio::sync::watch::channel([0; 3]).0),
        }
    }

    /// A panicking test must not poison the fake for the rest of the test run.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an account and issues its first token set. Registering an email again replaces
    /// its settings (and lifts a revocation); tokens issued before stay valid.
    pub fn add_account(&self, spec: AccountSpec) -> IssuedTokens {
        let h = fnv(&spec.email);
        let account_id = spec.account_id.unwrap_or_else(|| {
            let (a, b) = (h, mix(h));
            format!(
                "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                a >> 32,
                (a >> 16) & 0xffff,
                a & 0xfff,
                b >> 52,
                b & 0xffff_ffff_ffff
            )
        });
        let mut st = self.lock();
        st.accounts.insert(
            spec.email.clone(),
            Account {
                plan_type: spec.plan_type,
                account_id,
                user_id: format!(
                    "user-{:024x}",
                    u128::from(h) << 32 | u128::from(mix(h) >> 32)
                ),
                primary: spec.primary,
                secondary: spec.secondary,
                revoked: false,
            },
        );
        st.issue(&spec.email)
    }

    /// Issues a brand-new token set for an existing account, as if the user logged in again.
    /// Earlier tokens are left as they are (live ones stay live); a revocation stays in force.
    pub fn login(&self, email: &str) -> IssuedTokens {
        let mut st = self.lock();
        st.account(email);
        st.issue(email)
    }

    /// Replaces the usage the fake reports for this account.
    pub fn set_usage(&self, email: &str, primary: Option<Window>, secondary: Option<Window>) {
        let mut st = self.lock();
        let acct = st.account(email);
        acct.primary = primary;
        acct.secondary = secondary;
    }

    /// Every token of the account is refused from now on: `account_deactivated` on usage and
    /// models, `refresh_token_invalidated` on refresh.
    pub fn revoke(&self, email: &str) {
        self.lock().account(email).revoked = true;
    }

    /// Queues a scripted reply. A call consumes the oldest queued reply for its endpoint whose
    /// email is None or the caller's, instead of the normal behaviour (a scripted answer to a
    /// refresh does not rotate the refresh token).
    pub fn push_reply(&self, endpoint: Endpoint, email: Option<&str>, reply: Reply) {
        self.lock().replies.push_back(Scripted {
            endpoint,
            email: email.map(str::to_owned),
            reply,
        });
    }

    /// An incident: every call that has no scripted reply gets the next of `replies`, in
    /// turn, until `set_outage(vec![])` ends it.
    pub fn set_outage(&self, replies: Vec<Reply>) {
        let mut st = self.lock();
        st.outage = replies;
        st.outage_next = 0;
    }

    /// Delay added before every answer (benchmarks use 50 ms).
    pub fn set_latency(&self, d: Duration) {
        self.lock().latency = d;
    }

    /// Overrides the clock (unix seconds) used for iat/exp, expiry checks and reset_at.
    pub fn set_now(&self, now: Option<i64>) {
        self.lock().now = now;
    }

    /// exp - iat of access tokens issued from now on.
    pub fn set_token_lifetime(&self, secs: i64) {
        self.lock().lifetime = secs;
    }

    /// Every token this fake has issued so far (access, refresh and id tokens, by
    /// registration, login or refresh), in order: what a test searches logs and answers for.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.lock().issued.clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn count(&self, endpoint: Endpoint) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.endpoint == endpoint)
            .count()
    }

    /// How many times a dead refresh token was presented again. gibby must keep this at 0.
    pub fn reused_refresh_tokens(&self) -> usize {
        self.lock().reused
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
        self.seen.send_replace([0; 3]);
    }

    /// From now on, every answer of `endpoint` is held back (after the call is recorded and
    /// its effect, such as a token rotation, has happened) until the returned gate is opened
    /// or dropped. With [`wait_for_calls`](Self::wait_for_calls), a test can line up
    /// concurrent callers at an exact point without sleeping.
    pub fn hold(&self, endpoint: Endpoint) -> Gate {
        let (open, opened) = tokio::sync::watch::channel(false);
        self.lock().gates.insert(endpoint, opened);
        Gate { open }
    }

    /// Waits until at least `n` calls to `endpoint` have been recorded (since the start or
    /// the last [`clear_calls`](Self::clear_calls)); `false` when `timeout` passes first.
    pub async fn wait_for_calls(&self, endpoint: Endpoint, n: usize, timeout: Duration) -> bool {
        let mut seen = self.seen.subscribe();
        tokio::time::timeout(timeout, seen.wait_for(|c| c[endpoint.index()] >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl State {
    fn now(&self) -> i64 {
        self.now.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        })
    }

    fn account(&mut self, email: &str) -> &mut Account {
        self.accounts
            .get_mut(email)
            .unwrap_or_else(|| panic!("fake upstream: no account {email:?}"))
    }

    /// A fresh string, unique within this fake: `mix` is a bijection, so distinct counters
    /// give distinct values.
    fn unique(&mut self) -> String {
        self.counter += 1;
        format!("{:016x}", mix(self.seed.wrapping_add(self.counter)))
    }

    fn issue(&mut self, email: &str) -> IssuedTokens {
        let (iat, lifetime) = (self.now(), self.lifetime);
        let exp = iat + lifetime;
        let (jti_access, jti_id, rt) = (self.unique(), self.unique(), self.unique());
        let acct = &self.accounts[email];
        let auth = json!({
            "chatgpt_account_id": acct.account_id,
            "chatgpt_plan_type": acct.plan_type,
            "chatgpt_user_id": acct.user_id,
        });
        let access_token = jwt::encode(&json!({
            "exp": exp, "iat": iat, "iss": ISSUER, "client_id": CLIENT_ID, "jti": jti_access,
            AUTH_CLAIM: auth,
            PROFILE_CLAIM: {"email": email, "email_verified": true},
        }));
        let id_token = jwt::encode(&json!({
            "email": email, "exp": exp, "iat": iat, "iss": ISSUER, "aud": CLIENT_ID,
            "jti": jti_id, AUTH_CLAIM: auth,
        }));
        let tokens = IssuedTokens {
            access_token,
            refresh_token: format!("rt_{rt}"),
            id_token,
            account_id: acct.account_id.clone(),
            expires_at: exp,
        };
        self.access
            .insert(tokens.access_token.clone(), (email.to_owned(), exp));
        self.refresh
            .insert(tokens.refresh_token.clone(), (email.to_owned(), false));
        self.issued.extend([
            tokens.access_token.clone(),
            tokens.refresh_token.clone(),
            tokens.id_token.clone(),
        ]);
        tokens
    }
}

/// splitmix64's finalizer: a bijection on u64 that scatters a counter into random-looking bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a: stable across runs and Rust versions, unlike std's hasher, so derived ids are too.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Tokens are secrets even here: Debug shows a short prefix and the length only.
struct Redacted<'a>(Option<&'a str>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("None"),
            Some(t) => {
                let prefix: String = t.chars().take(6).collect();
                write!(f, "\"{prefix}…\" ({} chars)", t.len())
            }
        }
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("endpoint", &self.endpoint)
            .field("email", &self.email)
            .field("bearer", &Redacted(self.bearer.as_deref()))
            .field("refresh_token", &Redacted(self.refresh_token.as_deref()))
            .field("client_id", &self.client_id)
            .field("grant_type", &self.grant_type)
            .field("scope", &self.scope)
            .field("authorization_scheme", &self.authorization_scheme)
            .field("accept", &self.accept)
            .field("content_type", &self.content_type)
            .field("account_id_header", &self.account_id_header)
            .field("user_agent", &self.user_agent)
            .field("query", &self.query)
            .field("status", &self.status)
            .finish()
    }
}

impl fmt::Debug for IssuedTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedTokens")
            .field("access_token", &Redacted(Some(&self.access_token)))
            .field("refresh_token", &Redacted(Some(&self.refresh_token)))
            .field("id_token", &Redacted(Some(&self.id_token)))
            .field("account_id", &self.account_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl fmt::Debug for FakeUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        let mut accounts: Vec<_> = st.accounts.iter().map(|(e, a)| (e, a.revoked)).collect();
        accounts.sort();
        f.debug_struct("FakeUpstream")
            .field("accounts (email, revoked)", &accounts)
            .field("access_tokens_issued", &st.access.len())
            .field("queued_replies", &st.replies.len())
            .field("calls", &st.calls.len())
            .field("reused_refresh_tokens", &st.reused)
            .field("latency", &st.latency)
            .field("now", &st.now)
            .finish()
    }
}
