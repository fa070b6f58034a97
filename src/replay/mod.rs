//! The replay interpreter: runs a [`Scenario`] through the core and writes a readable trace.
//!
//! It performs the core's effects from the scenario alone: files live in memory (starting
//! from the scenario's, changed by gibby's writes and by the scenario's edits), the lock is
//! a flag, and every upstream call takes the scenario's next answer, which must be for the
//! same call, account and token. Anything else is a problem and stops the replay. Like the
//! live interpreter it decides nothing: every decision is the core's.
//!
//! Tokens in the trace are shown by name when they are placeholders (see [`token_label`]),
//! else only by length.

pub mod scenario;

use std::collections::VecDeque;
use std::fmt::Write as _;

use serde_json::Value;

use crate::core::{Effect, Event, FileRead, Outcome, Reply, StateFile, TokenRequest, WriteResult};
use crate::model::{Account, AccountsFile, Claims, FailedFile, Secret, Usage, Window};
pub use scenario::{Answer, CallKind, Expected, Scenario};

/// The claim a placeholder JWT carries its name in (recordings keep a token's claims).
pub const PLACEHOLDER_CLAIM: &str = "gibby_placeholder";

/// A replayed scenario: its trace, and what did not go as the scenario said.
#[derive(Debug)]
pub struct Report {
    pub trace: String,
    pub problems: Vec<String>,
    /// accounts.json and failed.json as the last request replayed left them.
    pub files_after: (FileRead, FileRead),
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// How a token appears in a trace: its placeholder name, or only its length.
pub fn token_label(token: &str) -> String {
    let plain = token.len() <= 40
        && !token.is_empty()
        && token
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_:".contains(c));
    if plain {
        return token.to_owned();
    }
    if let Some(name) = placeholder_claim(token) {
        return format!("{name} (jwt)");
    }
    format!("<token, {} chars>", token.len())
}

fn placeholder_claim(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let json: Value = serde_json::from_slice(&bytes).ok()?;
    json.get(PLACEHOLDER_CLAIM)?.as_str().map(str::to_owned)
}

fn secret(token: &Secret) -> String {
    token_label(token.expose())
}

struct Replay<'a> {
    scenario: &'a Scenario,
    accounts: FileRead,
    failed: FileRead,
    answers: VecDeque<&'a Answer>,
    locked: bool,
    out: String,
    problems: Vec<String>,
}

/// Replays every request of `scenario`, in order, on the same files.
pub fn replay(scenario: &Scenario) -> Report {
    let (accounts, failed) = scenario.files.read();
    let mut r = Replay {
        scenario,
        accounts,
        failed,
        answers: scenario.upstream.iter().collect(),
        locked: false,
        out: String::new(),
        problems: Vec::new(),
    };
    r.header();
    for (n, spec) in scenario.requests.iter().enumerate() {
        if !r.request(n + 1, spec) {
            break;
        }
    }
    if r.problems.is_empty() && !r.answers.is_empty() {
        let left: Vec<String> = r
            .answers
            .iter()
            .map(|a| format!("{} {}", a.call.name(), a.email))
            .collect();
        r.problem(format!(
            "{} upstream answer(s) never asked for: {}",
            left.len(),
            left.join(", ")
        ));
    }
    let verdict = if r.problems.is_empty() {
        "replay: ok".to_owned()
    } else {
        format!("replay: {} problem(s)", r.problems.len())
    };
    r.line(0, &verdict);
    Report {
        trace: r.out,
        problems: r.problems,
        files_after: (r.accounts, r.failed),
    }
}

