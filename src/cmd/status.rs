//! `gibby status`: the pool as the files describe it, without any upstream call.

use std::path::Path;

use chrono::{Local, TimeZone};
use serde::Serialize;

use crate::core::stage::{token_due, Loaded, Reason};
use crate::core::StateFile;
use crate::model::{Account, AccountsFile, FailedFile, Window};
use crate::settings::Policy;

/// One account's line of the status, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct AccountStatus {
    pub email: String,
    /// `active`, `usable`, `disabled`, `exhausted` or `stale`.
    pub state: &'static str,
    /// Why it is not usable, when it is not.
    pub reason: Option<String>,
    /// When an exhausted account has quota again.
    pub exhausted_until: Option<i64>,
    pub primary: Option<Window>,
    pub secondary: Option<Window>,
    pub usage_checked_at: Option<i64>,
    /// Stale figures are refreshed from the upstream before gibby trusts them.
    pub usage_stale: bool,
    pub token_refresh_at: Option<i64>,
    pub token_refresh_due: bool,
}

#[derive(Debug, Serialize)]
pub struct PoolStatus {
    pub now: i64,
    pub active_account: Option<String>,
    pub accounts: Vec<AccountStatus>,
    /// How many accounts failed.json holds.
    pub failed: usize,
}

/// The status of the pool at `now`, judged with the same rules `/token` uses.
pub fn pool_status(file: &AccountsFile, failed: usize, now: i64, policy: &Policy) -> PoolStatus {
    let accounts = file
        .accounts
        .iter()
        .map(|a| {
            account_status(
                a,
                file.active_account.as_deref() == Some(&a.email),
                now,
                policy,
            )
        })
        .collect();
    PoolStatus {
        now,
        active_account: file
            .active_account
            .as_deref()
            .map(crate::model::shown_email),
        accounts,
        failed,
    }
}

fn account_status(a: &Account, active: bool, now: i64, policy: &Policy) -> AccountStatus {
    let usage = a.usage.clone().unwrap_or_default();
    let (state, reason) = match Loaded::new(a.clone()).check_usage(now, policy) {
        _ if a.disabled => ("disabled", Some(Reason::Disabled)),
        Ok(checked) => match checked.usable(policy) {
            Ok(()) if active => ("active", None),
            Ok(()) => ("usable", None),
            Err(reason) => ("exhausted", Some(reason)),
        },
        Err(_) => ("stale", None),
    };
    AccountStatus {
        email: a.email.clone(),
        state,
        exhausted_until: reason.as_ref().and_then(Reason::exhausted_until),
        reason: reason.map(|r| r.to_string()),
        primary: usage.primary,
        secondary: usage.secondary,
        usage_checked_at: a.usage_checked_at,
        usage_stale: state == "stale",
        token_refresh_at: a.token_refresh_at,
        token_refresh_due: token_due(a, now),
    }
}

