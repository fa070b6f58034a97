//! Recording: a `/token` request served by the live interpreter, written down as a scenario
//! that `gibby replay` reproduces (`GIBBY_RECORD_DIR`).
//!
//! The recorder only watches the live interpreter's effects and events; the core does not
//! know it is recorded. It keeps what the request saw: both files as first read, the clock,
//! the settings, every upstream answer in order, and the changes other writers made while
//! the request ran (a read that differs from what the request's own writes left, a write
//! that met a conflict or failed), and both files as the request left them (`files_after`,
//! so a replay checks the writes too). Every token is then replaced by a placeholder; a
//! JWT's placeholder is a JWT again that keeps the claims gibby reads (`exp`, `iat`, the
//! account id and the email) and names itself in a `gibby_placeholder` claim, so the
//! replay schedules refreshes and answers exactly as the request did.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

use super::live::{Finished, Live, LiveError};
use super::store::atomic_write;
use crate::core::{Effect, Event, FileRead, Reply, StateFile, TokenRequest, WriteResult};
use crate::model::{AccountsFile, Claims, FailedFile};
use crate::replay::scenario::{
    Answer, CallKind, Content, Edit, Expected, FileName, Files, RequestSpec, Scenario,
};
use crate::replay::PLACEHOLDER_CLAIM;

/// Serves one `/token` request like [`Live::token`] and writes its scenario into `dir`.
/// A recording that cannot be written is logged; the request is answered all the same.
pub async fn token(live: &Live, dir: &Path) -> Result<Finished, LiveError> {
    let now = (live.clock)();
    let mut recorder = Recorder::new(live, now);
    let finished = live
        .run_observed(
            TokenRequest::new(now, live.policy),
            &mut |step, effect, event| recorder.saw(step, effect, event),
        )
        .await?;
    match recorder.write(dir, &finished) {
        Ok(path) => tracing::debug!(path = %path.display(), "request recorded"),
        Err(e) => tracing::warn!("{}: the request was not recorded: {e}", dir.display()),
    }
    Ok(finished)
}

struct Recorder<'a> {
    live: &'a Live,
    now: i64,
    /// Both files as the request first read them.
    start: Option<(FileRead, FileRead)>,
    /// What the files hold by the request's own account (its reads and writes).
    accounts: FileRead,
    failed: FileRead,
    upstream: Vec<Answer>,
    edits: Vec<Edit>,
    /// Every token seen, and the kind of field it was seen in.
    tokens: Tokens,
}

impl<'a> Recorder<'a> {
    fn new(live: &'a Live, now: i64) -> Self {
        Recorder {
            live,
            now,
            start: None,
            accounts: FileRead::Missing,
            failed: FileRead::Missing,
            upstream: Vec::new(),
            edits: Vec::new(),
            tokens: Tokens::default(),
        }
    }

    fn saw(&mut self, step: usize, effect: &Effect, event: &Event) {
        match (effect, event) {
            (Effect::ReadFiles, Event::FilesRead { accounts, failed }) => {
                for read in [accounts, failed] {
                    if let FileRead::Text(text) = read {
                        self.tokens.collect_from(text);
                    }
                }
                if self.start.is_none() {
                    self.start = Some((accounts.clone(), failed.clone()));
                } else {
                    for (file, read) in
                        [(StateFile::Accounts, accounts), (StateFile::Failed, failed)]
                    {
                        if self.slot(file) != read {
                            self.edit(step, file, read.clone());
                        }
                    }
                }
                self.accounts = accounts.clone();
                self.failed = failed.clone();
            }
            (Effect::Write { file, content, .. }, Event::Written { result, .. }) => match result {
                WriteResult::Done => *self.slot(*file) = FileRead::Text(content.0.as_str().into()),
                // Another writer's change landed before this write: it is what the file
                // holds now.
                WriteResult::Conflict => {
                    let now_holds = self.live.store.read(*file);
                    if let FileRead::Text(text) = &now_holds {
                        self.tokens.collect_from(text);
                    }
                    self.edit(step, *file, now_holds);
                }
                WriteResult::Failed(why) => self.edits.push(Edit {
                    before_effect: step,
                    file: (*file).into(),
                    content: None,
                    write_fails: Some(why.clone()),
                }),
            },
            (
                Effect::FetchUsage { .. },
                Event::UsageFetched {
                    email,
                    access_token,
                    reply,
                },
            ) => self.answer(CallKind::Usage, email, access_token.expose(), reply),
            (
                Effect::RefreshToken { .. },
                Event::TokenRefreshed {
                    email,
                    refresh_token,
                    reply,
                },
            ) => self.answer(CallKind::Refresh, email, refresh_token.expose(), reply),
            (
                Effect::Validate { .. },
                Event::ValidationAnswered {
                    email,
                    access_token,
                    reply,
                },
            ) => self.answer(CallKind::Validate, email, access_token.expose(), reply),
            _ => {}
        }
    }

