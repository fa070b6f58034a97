//! The two state files, exactly as SPEC.md section 1 describes them.
//!
//! Parsing is strict (unknown fields are errors that name the field and the position)
//! and writing is canonical: pretty-printed with a 2-space indent, every account with
//! all seven fields in the documented order (`null` where a value is absent), and a
//! trailing newline.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use super::Secret;

pub const ACCOUNTS_FILE: &str = "accounts.json";
pub const FAILED_FILE: &str = "failed.json";

/// `accounts.json`.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsFile {
    pub active_account: Option<String>,
    pub accounts: Vec<Account>,
}

/// `failed.json`: an append-only record of accounts the upstream declared invalid.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailedFile {
    pub accounts: Vec<Account>,
}

/// One account. Absent and `null` read the same; gibby writes `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub email: String,
    pub access_token: Secret,
    pub refresh_token: Secret,
    /// Absent means "refresh now".
    #[serde(default)]
    pub token_refresh_at: Option<i64>,
    #[serde(default)]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub usage_checked_at: Option<i64>,
    #[serde(default)]
    pub disabled: bool,
}

/// The two usage windows. `None` means the plan has no such window.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// The short (5-hour) window.
    #[serde(default)]
    pub primary: Option<Window>,
    /// The long (weekly) window.
    #[serde(default)]
    pub secondary: Option<Window>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Kept as the JSON number it was written as, so `72` stays `72` and `94.99` stays `94.99`.
    pub used_percent: Number,
    pub reset_at: i64,
}

impl Window {
    pub fn percent(&self) -> f64 {
        self.used_percent.as_f64().unwrap_or(0.0)
    }
}

/// A state file that cannot be trusted: it is never overwritten, and `/token` answers 503
/// with this message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct FileError {
    pub file: &'static str,
    pub problem: String,
}

impl FileError {
    fn new(file: &'static str, problem: impl Into<String>) -> Self {
        FileError {
            file,
            problem: problem.into(),
        }
    }
}

impl AccountsFile {
    /// Parses and validates `accounts.json`; every problem names its position.
    pub fn parse(text: &str) -> Result<Self, FileError> {
        Self::check(text).map_err(|problems| FileError::new(ACCOUNTS_FILE, problems.join("; ")))
    }

    /// Every problem of the text, each with its position, or the file when there are none.
    pub fn check(text: &str) -> Result<Self, Vec<String>> {
        let (mut top, mut problems, duplicates) = object(text, &["active_account", "accounts"])?;
        let active_account = match top.remove("active_account") {
            None | Some(Value::Null) => None,
            Some(Value::String(email)) => Some(email),
            Some(other) => {
                problems.push(format!(
                    "active_account must be a string or null, found {}",
                    shown_value(&other)
                ));
                None
            }
        };
        let indexed = accounts(
            top.remove("accounts"),
            Emails::Addresses,
            &duplicates,
            &mut problems,
        );
        for (n, (i, account)) in indexed.iter().enumerate() {
            if let Some((first, _)) = indexed[..n].iter().find(|(_, a)| a.email == account.email) {
                problems.push(format!(
                    "{}: duplicate email, already used by accounts[{first}]",
                    position(*i, Some(&account.email))
                ));
            }
        }
        let accounts = indexed.into_iter().map(|(_, a)| a).collect();
        if problems.is_empty() {
            Ok(AccountsFile {
                active_account,
                accounts,
            })
        } else {
            Err(problems)
        }
    }

    pub fn find(&self, email: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| a.email == email)
    }

    pub fn find_mut(&mut self, email: &str) -> Option<&mut Account> {
        self.accounts.iter_mut().find(|a| a.email == email)
    }

    /// The canonical text gibby writes.
    pub fn to_text(&self) -> String {
        to_text(self)
    }
}

impl FailedFile {
    /// Parses `failed.json`. Emails may repeat here: an account can fail more than once.
    pub fn parse(text: &str) -> Result<Self, FileError> {
        Self::check(text).map_err(|problems| FileError::new(FAILED_FILE, problems.join("; ")))
    }