impl Replay<'_> {
    fn line(&mut self, indent: usize, text: &str) {
        for (i, l) in text.lines().enumerate() {
            let pad = if i == 0 { indent } else { indent + 2 };
            let _ = writeln!(self.out, "{:pad$}{l}", "");
        }
    }

    fn problem(&mut self, why: String) {
        self.line(2, &format!("PROBLEM: {why}"));
        self.problems.push(why);
    }

    fn header(&mut self) {
        let s = self.scenario;
        if !s.description.is_empty() {
            self.line(0, &format!("# {}", s.description));
        }
        self.line(
            0,
            &format!(
                "now {} · 5-hour limit {}% · usage stale after {} s",
                s.now, s.settings.exhausted_threshold, s.settings.usage_stale_seconds
            ),
        );
        let (accounts, failed) = (self.accounts.clone(), self.failed.clone());
        self.line(
            0,
            &format!(
                "accounts.json: {}",
                describe_file(StateFile::Accounts, &accounts)
            ),
        );
        self.line(
            0,
            &format!("failed.json: {}", describe_file(StateFile::Failed, &failed)),
        );
    }

    /// Runs one request; `false` when the replay cannot go on.
    fn request(&mut self, n: usize, spec: &scenario::RequestSpec) -> bool {
        let now = spec.now.unwrap_or(self.scenario.now);
        self.out.push('\n');
        self.line(0, &format!("request {n} at {now}"));
        let mut request = TokenRequest::new(now, self.scenario.settings.policy());
        let mut step = 0;
        while let Some(effect) = request.poll_effect() {
            step += 1;
            let mut failing_write = None;
            for edit in spec.edits.iter().filter(|e| e.before_effect == step) {
                match (&edit.write_fails, edit.read()) {
                    (Some(why), _) => failing_write = Some(why.clone()),
                    (None, Ok(content)) => {
                        let file = match edit.file {
                            scenario::FileName::Accounts => StateFile::Accounts,
                            scenario::FileName::Failed => StateFile::Failed,
                        };
                        let before = self.slot(file).clone();
                        self.line(2, &format!("(another writer changes {})", file.name()));
                        self.show_change(file, &before, &content);
                        *self.slot(file) = content;
                    }
                    (None, Err(why)) => {
                        self.problem(why);
                        return false;
                    }
                }
            }
            self.line(2, &format!("{step}. {}", describe_effect(&effect)));
            let event = match self.perform(effect, failing_write) {
                Ok(event) => event,
                Err(why) => {
                    self.problem(why);
                    return false;
                }
            };
            request.handle(event);
            let stage = request.stage();
            self.line(5, &format!("stage: {stage}"));
        }
        for warning in request.warnings().to_vec() {
            self.line(2, &format!("warning: {warning}"));
        }
        let Some(outcome) = request.into_outcome() else {
            self.problem("the request ended without an outcome".into());
            return false;
        };
        let got = Expected::of(&outcome);
        self.line(2, &format!("outcome: {}", describe_outcome(&outcome)));
        if got == spec.expect {
            self.line(2, "as expected");
        } else {
            let expected = describe_expected(&spec.expect);
            self.problem(format!(
                "request {n} expected {expected}, got {}",
                describe_expected(&got)
            ));
        }
        if let Some(after) = &spec.files_after {
            self.check_files_after(n, after);
        }
        true
    }

    /// Compares the files as the request left them with the scenario's `files_after`: a
    /// file given as JSON must parse to the same content, a file given as text must hold
    /// that exact text, a file left out must be missing.
    fn check_files_after(&mut self, n: usize, after: &scenario::Files) {
        let (want_accounts, want_failed) = after.read();
        let mut same = true;
        for (file, want) in [
            (StateFile::Accounts, want_accounts),
            (StateFile::Failed, want_failed),
        ] {
            let got = self.slot(file).clone();
            let parsed_expected = match file {
                StateFile::Accounts => matches!(after.accounts, Some(scenario::Content::Parsed(_))),
                StateFile::Failed => matches!(after.failed, Some(scenario::Content::Parsed(_))),
            };
            if files_match(file, &want, &got, parsed_expected) {
                continue;
            }
            same = false;
            let mut why = format!(
                "request {n}: {} after the request differs from files_after\nexpected: {}\ngot: {}",
                file.name(),
                describe_file(file, &want),
                describe_file(file, &got)
            );
            let changes = file_changes(file, &want, &got);
            if !changes.is_empty() {
                why += "\nfrom expected to got:";
                for change in changes {
                    why += &format!("\n  {change}");
                }
            }
            self.problem(why);
        }
        if same {
            self.line(2, "files after the request as expected");
        }
    }

    fn slot(&mut self, file: StateFile) -> &mut FileRead {
        match file {
            StateFile::Accounts => &mut self.accounts,
            StateFile::Failed => &mut self.failed,
        }
    }

    fn perform(&mut self, effect: Effect, failing_write: Option<String>) -> Result<Event, String> {
        Ok(match effect {
            Effect::ReadFiles => Event::FilesRead {
                accounts: self.accounts.clone(),
                failed: self.failed.clone(),
            },
            Effect::Lock => {
                if self.locked {
                    return Err("the lock was taken twice".into());
                }
                self.locked = true;
                Event::Locked
            }
            Effect::Unlock => {
                self.locked = false;
                Event::Unlocked
            }
            Effect::Write {
                file,
                content,
                expected,
            } => {
                if !self.locked {
                    return Err(format!("{} written without the lock", file.name()));
                }
                let result = if let Some(why) = failing_write {
                    self.line(5, &format!("✗ the write fails: {why}"));
                    WriteResult::Failed(why)
                } else if *self.slot(file) != expected {
                    self.line(5, "✗ conflict: the file changed since it was read");
                    WriteResult::Conflict
                } else {
                    let before = self.slot(file).clone();
                    let after = FileRead::Text(content.0.into());
                    self.show_change(file, &before, &after);
                    *self.slot(file) = after;
                    WriteResult::Done
                };
                Event::Written { file, result }
            }
            Effect::FetchUsage {
                email,
                access_token,
                ..
            } => {
                let reply = self.answer(CallKind::Usage, &email, &access_token)?;
                Event::UsageFetched {
                    email,
                    access_token,
                    reply,
                }
            }
            Effect::RefreshToken {
                email,
                refresh_token,
            } => {
                let reply = self.answer(CallKind::Refresh, &email, &refresh_token)?;
                Event::TokenRefreshed {
                    email,
                    refresh_token,
                    reply,
                }
            }
            Effect::Validate {
                email,
                access_token,
                ..
            } => {
                let reply = self.answer(CallKind::Validate, &email, &access_token)?;
                Event::ValidationAnswered {
                    email,
                    access_token,
                    reply,
                }
            }
        })
    }

    /// The scenario's next answer, which must be for this very call.
    fn answer(&mut self, call: CallKind, email: &str, token: &Secret) -> Result<Reply, String> {
        let asked = format!("{} {email} with {}", call.name(), secret(token));
        let Some(next) = self.answers.pop_front() else {
            return Err(format!(
                "unexpected call: {asked} (no upstream answer left)"
            ));
        };
        if next.call != call || next.email != email || next.token != token.expose() {
            return Err(format!(
                "unexpected call: {asked}; the scenario's next answer is for {} {} with {}",
                next.call.name(),
                next.email,
                token_label(&next.token)
            ));
        }
        let reply = next.reply()?;
        self.line(5, &format!("← {}", describe_reply(&reply)));
        Ok(reply)
    }

    fn show_change(&mut self, file: StateFile, before: &FileRead, after: &FileRead) {
        for change in file_changes(file, before, after) {
            self.line(5, &change);
        }
    }
}

