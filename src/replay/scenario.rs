//! The scenario file: what one or more `/token` requests saw and what they should end in.
//!
//! ```json
//! {
//!   "description": "stale usage is fetched once and written back",
//!   "now": 1800000000,
//!   "settings": {"exhausted_threshold": 95, "usage_stale_seconds": 3600},
//!   "files": {"accounts.json": {"active_account": null, "accounts": [...]}, "failed.json": null},
//!   "upstream": [
//!     {"call": "usage", "email": "a@example.com", "token": "at-a", "status": 200, "body": {...}},
//!     {"call": "validate", "email": "a@example.com", "token": "at-a", "transport": "timed out"}
//!   ],
//!   "requests": [{"expect": {"token": {"email": "a@example.com", "access_token": "at-a"}},
//!                 "files_after": {"accounts.json": {...}, "failed.json": null}}]
//! }
//! ```
//!
//! A state file is `null` (missing), the file as JSON, or a string holding its exact text
//! (for files that do not parse, or whose bytes matter). Upstream answers are consumed in
//! order; each names the call, the account and the token it expects to be asked with. A
//! request's optional `files_after` is what both files must hold once it has ended.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::core::{FileRead, HttpReply, Outcome, Reply, StateFile};
use crate::model::{AccountsFile, FailedFile};
use crate::settings::Policy;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The clock of every request that does not set its own.
    pub now: i64,
    #[serde(default)]
    pub settings: ScenarioSettings,
    pub files: Files,
    /// The upstream's answers, in the order the calls are made.
    #[serde(default)]
    pub upstream: Vec<Answer>,
    pub requests: Vec<RequestSpec>,
}

/// The settings the core decides with (`GIBBY_EXHAUSTED_USAGE_THRESHOLD`,
/// `GIBBY_USAGE_STALE_SECONDS`); the defaults when absent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioSettings {
    #[serde(default = "default_threshold")]
    pub exhausted_threshold: f64,
    #[serde(default = "default_stale")]
    pub usage_stale_seconds: i64,
}

fn default_threshold() -> f64 {
    Policy::default().exhausted_threshold
}

fn default_stale() -> i64 {
    Policy::default().usage_stale_seconds
}

impl Default for ScenarioSettings {
    fn default() -> Self {
        Policy::default().into()
    }
}

impl From<Policy> for ScenarioSettings {
    fn from(p: Policy) -> Self {
        ScenarioSettings {
            exhausted_threshold: p.exhausted_threshold,
            usage_stale_seconds: p.usage_stale_seconds,
        }
    }
}

impl ScenarioSettings {
    pub fn policy(&self) -> Policy {
        Policy {
            exhausted_threshold: self.exhausted_threshold,
            usage_stale_seconds: self.usage_stale_seconds,
        }
    }
}

/// Both state files: as the first request finds them, or as a request leaves them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Files {
    #[serde(rename = "accounts.json", default)]
    pub accounts: Option<Content<AccountsFile>>,
    #[serde(rename = "failed.json", default)]
    pub failed: Option<Content<FailedFile>>,
}

/// A file's content: parsed (written out as gibby writes it) or its exact text.
#[derive(Clone, Debug, PartialEq)]
pub enum Content<T> {
    Parsed(T),
    Text(String),
}

impl<T: Serialize> Serialize for Content<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Content::Parsed(t) => t.serialize(s),
            Content::Text(text) => text.serialize(s),
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Content<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(text) => Ok(Content::Text(text)),
            other => T::deserialize(other)
                .map(Content::Parsed)
                .map_err(D::Error::custom),
        }
    }
}

impl Content<AccountsFile> {
    pub fn text(&self) -> String {
        match self {
            Content::Parsed(f) => f.to_text(),
            Content::Text(t) => t.clone(),
        }
    }
}

impl Content<FailedFile> {
    pub fn text(&self) -> String {
        match self {
            Content::Parsed(f) => f.to_text(),
            Content::Text(t) => t.clone(),
        }
    }
}

impl Files {
    pub fn read(&self) -> (FileRead, FileRead) {
        let accounts = self
            .accounts
            .as_ref()
            .map_or(FileRead::Missing, |c| FileRead::Text(c.text().into()));
        let failed = self
            .failed
            .as_ref()
            .map_or(FileRead::Missing, |c| FileRead::Text(c.text().into()));
        (accounts, failed)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallKind {
    Usage,
    Refresh,
    Validate,
}

impl CallKind {
    pub fn name(self) -> &'static str {
        match self {
            CallKind::Usage => "usage",
            CallKind::Refresh => "refresh",
            CallKind::Validate => "validate",
        }
    }
}

/// One upstream answer: an HTTP reply (`status`, `body`, optional `content_type` and
/// `challenge`) or no answer at all (`transport`: a timeout, a refused connection).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    pub call: CallKind,
    pub email: String,
    /// The token the call must carry: the access token, or the refresh token for a refresh.
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `application/json` unless given; `null` for none.
    #[serde(
        default = "json_type",
        skip_serializing_if = "is_json_type",
        deserialize_with = "nullable"
    )]
    pub content_type: Option<String>,
    /// `cf-mitigated: challenge` was sent.
    #[serde(default, skip_serializing_if = "is_false")]
    pub challenge: bool,
    /// A string is the body as it is; anything else is sent as compact JSON.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub body: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