    pub fn check(text: &str) -> Result<Self, Vec<String>> {
        let (mut top, mut problems, duplicates) = object(text, &["accounts"])?;
        let accounts = accounts(
            top.remove("accounts"),
            Emails::Any,
            &duplicates,
            &mut problems,
        );
        if problems.is_empty() {
            let accounts = accounts.into_iter().map(|(_, a)| a).collect();
            Ok(FailedFile { accounts })
        } else {
            Err(problems)
        }
    }

    pub fn to_text(&self) -> String {
        to_text(self)
    }
}

type Problems = Vec<String>;

/// The top-level object, and a problem for every key not in `known`. A text that is not
/// JSON at all is one problem, with serde's line and column.
/// The top-level object, the problems found in it, and the repeated keys inside accounts.
type TopLevel = (Map<String, Value>, Problems, Vec<Duplicate>);

fn object(text: &str, known: &[&str]) -> Result<TopLevel, Problems> {
    if text.trim().is_empty() {
        return Err(vec!["the file is empty".into()]);
    }
    let top = match serde_json::from_str(text) {
        Ok(Value::Object(top)) => top,
        Ok(other) => {
            return Err(vec![format!(
                "the top level must be an object, found {}",
                kind(&other)
            )])
        }
        Err(e) => return Err(vec![redact_strings(&e.to_string())]),
    };
    let expected: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
    let mut problems: Problems = top
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| {
            format!(
                "unknown field {} at the top level, expected {}",
                shown_field(k, '`'),
                expected.join(" or ")
            )
        })
        .collect();
    // The accounts' own are reported with the account's position, by `accounts`.
    let (in_accounts, elsewhere) = duplicate_keys(text)
        .into_iter()
        .partition::<Vec<_>, _>(|d| d.account.is_some());
    for d in elsewhere {
        match d.within.as_str() {
            "" => problems.push(format!(
                "duplicate field {} at the top level",
                shown_field(&d.key, '"')
            )),
            within => problems.push(format!(
                "duplicate field {} in {within}",
                shown_field(&d.key, '"')
            )),
        }
    }
    Ok((top, problems, in_accounts))
}

/// A key that occurs twice in one object: in account `account` (at `within` inside it,
/// `usage.primary` or empty), or outside the accounts (at `within`, empty for the top level).
#[derive(Debug, PartialEq)]
struct Duplicate {
    account: Option<usize>,
    within: String,
    key: String,
}

/// Every repeated key of every object in `text`, which is known to be JSON. serde_json
/// keeps the last value of a repeated key and gibby's next write would drop the others, so
/// a repeat is a problem. One pass over the text that keeps only the keys: it costs a
/// fraction of the parse proper (figures in DESIGN.md).
fn duplicate_keys(text: &str) -> Vec<Duplicate> {
    let mut walk = Walk::default();
    let mut de = serde_json::Deserializer::from_str(text);
    // The text parsed as JSON already, so this cannot fail; if it did, it finds nothing.
    let _ = serde::de::DeserializeSeed::deserialize(Step(&mut walk), &mut de);
    walk.found
}

#[derive(Default)]
struct Walk {
    path: Vec<Segment>,
    found: Vec<Duplicate>,
}

enum Segment {
    Key(String),
    Index(usize),
}

impl Walk {
    fn found(&mut self, key: String) {
        let (account, rest) = match self.path.as_slice() {
            [Segment::Key(top), Segment::Index(i), rest @ ..] if top == "accounts" => {
                (Some(*i), rest)
            }
            all => (None, all),
        };
        let mut within = String::new();
        for segment in rest {
            match segment {
                Segment::Key(k) if within.is_empty() => within.push_str(k),
                Segment::Key(k) => {
                    within.push('.');
                    within.push_str(k);
                }
                Segment::Index(i) => within.push_str(&format!("[{i}]")),
            }
        }
        self.found.push(Duplicate {
            account,
            within,
            key,
        });
    }
}