    fn slot(&mut self, file: StateFile) -> &mut FileRead {
        match file {
            StateFile::Accounts => &mut self.accounts,
            StateFile::Failed => &mut self.failed,
        }
    }

    fn edit(&mut self, step: usize, file: StateFile, content: FileRead) {
        *self.slot(file) = content.clone();
        self.edits.push(Edit {
            before_effect: step,
            file: FileName::from(file),
            content: Some(match content {
                FileRead::Text(text) => Value::String(text.to_string()),
                FileRead::Missing | FileRead::Unreadable(_) => Value::Null,
            }),
            write_fails: None,
        });
    }

    fn answer(&mut self, call: CallKind, email: &str, token: &str, reply: &Reply) {
        let kind = match call {
            CallKind::Refresh => "refresh-token",
            CallKind::Usage | CallKind::Validate => "access-token",
        };
        self.tokens.add(token, kind);
        if let Reply::Http(http) = reply {
            self.tokens.collect_from(&http.body);
        }
        self.upstream.push(Answer::from_reply(
            call,
            email.to_owned(),
            token.to_owned(),
            reply,
        ));
    }

    /// The scenario with every token replaced, as it is written.
    fn scenario_text(&self, finished: &Finished) -> Result<String, String> {
        let (accounts, failed) = self
            .start
            .clone()
            .ok_or("the request read no file (it could not lock the data directory)")?;
        let expect = Expected::of(&finished.outcome);
        let mut tokens = self.tokens.clone();
        if let Expected::Token { access_token, .. } = &expect {
            tokens.add(access_token, "access-token");
        }
        let scenario = Scenario {
            description: format!("recorded by gibby serve at {}", self.now),
            now: self.now,
            settings: self.live.policy.into(),
            files: Files {
                accounts: content(&accounts, |t| {
                    AccountsFile::parse(t).ok().map(|f| (f.to_text(), f))
                }),
                failed: content(&failed, |t| {
                    FailedFile::parse(t).ok().map(|f| (f.to_text(), f))
                }),
            },
            upstream: self.upstream.clone(),
            requests: vec![RequestSpec {
                now: None,
                edits: self.edits.clone(),
                expect,
                // What the files held once the request ended, as far as it saw: its own
                // writes and every change of another writer it met. The replay ends with
                // the same files unless the logic now writes differently.
                files_after: Some(Files {
                    accounts: content(&self.accounts, |t| {
                        AccountsFile::parse(t).ok().map(|f| (f.to_text(), f))
                    }),
                    failed: content(&self.failed, |t| {
                        FailedFile::parse(t).ok().map(|f| (f.to_text(), f))
                    }),
                }),
            }],
        };
        tokens.replace_in(&scenario.to_text())
    }

    fn write(&self, dir: &Path, finished: &Finished) -> Result<PathBuf, String> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let text = self.scenario_text(finished)?;
        crate::io::store::create_private_dir_all(dir).map_err(|e| e.to_string())?;
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            "token-{}-{}-{n:04}.json",
            self.now,
            std::process::id()
        ));
        // atomic_write creates the file 0600: it never holds a token, but it does hold
        // the pool's emails and usage.
        atomic_write(&path, text.as_bytes()).map_err(|e| e.to_string())?;
        Ok(path)
    }
}

/// A state file for the scenario: parsed when gibby would write it byte for byte the
/// same, else its exact text.
fn content<T>(read: &FileRead, parse: impl Fn(&str) -> Option<(String, T)>) -> Option<Content<T>> {
    match read {
        FileRead::Missing | FileRead::Unreadable(_) => None,
        FileRead::Text(text) => Some(match parse(text) {
            Some((canonical, parsed)) if canonical.as_str() == &**text => Content::Parsed(parsed),
            _ => Content::Text(text.to_string()),
        }),
    }
}

/// In a file that is not JSON, runs of token characters at least this long are replaced.
const MIN_TOKEN_RUN: usize = 24;

/// The tokens of a recording and their placeholders.
#[derive(Clone, Default)]
struct Tokens {
    /// token → placeholder, numbered per kind in the order first seen.
    placeholders: BTreeMap<String, String>,
    counts: BTreeMap<&'static str, usize>,
}

impl Tokens {
    fn add(&mut self, token: &str, kind: &'static str) {
        if token.is_empty() || self.placeholders.contains_key(token) {
            return;
        }
        let n = self.counts.entry(kind).or_insert(0);
        *n += 1;
        let name = format!("{kind}-{n}");
        self.placeholders
            .insert(token.to_owned(), placeholder(token, &name));
    }

