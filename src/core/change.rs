//! Changes to accounts.json, applied to a fresh read inside the lock.
//!
//! A change names the account by email and by the token it was computed from, so a change
//! computed from an older read never overwrites what another writer did since.

use super::wire::NewTokens;
use crate::model::{Account, AccountsFile, FailedFile, Secret, Usage};

#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Fetched usage, for the account that still has the access token it was fetched with.
    SetUsage {
        email: String,
        access_token: Secret,
        /// The usage and check time it replaces: if someone wrote others meanwhile, theirs stay.
        seen: (Option<Usage>, Option<i64>),
        usage: Usage,
        checked_at: i64,
    },
    /// New tokens, for the account that still has the refresh token that was spent.
    SetTokens {
        email: String,
        spent: Secret,
        tokens: NewTokens,
    },
    /// A new `active_account`, unless someone set another one since `seen`.
    SetActive { email: String, seen: Option<String> },
}

impl Change {
    /// Applies the change; `false` when the account changed meanwhile and it was skipped.
    pub fn apply(&self, file: &mut AccountsFile) -> bool {
        match self {
            Change::SetUsage {
                email,
                access_token,
                seen,
                usage,
                checked_at,
            } => match file.find_mut(email) {
                Some(a)
                    if &a.access_token == access_token
                        && (&a.usage, &a.usage_checked_at) == (&seen.0, &seen.1) =>
                {
                    a.usage = Some(usage.clone());
                    a.usage_checked_at = Some(*checked_at);
                    true
                }
                _ => false,
            },
            Change::SetTokens {
                email,
                spent,
                tokens,
            } => match file.find_mut(email) {
                Some(a) if &a.refresh_token == spent => {
                    a.access_token = tokens.access_token.clone();
                    if let Some(rt) = &tokens.refresh_token {
                        a.refresh_token = rt.clone();
                    }
                    a.token_refresh_at = Some(tokens.token_refresh_at);
                    true
                }
                _ => false,
            },
            Change::SetActive { email, seen } => {
                if file.active_account == *seen && file.find(email).is_some() {
                    file.active_account = Some(email.clone());
                    true
                } else {
                    false
                }
            }
        }
    }
}

impl Change {
    /// This request's own refresh replaced `email`'s access token `old` with `new`: usage
    /// fetched with the old token still describes the account, so it follows the new one.
    /// (Another writer's rotation is different: it goes through no request of ours.)
    pub fn follow_refresh(&mut self, email: &str, old: &Secret, new: &Secret) {
        if let Change::SetUsage {
            email: e,
            access_token,
            ..
        } = self
        {
            if e == email && access_token == old {
                *access_token = new.clone();
            }
        }
    }
}

/// Takes `account` out of accounts.json, clearing `active_account` if it named it.
pub fn remove(file: &mut AccountsFile, account: &Account) {
    file.accounts.retain(|a| a != account);
    if file.active_account.as_deref() == Some(account.email.as_str())
        && file.find(&account.email).is_none()
    {
        file.active_account = None;
    }
}

/// Accounts that stand identically in both files: a move to failed.json that was
/// interrupted after the append. Finishing it is removing them from accounts.json.
pub fn interrupted_moves(accounts: &AccountsFile, failed: &FailedFile) -> Vec<Account> {
    // By email first: both files may be long, and few accounts (usually none) are in both.
    let emails: std::collections::HashSet<&str> =
        failed.accounts.iter().map(|a| a.email.as_str()).collect();
    accounts
        .accounts
        .iter()
        .filter(|a| emails.contains(a.email.as_str()) && failed.accounts.contains(a))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(email: &str, at: &str, rt: &str) -> Account {
        Account {
            email: email.into(),
            access_token: Secret::new(at),
            refresh_token: Secret::new(rt),
            token_refresh_at: Some(10),
            usage: None,
            usage_checked_at: Some(5),
            disabled: false,
        }
    }

    fn file() -> AccountsFile {
        AccountsFile {
            active_account: Some("a".into()),
            accounts: vec![account("a", "at1", "rt1"), account("b", "at2", "rt2")],
        }
    }

    #[test]
    fn changes_apply_only_to_the_account_as_it_was_read() {
        let usage = |email: &str, at: &str, seen_checked_at| Change::SetUsage {
            email: email.into(),
            access_token: Secret::new(at),
            seen: (None, Some(seen_checked_at)),
            usage: Usage::default(),
            checked_at: 6,
        };
        let tokens = |spent: &str| Change::SetTokens {
            email: "a".into(),
            spent: Secret::new(spent),
            tokens: NewTokens {
                access_token: Secret::new("new-at"),
                refresh_token: None,
                token_refresh_at: 99,
            },
        };
        let active = |email: &str, seen: Option<&str>| Change::SetActive {
            email: email.into(),
            seen: seen.map(str::to_owned),
        };
        let cases = [
            (usage("a", "at1", 5), true),
            (usage("a", "rotated", 5), false),
            // another writer stored other usage since
            (usage("a", "at1", 4), false),
            (usage("gone", "at1", 5), false),
            (tokens("rt1"), true),
            (tokens("rt-old"), false),
            (active("b", Some("a")), true),
            (active("b", None), false),
            (active("gone", Some("a")), false),
        ];
        for (change, applies) in cases {
            let mut f = file();
            assert_eq!(change.apply(&mut f), applies, "{change:?}");
            assert_eq!(f != file(), applies, "{change:?}");
        }
        let mut f = file();
        tokens("rt1").apply(&mut f);
        let a = f.find("a").unwrap();
        assert_eq!(
            (
                a.access_token.expose(),
                a.refresh_token.expose(),
                a.token_refresh_at
            ),
            ("new-at", "rt1", Some(99))
        );
    }

    #[test]
    fn remove_clears_the_active_pointer() {
        let mut f = file();
        remove(&mut f, &account("a", "at1", "rt1"));
        assert_eq!(f.active_account, None);
        assert_eq!(f.accounts.len(), 1);
    }

    #[test]
    fn interrupted_moves_need_identical_objects() {
        let mut failed = FailedFile {
            accounts: vec![account("a", "at1", "rt1")],
        };
        assert_eq!(
            interrupted_moves(&file(), &failed),
            vec![account("a", "at1", "rt1")]
        );
        // re-added by hand with new tokens: not the same object, it stays
        failed.accounts[0].refresh_token = Secret::new("older");
        assert!(interrupted_moves(&file(), &failed).is_empty());
    }
}