/// The keys met so far in one object: a list for the first 32 (objects here have a handful,
/// and searching a few beats hashing them, threefold), a set for the rest, so a hand-made
/// object with very many keys does not take quadratic time.
#[derive(Default)]
struct Keys {
    few: Vec<String>,
    rest: std::collections::BTreeSet<String>,
}

impl Keys {
    fn contains(&self, key: &str) -> bool {
        self.few.iter().any(|k| k == key) || self.rest.contains(key)
    }

    fn insert(&mut self, key: String) {
        if self.few.len() < 32 {
            self.few.push(key);
        } else {
            self.rest.insert(key);
        }
    }
}

/// One value of the walk: objects and arrays are entered, everything else skipped.
struct Step<'a>(&'a mut Walk);

impl<'de> serde::de::DeserializeSeed<'de> for Step<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Step<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            self.0.path.push(Segment::Index(i));
            let more = seq.next_element_seed(Step(&mut *self.0))?;
            self.0.path.pop();
            if more.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = Keys::default();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                self.0.found(key.clone());
            }
            self.0.path.push(Segment::Key(key));
            map.next_value_seed(Step(&mut *self.0))?;
            if let Some(Segment::Key(key)) = self.0.path.pop() {
                seen.insert(key);
            }
        }
        Ok(())
    }
}

/// Whether a file's emails must look like addresses. accounts.json's must: a token pasted
/// into `email` would otherwise pass as a name and be shown by `status`, the log and
/// `/token`. failed.json keeps whatever was moved there, so an old one stays readable.
#[derive(Clone, Copy, PartialEq)]
enum Emails {
    Addresses,
    Any,
}

/// `accounts[i] (email)`, or only `accounts[i]` when the email is missing or holds no `@`:
/// a value that is not an address is never echoed.
fn position(i: usize, email: Option<&str>) -> String {
    match email {
        Some(email) if email.contains('@') => format!("accounts[{i}] ({})", shown_email(email)),
        _ => format!("accounts[{i}]"),
    }
}

/// Each account of the `accounts` array with its index; a problem (with
/// `accounts[i] (email)`) for each one that does not fit the schema.
fn accounts(
    value: Option<Value>,
    emails: Emails,
    duplicates: &[Duplicate],
    problems: &mut Vec<String>,
) -> Vec<(usize, Account)> {
    let items = match value {
        Some(Value::Array(items)) => items,
        None => {
            problems.push("missing field `accounts`".into());
            return Vec::new();
        }
        Some(other) => {
            problems.push(format!("accounts must be an array, found {}", kind(&other)));
            return Vec::new();
        }
    };
    let mut accounts = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let at = position(i, item.get("email").and_then(Value::as_str));
        for d in duplicates.iter().filter(|d| d.account == Some(i)) {
            problems.push(match d.within.as_str() {
                "" => format!("{at}: duplicate field {}", shown_field(&d.key, '"')),
                within => format!(
                    "{at}: duplicate field {} in {within}",
                    shown_field(&d.key, '"')
                ),
            });
        }
        match Account::deserialize(item) {
            Ok(account) => {
                problems.extend(account_problems(&at, &account, emails));
                accounts.push((i, account));
            }
            Err(e) => problems.push(format!("{at}: {}", redact_strings(&e.to_string()))),
        }
    }
    accounts
}

/// An email as problems show it: itself when it looks like one (or is too short to be a
/// token), else only its length: a token pasted into the wrong field must not end up in a
/// 503, a log line or `check`.
pub fn shown_email(email: &str) -> String {
    let looks_like_one = (email.len() < 24 || (email.contains('@') && email.len() <= 254))
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if looks_like_one {
        email.to_owned()
    } else {
        format!("a string of {} characters", email.chars().count())
    }
}