fn json_type() -> Option<String> {
    Some("application/json".into())
}

fn is_json_type(t: &Option<String>) -> bool {
    t.as_deref() == Some("application/json")
}

fn is_false(b: &bool) -> bool {
    !b
}

fn nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

impl Answer {
    /// The reply this answer stands for.
    pub fn reply(&self) -> Result<Reply, String> {
        match (self.status, &self.transport) {
            (None, Some(why)) => Ok(Reply::Transport(why.clone())),
            (Some(status), None) => Ok(Reply::Http(HttpReply {
                status,
                content_type: self.content_type.clone(),
                challenge: self.challenge,
                body: match &self.body {
                    Value::Null => String::new(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
            })),
            _ => Err(format!(
                "the {} answer for {} needs exactly one of status and transport",
                self.call.name(),
                self.email
            )),
        }
    }

    /// The answer that records `reply`.
    pub fn from_reply(call: CallKind, email: String, token: String, reply: &Reply) -> Self {
        let mut answer = Answer {
            call,
            email,
            token,
            status: None,
            content_type: json_type(),
            challenge: false,
            body: Value::Null,
            transport: None,
        };
        match reply {
            Reply::Transport(why) => answer.transport = Some(why.clone()),
            Reply::Http(h) => {
                answer.status = Some(h.status);
                answer.content_type = h.content_type.clone();
                answer.challenge = h.challenge;
                // Kept as JSON when that reads back to the same text, else as the text.
                let compact = |v: &Value| serde_json::to_string(v).ok();
                answer.body = match serde_json::from_str::<Value>(&h.body) {
                    Ok(v) if v.is_object() && compact(&v).as_deref() == Some(&h.body) => v,
                    _ if h.body.is_empty() => Value::Null,
                    _ => Value::String(h.body.clone()),
                };
            }
        }
        answer
    }
}

/// One `/token` request of the scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// This request's clock, when it differs from the scenario's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now: Option<i64>,
    /// What other writers did while the request ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edits: Vec<Edit>,
    pub expect: Expected,
    /// What both files hold once the request has ended (gibby's writes and the edits
    /// applied); checked when given. A file left out (or `null`) must be missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_after: Option<Files>,
}

/// Another writer's change, landing just before the request's n-th effect (from 1): a
/// new content for a file, or a write of gibby's that fails.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    pub before_effect: usize,
    pub file: FileName,
    /// The file's new content: `null` (removed), JSON, or the exact text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    /// The write at `before_effect` fails with this error instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_fails: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileName {
    #[serde(rename = "accounts.json")]
    Accounts,
    #[serde(rename = "failed.json")]
    Failed,
}

impl From<StateFile> for FileName {
    fn from(f: StateFile) -> Self {
        match f {
            StateFile::Accounts => FileName::Accounts,
            StateFile::Failed => FileName::Failed,
        }
    }
}

impl Edit {
    /// The file as the edit leaves it.
    pub fn read(&self) -> Result<FileRead, String> {
        let what = |e: serde_json::Error| format!("edit before effect {}: {e}", self.before_effect);
        Ok(match &self.content {
            None | Some(Value::Null) => FileRead::Missing,
            Some(Value::String(text)) => FileRead::Text(text.as_str().into()),
            Some(v) => FileRead::Text(
                match self.file {
                    FileName::Accounts => AccountsFile::deserialize(v).map_err(what)?.to_text(),
                    FileName::Failed => FailedFile::deserialize(v).map_err(what)?.to_text(),
                }
                .into(),
            ),
        })
    }
}

/// How the request must end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Expected {
    /// 200 with this account's token.
    Token { email: String, access_token: String },
    /// 503 `no_usable_account`: every account passed over, with the reason `/token` gives.
    NoUsableAccount {
        accounts: Vec<PassedOver>,
        #[serde(default)]
        retry_after: Option<i64>,
    },
    /// 503 `invalid_state_file` with this detail.
    InvalidStateFile { detail: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassedOver {
    pub email: String,
    pub reason: String,
}

impl Expected {
    /// The outcome in the scenario's terms.
    pub fn of(outcome: &Outcome) -> Expected {
        match outcome {
            Outcome::Token { answer, .. } => Expected::Token {
                email: answer.email().to_owned(),
                access_token: answer.access_token().expose().to_owned(),
            },
            Outcome::NoUsableAccount {
                passed_over,
                retry_after,
            } => Expected::NoUsableAccount {
                accounts: passed_over
                    .iter()
                    .map(|p| PassedOver {
                        email: p.email.clone(),
                        reason: p.reason.to_string(),
                    })
                    .collect(),
                retry_after: *retry_after,
            },
            Outcome::InvalidStateFile { detail } => Expected::InvalidStateFile {
                detail: detail.clone(),
            },
        }
    }
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let scenario: Scenario = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if scenario.requests.is_empty() {
            return Err("a scenario needs at least one request".into());
        }
        for answer in &scenario.upstream {
            answer.reply()?;
        }
        Ok(scenario)
    }

    pub fn to_text(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("scenarios always serialise");
        text.push('\n');
        text
    }
}
