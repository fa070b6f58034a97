//! `gibby check`: both files against the schema and the rules of SPEC.md section 1,
//! every problem with its position. Changes nothing.

use std::path::Path;

use crate::core::change::interrupted_moves;
use crate::core::StateFile;
use crate::io::store::loose_mode;
use crate::model::{AccountsFile, FailedFile};

/// What `check` found: problems make the exit code 1; notes do not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

pub fn run(dir: &Path) -> Report {
    let mut report = Report::default();
    let accounts = match super::read(dir, StateFile::Accounts) {
        Ok(Some(text)) => check_file(&text, StateFile::Accounts, AccountsFile::check, &mut report),
        Ok(None) => {
            report.problems.push(format!(
                "accounts.json: does not exist in {}",
                dir.display()
            ));
            None
        }
        Err(e) => {
            report.problems.push(e);
            None
        }
    };
    let failed = match super::read(dir, StateFile::Failed) {
        Ok(Some(text)) => check_file(&text, StateFile::Failed, FailedFile::check, &mut report),
        Ok(None) => Some(FailedFile::default()),
        Err(e) => {
            report.problems.push(e);
            None
        }
    };
    if let Some(file) = &accounts {
        if let Some(active) = &file.active_account {
            if file.find(active).is_none() {
                let shown = crate::model::shown_email(active);
                let shown = if shown == *active {
                    format!("{active:?}")
                } else {
                    shown
                };
                report.notes.push(format!(
                    "accounts.json: active_account {shown} names no account; it counts as none"
                ));
            }
        }
        report
            .notes
            .push(format!("accounts.json: {} account(s)", file.accounts.len()));
    }
    if let (Some(accounts), Some(failed)) = (&accounts, &failed) {
        for account in interrupted_moves(accounts, failed) {
            report.notes.push(format!(
                "{}: stands identically in failed.json (an interrupted move); the next request removes it from accounts.json",
                account.email
            ));
        }
    }
    for file in [StateFile::Accounts, StateFile::Failed] {
        if let Some(mode) = loose_mode(&dir.join(file.name())) {
            report.problems.push(format!(
                "{}: mode {mode:04o} lets other users read the tokens; run chmod 600 {}",
                file.name(),
                dir.join(file.name()).display()
            ));
        }
    }
    report
}

fn check_file<T>(
    text: &str,
    file: StateFile,
    check: fn(&str) -> Result<T, Vec<String>>,
    report: &mut Report,
) -> Option<T> {
    match check(text) {
        Ok(parsed) => Some(parsed),
        Err(problems) => {
            report.problems.extend(
                problems
                    .into_iter()
                    .map(|p| format!("{}: {p}", file.name())),
            );
            None
        }
    }
}