/// Whether a file the request left matches what `files_after` says: the same content
/// when the scenario gives it as JSON, else the same bytes (or both missing).
fn files_match(file: StateFile, want: &FileRead, got: &FileRead, parsed: bool) -> bool {
    match (want, got) {
        (FileRead::Text(w), FileRead::Text(g)) if parsed => match file {
            StateFile::Accounts => AccountsFile::parse(g).ok() == AccountsFile::parse(w).ok(),
            StateFile::Failed => FailedFile::parse(g).ok() == FailedFile::parse(w).ok(),
        },
        (w, g) => w == g,
    }
}

fn describe_effect(effect: &Effect) -> String {
    match effect {
        Effect::ReadFiles => "read the files".into(),
        Effect::Lock => "lock".into(),
        Effect::Unlock => "unlock".into(),
        Effect::Write { file, .. } => format!("write {}", file.name()),
        Effect::FetchUsage {
            email,
            access_token,
            ..
        } => format!("fetch usage of {email} with {}", secret(access_token)),
        Effect::RefreshToken {
            email,
            refresh_token,
        } => format!(
            "refresh the token of {email} with {}",
            secret(refresh_token)
        ),
        Effect::Validate {
            email,
            access_token,
            ..
        } => format!("validate {email} with {}", secret(access_token)),
    }
}