/// Why `email` cannot be an account's key, if it cannot: it must look like an address (a
/// token pasted there would be shown everywhere an email is), and hold no whitespace,
/// control or text-direction characters (they would forge or garble log lines and the
/// `status` table). The email itself is never part of the answer.
pub fn email_problem(email: &str) -> Option<String> {
    let n = email.chars().count();
    if !email.contains('@') {
        return Some(format!(
            "email must be an email address ({n} characters, no @)"
        ));
    }
    let odd = |c: char| {
        c.is_whitespace()
            || c.is_control()
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
    };
    email.chars().any(odd).then(|| {
        format!("email must be an email address ({n} characters, with whitespace or control characters)")
    })
}

/// A value as problems show it: numbers, booleans and null as they are, anything that may
/// hold a string only by its kind.
fn shown_value(value: &Value) -> String {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => value.to_string(),
        other => kind(other).to_owned(),
    }
}

/// A field name as problems show it, in `quote`s: a typo stays visible, but a long name (a
/// token pasted as a key) or one with whitespace or control characters only by its length.
pub fn shown_field(name: &str, quote: char) -> String {
    let n = name.chars().count();
    if n < 24 && !name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        format!("{quote}{name}{quote}")
    } else {
        format!("(a name of {n} characters)")
    }
}

/// serde names an unknown field in backquotes: shown as [`shown_field`] shows it.
fn redact_unknown_field(message: &str) -> String {
    const MARK: &str = "unknown field `";
    let Some(at) = message.find(MARK) else {
        return message.to_owned();
    };
    let rest = &message[at + MARK.len()..];
    match rest.find('`') {
        Some(end) => format!(
            "{}unknown field {}{}",
            &message[..at],
            shown_field(&rest[..end], '`'),
            &rest[end + 1..]
        ),
        None => format!("{}unknown field (…)", &message[..at]),
    }
}