    /// Every `*token` field of a JSON text, at any depth (files, refresh answers).
    fn collect_from(&mut self, text: &str) {
        fn walk(v: &Value, tokens: &mut Tokens) {
            match v {
                Value::Object(map) => {
                    for (k, v) in map {
                        match (k.as_str(), v) {
                            ("access_token", Value::String(t)) => tokens.add(t, "access-token"),
                            ("refresh_token", Value::String(t)) => tokens.add(t, "refresh-token"),
                            ("id_token", Value::String(t)) => tokens.add(t, "id-token"),
                            (k, Value::String(t)) if k.ends_with("token") => tokens.add(t, "token"),
                            _ => walk(v, tokens),
                        }
                    }
                }
                Value::Array(items) => items.iter().for_each(|i| walk(i, tokens)),
                _ => {}
            }
        }
        match serde_json::from_str::<Value>(text) {
            Ok(v) => walk(&v, self),
            // A broken file may still hold tokens: every long run of token characters is
            // taken for one.
            Err(_) => {
                let token_char = |c: char| c.is_ascii_alphanumeric() || "._~+/=-".contains(c);
                for run in text.split(|c: char| !token_char(c)) {
                    if run.len() >= MIN_TOKEN_RUN {
                        self.add(run, "token");
                    }
                }
            }
        }
    }

    /// `text` with every token replaced; an error if one is still there after.
    fn replace_in(&self, text: &str) -> Result<String, String> {
        let mut pairs: Vec<(String, &String)> = self
            .placeholders
            .iter()
            .map(|(token, ph)| {
                // As the token appears inside a JSON string.
                let quoted = serde_json::to_string(token).expect("a string serialises");
                (quoted[1..quoted.len() - 1].to_owned(), ph)
            })
            .collect();
        // Longest first, so no token is replaced inside a longer one.
        pairs.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        let mut out = text.to_owned();
        for (token, ph) in &pairs {
            out = out.replace(token.as_str(), ph);
        }
        if pairs.iter().any(|(token, _)| out.contains(token.as_str())) {
            return Err("a token could not be replaced; nothing was recorded".into());
        }
        Ok(out)
    }
}

/// A token's stand-in: a JWT keeping the claims gibby reads, or a plain name.
fn placeholder(token: &str, name: &str) -> String {
    let claims = Claims::of(token);
    if claims == Claims::default() {
        return name.to_owned();
    }
    let mut payload = json!({ PLACEHOLDER_CLAIM: name });
    if let Some(exp) = claims.exp {
        payload["exp"] = json!(exp);
    }
    if let Some(iat) = claims.iat {
        payload["iat"] = json!(iat);
    }
    if let Some(id) = claims.account_id {
        payload["https://api.openai.com/auth"] = json!({ "chatgpt_account_id": id });
    }
    if let Some(email) = claims.email {
        payload["https://api.openai.com/profile"] = json!({ "email": email });
    }
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        part(&json!({"alg": "none", "typ": "JWT"})),
        part(&payload),
        URL_SAFE_NO_PAD.encode("placeholder")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_keep_the_claims_gibby_reads_and_nothing_else() {
        let payload = json!({
            "exp": 1_800_864_000i64, "iat": 1_800_000_000i64, "jti": "secret-session",
            "https://api.openai.com/auth": {"chatgpt_account_id": "acc-1", "chatgpt_user_id": "u"},
            "https://api.openai.com/profile": {"email": "a@example.com"},
        });
        let jwt = format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let ph = placeholder(&jwt, "access-token-1");
        assert_eq!(Claims::of(&ph), Claims::of(&jwt));
        assert!(!ph.contains("c2ln"));
        assert_eq!(crate::replay::token_label(&ph), "access-token-1 (jwt)");
        assert_eq!(
            placeholder("opaque-secret-value", "refresh-token-2"),
            "refresh-token-2"
        );
    }

    #[test]
    fn a_broken_file_loses_its_long_runs() {
        let mut tokens = Tokens::default();
        let text =
            "{\"accounts\": [{\"access_token\": \"eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.c2ln\", ";
        tokens.collect_from(text);
        let out = tokens.replace_in(text).unwrap();
        assert!(!out.contains("eyJhbGciOiJSUzI1NiJ9"), "{out}");
        assert!(out.contains("\"accounts\""), "{out}");
    }

    #[test]
    fn every_token_is_replaced_longest_first() {
        let mut tokens = Tokens::default();
        tokens.collect_from(
            r#"{"accounts": [{"access_token": "secret-a", "refresh_token": "secret-ab"}]}"#,
        );
        tokens.add("secret-abc", "refresh-token");
        let text = r#"{"x": "secret-abc secret-ab secret-a"}"#;
        assert_eq!(
            tokens.replace_in(text).unwrap(),
            r#"{"x": "refresh-token-2 refresh-token-1 access-token-1"}"#
        );
    }
}
