//! `gibby import <auth.json>`: adds or updates an account from a Codex CLI `auth.json`,
//! through the same locked read-modify-write as the service.

use serde::Deserialize;

use crate::core::wire::imported_refresh_at;
use crate::core::{FileRead, StateFile, WriteResult};
use crate::io::Store;
use crate::model::{Account, AccountsFile, Claims, Secret};

/// The Codex CLI's `~/.codex/auth.json`; other fields are ignored.
#[derive(Deserialize)]
struct AuthJson {
    #[serde(default)]
    tokens: Option<AuthTokens>,
}

#[derive(Deserialize)]
struct AuthTokens {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
}

/// The account an auth.json describes, ready to store.
#[derive(Debug)]
pub struct Imported {
    pub email: String,
    access_token: Secret,
    refresh_token: Secret,
    token_refresh_at: i64,
}

/// Reads an auth.json text. `source` names it in messages.
pub fn parse_auth(text: &str, source: &str, now: i64) -> Result<Imported, String> {
    let auth: AuthJson = serde_json::from_str(text).map_err(|e| format!("{source}: {e}"))?;
    let tokens = auth.tokens.ok_or_else(|| {
        format!("{source}: no ChatGPT tokens (`tokens` is missing or null); an API-key login cannot be pooled: sign in with `codex login` using ChatGPT")
    })?;
    let access_token = tokens
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("{source}: tokens.access_token is missing or empty"))?;
    let email = tokens
        .id_token
        .as_deref()
        .and_then(|t| Claims::of(t).email)
        .or_else(|| Claims::of(&access_token).email)
        .ok_or_else(|| format!("{source}: cannot tell the account's email: neither tokens.id_token nor tokens.access_token carries one"))?;
    // Refused here rather than written into a file that every reader would then refuse.
    if let Some(problem) = crate::model::email_problem(&email) {
        return Err(format!(
            "{source}: the email in the token's claims is not usable: {problem}"
        ));
    }
    Ok(Imported {
        email,
        token_refresh_at: imported_refresh_at(&access_token, now),
        access_token: Secret::new(access_token),
        refresh_token: Secret::new(tokens.refresh_token.unwrap_or_default()),
    })
}

/// Adds the account, or updates the tokens of the account with the same email in place
/// (its usage, `disabled` and every other account stay as they are). Returns what it did.
pub fn apply(file: &mut AccountsFile, imported: &Imported) -> &'static str {
    match file.find_mut(&imported.email) {
        Some(a)
            if a.access_token == imported.access_token
                && a.refresh_token == imported.refresh_token =>
        {
            "already up to date"
        }
        Some(a) => {
            a.access_token = imported.access_token.clone();
            a.refresh_token = imported.refresh_token.clone();
            a.token_refresh_at = Some(imported.token_refresh_at);
            "updated"
        }
        None => {
            file.accounts.push(Account {
                email: imported.email.clone(),
                access_token: imported.access_token.clone(),
                refresh_token: imported.refresh_token.clone(),
                token_refresh_at: Some(imported.token_refresh_at),
                usage: None,
                usage_checked_at: None,
                disabled: false,
            });
            "added"
        }
    }
}

/// Locks the data directory, re-reads accounts.json, applies the import and writes it
/// if nobody changed it meanwhile (retrying on a hand edit, three times at most).
pub async fn run(store: &Store, imported: &Imported) -> Result<&'static str, String> {
    crate::io::store::create_private_dir_all(store.dir()).map_err(|e| e.to_string())?;
    let _lock = store
        .lock()
        .await
        .map_err(|e| format!("cannot lock {}: {e}", store.dir().display()))?;
    for _ in 0..3 {
        let read = store.read(StateFile::Accounts);
        let mut file = match &read {
            FileRead::Missing => AccountsFile::default(),
            FileRead::Text(text) => {
                AccountsFile::parse(text).map_err(|e| format!("{e}; nothing was imported"))?
            }
            FileRead::Unreadable(why) => {
                return Err(format!("accounts.json: cannot be read: {why}"))
            }
        };
        let done = apply(&mut file, imported);
        if done == "already up to date" {
            return Ok(done);
        }
        match store.write(StateFile::Accounts, &file.to_text(), &read) {
            WriteResult::Done => return Ok(done),
            WriteResult::Conflict => continue,
            WriteResult::Failed(why) => return Err(format!("accounts.json: not written: {why}")),
        }
    }
    Err("accounts.json kept changing while importing; nothing was imported".into())
}