/// serde's messages quote the string they met (`invalid type: string "…", expected i64`);
/// the string may be a token in the wrong field, so only its length is kept. The position
/// and the kind of problem stay.
pub fn redact_strings(message: &str) -> String {
    const MARK: &str = "string \"";
    let message = &redact_unknown_field(message);
    let mut out = String::with_capacity(message.len());
    let mut rest = message.as_str();
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        let quoted = &rest[at + MARK.len()..];
        // The string is Debug-quoted: it ends at the first quote not escaped by a backslash;
        // an escape (`\n`, `\"`, `\u{1f600}`) counts as one character.
        let (mut chars, mut end) = (0usize, None);
        let (mut after_backslash, mut in_unicode) = (false, false);
        for (i, c) in quoted.char_indices() {
            if in_unicode {
                in_unicode = c != '}';
            } else if after_backslash {
                after_backslash = false;
                in_unicode = c == 'u';
            } else if c == '\\' {
                after_backslash = true;
                chars += 1;
            } else if c == '"' {
                end = Some(i);
                break;
            } else {
                chars += 1;
            }
        }
        match end {
            Some(end) => {
                out.push_str(&format!("string ({chars} characters)"));
                rest = &quoted[end + 1..];
            }
            // No closing quote: drop the rest rather than risk showing part of a token.
            None => {
                out.push_str("string (…)");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn account_problems(at: &str, a: &Account, emails: Emails) -> Vec<String> {
    let mut problems = Vec::new();
    if a.email.trim().is_empty() {
        problems.push(format!("{at}: email is empty"));
    } else if emails == Emails::Addresses {
        if let Some(problem) = email_problem(&a.email) {
            problems.push(format!("{at}: {problem}"));
        }
    }
    if a.access_token.is_empty() {
        problems.push(format!("{at}: access_token is empty"));
    }
    if let Some(usage) = &a.usage {
        for (name, window) in [("primary", &usage.primary), ("secondary", &usage.secondary)] {
            if let Some(w) = window {
                if !w.used_percent.as_f64().is_some_and(|p| p >= 0.0) {
                    problems.push(format!(
                        "{at}: usage.{name}.used_percent must be a number >= 0, found {}",
                        w.used_percent
                    ));
                }
            }
        }
    }
    problems
}

fn to_text<T: Serialize>(value: &T) -> String {
    // Serialising these plain structs cannot fail.
    let mut text = serde_json::to_string_pretty(value).expect("state files always serialise");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
  "active_account": "user@example.com",
  "accounts": [
    {
      "email": "user@example.com",
      "access_token": "at",
      "refresh_token": "rt",
      "token_refresh_at": 1710000000,
      "usage": {
        "primary": {
          "used_percent": 72,
          "reset_at": 1710018000
        },
        "secondary": {
          "used_percent": 94.99,
          "reset_at": 1710600000
        }
      },
      "usage_checked_at": 1710000000,
      "disabled": false
    }
  ]
}
"#;

    #[test]
    fn canonical_file_round_trips_byte_for_byte() {
        let file = AccountsFile::parse(SAMPLE).unwrap();
        assert_eq!(file.to_text(), SAMPLE);
    }

    /// DESIGN.md "Numbers": serde_json (without `arbitrary_precision`) keeps a number's
    /// value, not its text: a hand-written `72.50` is written back as `72.5`, `72.0` as
    /// `72.0`, `1e2` as `100.0`; integers stay integers. The object a move appends to
    /// failed.json is the account as gibby writes it, so it holds the same.
    #[test]
    fn hand_written_numbers_keep_their_value_not_their_text() {
        let cases = [
            ("72.50", "72.5"),
            ("72.0", "72.0"),
            ("1e2", "100.0"),
            ("72", "72"),
            ("94.99", "94.99"),
        ];
        for (written, kept) in cases {
            let text = SAMPLE.replace(
                "\"used_percent\": 72,",
                &format!("\"used_percent\": {written},"),
            );
            let file = AccountsFile::parse(&text).unwrap();
            let out = file.to_text();
            assert!(
                out.contains(&format!("\"used_percent\": {kept},")),
                "{written}: {out}"
            );
            let moved = FailedFile {
                accounts: file.accounts.clone(),
            }
            .to_text();
            assert!(
                moved.contains(&format!("\"used_percent\": {kept},")),
                "{written}: {moved}"
            );
        }
    }

    #[test]
    fn absent_fields_read_as_null_and_are_written_as_null() {
        let text = r#"{"active_account": null, "accounts": [{"email": "a@x", "access_token": "at", "refresh_token": ""}]}"#;
        let file = AccountsFile::parse(text).unwrap();
        let a = &file.accounts[0];
        assert_eq!(
            (a.token_refresh_at, &a.usage, a.usage_checked_at, a.disabled),
            (None, &None, None, false)
        );
        assert!(file.to_text().contains("\"token_refresh_at\": null"));
    }

    #[test]
    fn problems_name_the_file_and_the_position() {
        let cases = [
            ("", "accounts.json: the file is empty"),
            ("{\"accounts\": [", "accounts.json: EOF while parsing"),
            (
                "{\"accounts\": [], \"extra\": 1}",
                "accounts.json: unknown field `extra` at the top level",
            ),
            (
                "{\"accounts\": [{\"email\": \"a@x\", \"access_token\": \"x\", \"refresh_token\": \"y\", \"token\": 1}]}",
                "accounts.json: accounts[0] (a@x): unknown field `token`",
            ),
            (
                "{\"accounts\": [{\"email\": \"a@x\", \"access_token\": \"x\", \"refresh_token\": \"y\", \"usage_checked_at\": \"soon\"}]}",
                "accounts.json: accounts[0] (a@x): invalid type: string (4 characters), expected i64",
            ),
            ("[]", "accounts.json: the top level must be an object, found an array"),
            ("{\"accounts\": {}}", "accounts.json: accounts must be an array, found an object"),
            ("{}", "accounts.json: missing field `accounts`"),
            (
                "{\"accounts\": [{\"email\": \"a@x\", \"access_token\": \"x\", \"refresh_token\": \"y\"}, {\"email\": \"a@x\", \"access_token\": \"x\", \"refresh_token\": \"y\"}]}",
                "accounts.json: accounts[1] (a@x): duplicate email, already used by accounts[0]",
            ),
        ];
        for (text, expected) in cases {
            let err = AccountsFile::parse(text).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{text:?} gave {err:?}");
        }
        let err = AccountsFile::parse("{\n\"accounts\": [3,]}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2 column"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"{"accounts": [
            {"email": "a@x", "access_token": "x", "refresh_token": "y", "disabled": "no"},
            {"email": "b@x", "access_token": "", "refresh_token": "y"},
            {"email": "b@x", "access_token": "x", "refresh_token": "y", "usage": {"primary": {"used_percent": -1, "reset_at": 1}}}
        ], "active_account": 7}"#;
        let problems = AccountsFile::check(text).unwrap_err();
        assert_eq!(
            problems,
            [
                "active_account must be a string or null, found 7",
                "accounts[0] (a@x): invalid type: string (2 characters), expected a boolean",
                "accounts[1] (b@x): access_token is empty",
                "accounts[2] (b@x): usage.primary.used_percent must be a number >= 0, found -1",
                "accounts[2] (b@x): duplicate email, already used by accounts[1]",
            ]
        );
    }

    #[test]
    fn string_values_are_shown_only_by_length() {
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.c2lnbmF0dXJlLXNlY3JldA";
        let text = format!(
            r#"{{"active_account": ["{token}"], "accounts": [
            {{"email": "a@x", "access_token": "x", "refresh_token": "y", "usage_checked_at": "{token}"}},
            {{"email": "{token}", "access_token": "x", "refresh_token": "y", "disabled": "say \"hi\" \u00e9"}}
        ]}}"#
        );
        let problems = AccountsFile::check(&text).unwrap_err();
        assert_eq!(
            problems,
            [
                "active_account must be a string or null, found an array".to_owned(),
                format!(
                    "accounts[0] (a@x): invalid type: string ({} characters), expected i64",
                    token.len()
                ),
                "accounts[1]: invalid type: string (10 characters), expected a boolean".to_owned(),
            ]
        );
        let err = AccountsFile::parse(&format!("{{\"accounts\": [], \"x\": \"{token}\" 1}}"))
            .unwrap_err()
            .to_string();
        assert!(!err.contains(token), "{err}");
        assert_eq!(
            redact_strings(r#"invalid value: string "a\"b\u{1f600}c", expected x; string "d""#),
            "invalid value: string (5 characters), expected x; string (1 characters)"
        );
    }

    /// A token pasted into `email` is a problem, shown only by its length: otherwise `check`
    /// passes it and `status`, the log and `/token` show it as the account's name.
    #[test]
    fn a_long_field_name_is_shown_only_by_its_length() {
        let token = "sk-SECRETTOKEN0123456789abcdefSECRET";
        let text = format!(
            r#"{{"active_account": null, "{token}": 1, "accounts": [{{"email": "a@x", "access_token": "t", "refresh_token": "r", "{token}": 2}}]}}"#
        );
        let problems = AccountsFile::parse(&text).unwrap_err().to_string();
        assert!(!problems.contains("SECRET"), "{problems}");
        assert!(
            problems.contains("unknown field (a name of 36 characters) at the top level"),
            "{problems}"
        );
        assert!(
            problems.contains("unknown field (a name of 36 characters), expected"),
            "{problems}"
        );
        let typo = r#"{"active_account": null, "accounts": [{"email": "a@x", "access_token": "t", "refresh_token": "r", "disabeld": true}]}"#;
        let problems = AccountsFile::parse(typo).unwrap_err().to_string();
        assert!(problems.contains("unknown field `disabeld`"), "{problems}");
    }

    #[test]
    fn an_email_with_whitespace_or_control_characters_is_a_problem() {
        for email in [
            "a b@x.io",
            "a@x.io\n2026 INFO forged",
            "a\u{1b}[31m@x.io",
            "a\u{202E}@x.io",
            "\ta@x.io",
        ] {
            let problem = email_problem(email).expect(email);
            assert!(problem.contains("whitespace or control"), "{problem}");
            assert!(!problem.contains("x.io"), "{problem}");
        }
        assert_eq!(email_problem("a@x.io"), None);
    }

    #[test]
    fn an_email_without_an_at_sign_is_a_problem_never_echoed() {
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.c2lnbmF0dXJlLXNlY3JldA";
        let text = format!(
            r#"{{"active_account": null, "accounts": [
            {{"email": "{token}", "access_token": "x", "refresh_token": "y"}},
            {{"email": "abc", "access_token": "x", "refresh_token": "y"}},
            {{"email": "abc", "access_token": "x", "refresh_token": "y"}},
            {{"email": "a@x", "access_token": "x", "refresh_token": "y"}}
        ]}}"#
        );
        let problems = AccountsFile::check(&text).unwrap_err();
        assert_eq!(
            problems,
            [
                format!(
                    "accounts[0]: email must be an email address ({} characters, no @)",
                    token.len()
                ),
                "accounts[1]: email must be an email address (3 characters, no @)".to_owned(),
                "accounts[2]: email must be an email address (3 characters, no @)".to_owned(),
                "accounts[2]: duplicate email, already used by accounts[1]".to_owned(),
            ]
        );
        let err = AccountsFile::parse(&text).unwrap_err().to_string();
        assert!(!err.contains(token) && !err.contains("abc"), "{err}");
        // failed.json keeps what was moved there: an old one stays readable.
        let failed = text.replace("\"active_account\": null, ", "");
        assert_eq!(FailedFile::parse(&failed).unwrap().accounts.len(), 4);
    }

    /// A repeated key would be read as its last value and the others dropped by the next
    /// write: each repeat is a problem naming where it is.
    #[test]
    fn repeated_keys_are_problems_with_their_position() {
        let text = r#"{"active_account": null, "accounts": [
            {"email": "a@x", "access_token": "x", "refresh_token": "y", "disabled": false, "disabled": true},
            {"email": "b@x", "access_token": "x", "refresh_token": "y",
             "usage": {"primary": {"used_percent": 1, "reset_at": 2, "reset_at": 3}, "secondary": null}}
        ], "accounts": [], "active_account": null}"#;
        assert_eq!(
            AccountsFile::check(text).unwrap_err(),
            [
                "duplicate field \"accounts\" at the top level",
                "duplicate field \"active_account\" at the top level",
            ]
        );
        let accounts = text.replace(r#"], "accounts": [], "active_account": null}"#, "]}");
        assert_eq!(
            AccountsFile::check(&accounts).unwrap_err(),
            [
                "accounts[0] (a@x): duplicate field \"disabled\"",
                "accounts[1] (b@x): duplicate field \"reset_at\" in usage.primary",
            ]
        );
        let failed = accounts.replace(r#""active_account": null, "#, "");
        assert_eq!(
            FailedFile::parse(&failed).unwrap_err().to_string(),
            "failed.json: accounts[0] (a@x): duplicate field \"disabled\"; \
             accounts[1] (b@x): duplicate field \"reset_at\" in usage.primary"
        );
        // The same key in different objects is no repeat.
        assert!(AccountsFile::parse(SAMPLE).is_ok());
        // Past the first 32 keys of an object, repeats are still found, either way round.
        let keys: Vec<String> = (0..40)
            .chain([5, 38])
            .map(|k| format!("\"k{k}\": {k}"))
            .collect();
        let found = duplicate_keys(&format!("{{\"o\": [{{{}}}]}}", keys.join(", ")));
        let found: Vec<(&str, &str)> = found.iter().map(|d| (&*d.within, &*d.key)).collect();
        assert_eq!(found, [("o[0]", "k5"), ("o[0]", "k38")]);
    }

    /// Figures only, no assertion: `cargo test --release --lib parse_figures -- --ignored
    /// --nocapture` prints what parsing a 1,000-account file costs (it runs on every change).
    #[test]
    #[ignore]
    #[allow(clippy::disallowed_methods)]
    fn parse_figures_for_a_thousand_accounts() {
        let one = AccountsFile::parse(SAMPLE).unwrap().accounts.remove(0);
        let file = AccountsFile {
            active_account: None,
            accounts: (0..1000)
                .map(|i| Account {
                    email: format!("user{i}@example.com"),
                    ..one.clone()
                })
                .collect(),
        };
        let text = file.to_text();
        let runs = 50;
        let start = std::time::Instant::now();
        for _ in 0..runs {
            assert_eq!(AccountsFile::parse(&text).unwrap().accounts.len(), 1000);
        }
        let parse = start.elapsed() / runs;
        let start = std::time::Instant::now();
        for _ in 0..runs {
            assert!(duplicate_keys(&text).is_empty());
        }
        println!(
            "1,000 accounts ({} bytes): {parse:?} per parse, {:?} of it the repeated-key pass",
            text.len(),
            start.elapsed() / runs
        );
    }

    #[test]
    fn failed_file_allows_repeated_emails() {
        let one = r#"{"email": "a", "access_token": "x", "refresh_token": "y"}"#;
        let text = format!("{{\"accounts\": [{one}, {one}]}}");
        assert_eq!(FailedFile::parse(&text).unwrap().accounts.len(), 2);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn percent() -> impl Strategy<Value = Number> {
        prop_oneof![
            (0u64..=100).prop_map(Number::from),
            (0.0f64..=100.0).prop_map(|f| Number::from_f64((f * 100.0).round() / 100.0).unwrap()),
        ]
    }

    fn window() -> impl Strategy<Value = Option<Window>> {
        proptest::option::of((percent(), 0i64..2_000_000_000).prop_map(
            |(used_percent, reset_at)| Window {
                used_percent,
                reset_at,
            },
        ))
    }

    fn account(i: usize) -> impl Strategy<Value = Account> {
        (
            "[a-z0-9._-]{1,12}",
            "[A-Za-z0-9._-]{1,40}",
            "[A-Za-z0-9._-]{0,40}",
            proptest::option::of(0i64..2_000_000_000),
            proptest::option::of(
                (window(), window()).prop_map(|(primary, secondary)| Usage { primary, secondary }),
            ),
            proptest::option::of(0i64..2_000_000_000),
            any::<bool>(),
        )
            .prop_map(
                move |(local, at, rt, refresh_at, usage, checked, disabled)| Account {
                    email: format!("{local}+{i}@example.com"),
                    access_token: Secret::new(at),
                    refresh_token: Secret::new(rt),
                    token_refresh_at: refresh_at,
                    usage,
                    usage_checked_at: checked,
                    disabled,
                },
            )
    }

    fn accounts_file() -> impl Strategy<Value = AccountsFile> {
        (0usize..8)
            .prop_flat_map(|n| (0..n).map(account).collect::<Vec<_>>())
            .prop_flat_map(|accounts| {
                let emails: Vec<Option<String>> = std::iter::once(None)
                    .chain(accounts.iter().map(|a| Some(a.email.clone())))
                    .chain(std::iter::once(Some("nobody@example.com".to_owned())))
                    .collect();
                (Just(accounts), proptest::sample::select(emails))
            })
            .prop_map(|(accounts, active_account)| AccountsFile {
                active_account,
                accounts,
            })
    }

    proptest! {
        /// Whatever gibby writes, it reads back as the same pool, and writes again byte for byte.
        #[test]
        fn written_files_parse_back_identically(file in accounts_file()) {
            let text = file.to_text();
            let parsed = AccountsFile::parse(&text).unwrap();
            prop_assert_eq!(&parsed, &file);
            prop_assert_eq!(parsed.to_text(), text);
            let failed = FailedFile { accounts: file.accounts.clone() };
            prop_assert_eq!(FailedFile::parse(&failed.to_text()).unwrap(), failed);
        }
    }
}