/// A reply with every token in its body shown by its label.
fn describe_reply(reply: &Reply) -> String {
    let http = match reply {
        Reply::Transport(why) => return format!("no answer: {why}"),
        Reply::Http(h) => h,
    };
    let mut text = format!("{}", http.status);
    match http.content_type.as_deref() {
        Some("application/json") => {}
        Some(t) => text += &format!(" ({t})"),
        None => text += " (no content type)",
    }
    if http.challenge {
        text += " (cf-mitigated: challenge)";
    }
    let body = match serde_json::from_str::<Value>(&http.body) {
        Ok(mut v) => {
            label_tokens(&mut v);
            v.to_string()
        }
        Err(_) => http.body.trim().to_owned(),
    };
    if !body.is_empty() {
        let cut: String = body.chars().take(240).collect();
        let more = if cut.len() < body.len() { "…" } else { "" };
        text += &format!(" {cut}{more}");
    }
    text
}

fn label_tokens(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match v {
                    Value::String(s) if k.ends_with("token") => *s = token_label(s),
                    other => label_tokens(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(label_tokens),
        _ => {}
    }
}

fn describe_file(file: StateFile, read: &FileRead) -> String {
    let text = match read {
        FileRead::Missing => return "missing".into(),
        FileRead::Unreadable(why) => return format!("unreadable ({why})"),
        FileRead::Text(t) => t,
    };
    match file {
        StateFile::Accounts => match AccountsFile::parse(text) {
            Ok(f) => {
                let mut lines = vec![format!(
                    "active {}",
                    f.active_account.as_deref().unwrap_or("none")
                )];
                lines.extend(f.accounts.iter().map(describe_account));
                lines.join("\n")
            }
            Err(e) => format!("does not parse ({e})"),
        },
        StateFile::Failed => match FailedFile::parse(text) {
            Ok(f) if f.accounts.is_empty() => "no records".into(),
            Ok(f) => {
                let lines: Vec<String> = f.accounts.iter().map(describe_account).collect();
                format!("{} record(s)\n{}", f.accounts.len(), lines.join("\n"))
            }
            Err(e) => format!("does not parse ({e})"),
        },
    }
}

fn describe_account(a: &Account) -> String {
    let refresh_at = a
        .token_refresh_at
        .map_or("now (unset)".into(), |t| t.to_string());
    let rt = if a.refresh_token.is_empty() {
        "no refresh token".to_owned()
    } else {
        format!("refresh {}", secret(&a.refresh_token))
    };
    format!(
        "{}: {}{}, access {}, {rt}, refresh at {refresh_at}",
        a.email,
        if a.disabled { "DISABLED, " } else { "" },
        describe_usage(&a.usage, a.usage_checked_at),
        secret(&a.access_token),
    )
}

fn describe_usage(usage: &Option<Usage>, checked: Option<i64>) -> String {
    let Some(u) = usage else {
        return match checked {
            Some(t) => format!("no usage (checked at {t})"),
            None => "no usage".into(),
        };
    };
    let w = |w: &Option<Window>| match w {
        Some(w) => format!("{}% until {}", w.used_percent, w.reset_at),
        None => "none".into(),
    };
    let checked = checked.map_or("never".into(), |t| t.to_string());
    format!(
        "5-hour {}, weekly {}, checked at {checked}",
        w(&u.primary),
        w(&u.secondary)
    )
}

/// What a write (or another writer) changed, line by line.
fn file_changes(file: StateFile, before: &FileRead, after: &FileRead) -> Vec<String> {
    let text = |r: &FileRead| match r {
        FileRead::Text(t) => Some(t.clone()),
        _ => None,
    };
    match file {
        StateFile::Accounts => {
            let parse = |r: &FileRead| text(r).and_then(|t| AccountsFile::parse(&t).ok());
            match (parse(before), parse(after)) {
                (Some(b), Some(a)) => accounts_diff(&b, &a),
                _ => vec![format!(
                    "accounts.json is now: {}",
                    describe_file(file, after)
                )],
            }
        }
        StateFile::Failed => {
            let parse = |r: &FileRead| match r {
                FileRead::Missing => Some(FailedFile::default()),
                FileRead::Text(t) => FailedFile::parse(t).ok(),
                FileRead::Unreadable(_) => None,
            };
            match (parse(before), parse(after)) {
                (Some(b), Some(a)) if a.accounts.starts_with(&b.accounts) => a.accounts
                    [b.accounts.len()..]
                    .iter()
                    .map(|x| format!("+ {}", describe_account(x)))
                    .collect(),
                _ => vec![format!(
                    "failed.json is now: {}",
                    describe_file(file, after)
                )],
            }
        }
    }
}

fn accounts_diff(before: &AccountsFile, after: &AccountsFile) -> Vec<String> {
    let mut lines = Vec::new();
    if before.active_account != after.active_account {
        let show = |a: &Option<String>| a.clone().unwrap_or_else(|| "none".into());
        lines.push(format!(
            "active_account: {} → {}",
            show(&before.active_account),
            show(&after.active_account)
        ));
    }
    for b in &before.accounts {
        match after.find(&b.email) {
            None => lines.push(format!("- {} removed", b.email)),
            Some(a) if a != b => {
                let mut fields = Vec::new();
                if a.access_token != b.access_token {
                    fields.push(format!(
                        "access {} → {}",
                        secret(&b.access_token),
                        secret(&a.access_token)
                    ));
                }
                if a.refresh_token != b.refresh_token {
                    fields.push(format!(
                        "refresh {} → {}",
                        secret(&b.refresh_token),
                        secret(&a.refresh_token)
                    ));
                }
                if a.token_refresh_at != b.token_refresh_at {
                    let t = |t: Option<i64>| t.map_or("unset".into(), |t| t.to_string());
                    fields.push(format!(
                        "refresh at {} → {}",
                        t(b.token_refresh_at),
                        t(a.token_refresh_at)
                    ));
                }
                if (&a.usage, a.usage_checked_at) != (&b.usage, b.usage_checked_at) {
                    fields.push(format!(
                        "usage {}",
                        describe_usage(&a.usage, a.usage_checked_at)
                    ));
                }
                if a.disabled != b.disabled {
                    fields.push(format!("disabled {}", a.disabled));
                }
                lines.push(format!("~ {}: {}", b.email, fields.join("; ")));
            }
            Some(_) => {}
        }
    }
    for a in &after.accounts {
        if before.find(&a.email).is_none() {
            lines.push(format!("+ {}", describe_account(a)));
        }
    }
    if lines.is_empty() {
        lines.push("(same accounts)".into());
    }
    lines
}

fn describe_outcome(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Token {
            answer,
            passed_over,
            ..
        } => {
            let claims = Claims::of(answer.access_token().expose());
            let mut text = format!(
                "200, token of {} ({})",
                answer.email(),
                secret(answer.access_token())
            );
            if let Some(id) = claims.account_id {
                text += &format!(", account id {id}");
            }
            for p in passed_over {
                text += &format!("\n  passed over {}: {}", p.email, p.reason);
            }
            text
        }
        Outcome::NoUsableAccount {
            passed_over,
            retry_after,
        } => {
            let mut text = "503 no_usable_account".to_owned();
            if let Some(s) = retry_after {
                text += &format!(", Retry-After {s}");
            }
            for p in passed_over {
                text += &format!("\n  {}: {}", p.email, p.reason);
            }
            text
        }
        Outcome::InvalidStateFile { detail } => format!("503 invalid_state_file: {detail}"),
    }
}

fn describe_expected(e: &Expected) -> String {
    serde_json::to_string(e).expect("serialises")
}