/// The table an operator reads. Times are in `tz` (local time for the command), with a
/// hint relative to `now`.
pub fn table<Tz: TimeZone>(status: &PoolStatus, tz: &Tz) -> String
where
    Tz::Offset: std::fmt::Display,
{
    let when = |t: i64| when(tz, t, status.now);
    let mut rows = vec![[
        "ACCOUNT".to_owned(),
        "STATE".to_owned(),
        "5-HOUR".to_owned(),
        "WEEKLY".to_owned(),
        "TOKEN REFRESH".to_owned(),
    ]];
    for a in &status.accounts {
        let state = match (a.state, a.exhausted_until, a.usage_checked_at) {
            ("exhausted", Some(t), _) => format!("exhausted until {}", when(t)),
            ("stale", _, Some(t)) => {
                format!("stale (checked {})", relative(t.saturating_sub(status.now)))
            }
            ("stale", _, None) => "stale (never checked)".to_owned(),
            (state, ..) => state.to_owned(),
        };
        let mark = if a.usage_stale { "*" } else { " " };
        let window = |w: &Option<Window>| match w {
            Some(w) => format!(
                "{:>5}%{mark} resets {}",
                w.used_percent.to_string(),
                when(w.reset_at)
            ),
            None => "-".to_owned(),
        };
        let refresh = match (a.token_refresh_at, a.token_refresh_due) {
            (_, true) => "due now".to_owned(),
            (Some(t), false) => when(t),
            (None, false) => "never (no refresh token)".to_owned(),
        };
        rows.push([
            a.email.clone(),
            state,
            window(&a.primary),
            window(&a.secondary),
            refresh,
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if status.accounts.is_empty() {
        out.push_str("(no accounts)\n");
    }
    if status.accounts.iter().any(|a| a.usage_stale) {
        out.push_str(
            "* stale: gibby refreshes these figures from the upstream before trusting them\n",
        );
    }
    out.push_str(&format!(
        "active: {}; failed.json: {} account(s)\n",
        // Already shown as `shown_email` shows it (see `PoolStatus::active_account`).
        status.active_account.as_deref().unwrap_or("none"),
        status.failed
    ));
    out
}

/// `14:05 (in 2 h 10 min)`, with the date when it is not today.
fn when<Tz: TimeZone>(tz: &Tz, t: i64, now: i64) -> String
where
    Tz::Offset: std::fmt::Display,
{
    let (Some(at), Some(today)) = (
        tz.timestamp_opt(t, 0).single(),
        tz.timestamp_opt(now, 0).single(),
    ) else {
        return t.to_string();
    };
    let shown = if at.date_naive() == today.date_naive() {
        at.format("%H:%M").to_string()
    } else {
        at.format("%Y-%m-%d %H:%M").to_string()
    };
    format!("{shown} ({})", relative(t.saturating_sub(now)))
}

/// `in 2 h 10 min`, `5 min ago`, `now`.
pub fn relative(seconds: i64) -> String {
    let s = seconds.unsigned_abs();
    let text = if s < 60 {
        return "now".to_owned();
    } else if s < 3600 {
        format!("{} min", s / 60)
    } else if s < 86_400 {
        format!("{} h {} min", s / 3600, s % 3600 / 60)
    } else {
        format!("{} d {} h", s / 86_400, s % 86_400 / 3600)
    };
    if seconds > 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Runs `gibby status`; `Err` carries the message for a broken or missing file.
pub fn run(dir: &Path, policy: &Policy, now: i64, json: bool) -> Result<String, String> {
    let text = super::read(dir, StateFile::Accounts)?.ok_or_else(|| {
        format!(
            "{}: does not exist in {}",
            StateFile::Accounts.name(),
            dir.display()
        )
    })?;
    let file = AccountsFile::parse(&text).map_err(|e| e.to_string())?;
    let failed = match super::read(dir, StateFile::Failed)? {
        Some(text) => FailedFile::parse(&text)
            .map_err(|e| e.to_string())?
            .accounts
            .len(),
        None => 0,
    };
    let status = pool_status(&file, failed, now, policy);
    Ok(if json {
        let mut out = serde_json::to_string_pretty(&status).expect("status serialises");
        out.push('\n');
        out
    } else {
        table(&status, &Local)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_hints() {
        let cases = [
            (0, "now"),
            (59, "now"),
            (60, "in 1 min"),
            (7800, "in 2 h 10 min"),
            (-300, "5 min ago"),
            (90_000, "in 1 d 1 h"),
            (i64::MIN, "106751991167300 d 15 h ago"),
        ];
        for (secs, text) in cases {
            assert_eq!(relative(secs), text);
        }
    }
}

#[cfg(test)]
mod snapshots {
    use super::*;
    use crate::model::{Secret, Usage};

    const NOW: i64 = 1_800_000_000;

    fn account(email: &str, primary: Option<i64>, weekly: i64, checked: Option<i64>) -> Account {
        let window = |pct: i64, after: i64| Window {
            used_percent: pct.into(),
            reset_at: NOW + after,
        };
        Account {
            email: email.into(),
            access_token: Secret::new("at-secret-value"),
            refresh_token: Secret::new("rt-secret-value"),
            token_refresh_at: Some(NOW + 3 * 86_400),
            usage: checked.map(|_| Usage {
                primary: primary.map(|p| window(p, 7_800)),
                secondary: Some(window(weekly, 400_000)),
            }),
            usage_checked_at: checked,
            disabled: false,
        }
    }

    fn pool() -> AccountsFile {
        let mut disabled = account("dis@example.com", Some(1), 1, Some(NOW - 60));
        disabled.disabled = true;
        let mut due = account("due@example.com", Some(5), 5, Some(NOW - 60));
        due.token_refresh_at = Some(NOW - 1);
        let mut no_refresh = account("opaque@example.com", None, 50, Some(NOW - 60));
        no_refresh.refresh_token = Secret::new("");
        no_refresh.token_refresh_at = None;
        AccountsFile {
            active_account: Some("a@example.com".into()),
            accounts: vec![
                account("a@example.com", Some(72), 18, Some(NOW - 60)),
                account("five@example.com", Some(97), 10, Some(NOW - 60)),
                account("week@example.com", Some(3), 100, Some(NOW - 60)),
                account("old@example.com", Some(40), 40, Some(NOW - 7_200)),
                account("new@example.com", None, 0, None),
                disabled,
                due,
                no_refresh,
            ],
        }
    }

    fn with_snapshots(f: impl FnOnce()) {
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"));
        settings.set_prepend_module_to_snapshot(false);
        settings.bind(f);
    }

    #[test]
    fn status_table_and_json() {
        let status = pool_status(&pool(), 2, NOW, &Policy::default());
        let table = table(&status, &chrono::Utc);
        let json = serde_json::to_string_pretty(&status).unwrap();
        for shown in [&table, &json] {
            assert!(
                !shown.contains("secret-value"),
                "a token was shown:\n{shown}"
            );
        }
        with_snapshots(|| {
            insta::assert_snapshot!("status_table", table);
            insta::assert_snapshot!("status_json", json);
        });
    }
}
