//! Transition tests: the request machine driven by an in-memory world, step by step.

use super::*;
use crate::model::{Account, AccountsFile, FailedFile, Secret, Usage, Window};
use crate::settings::Policy;

const NOW: i64 = 1_000_000;

/// Two files in memory and a scripted upstream; records every effect asked.
struct World {
    accounts: FileRead,
    failed: FileRead,
    /// A hand edit that lands between gibby's read and its next write, once.
    edit_before_write: Option<String>,
    /// Another writer's accounts.json that lands just before the n-th read (0: the first).
    edit_before_read: Option<(usize, String)>,
    reads: usize,
    trace: Vec<String>,
}

impl World {
    fn new(file: &AccountsFile) -> Self {
        World {
            accounts: FileRead::Text(file.to_text().into()),
            failed: FileRead::Missing,
            edit_before_write: None,
            edit_before_read: None,
            reads: 0,
            trace: Vec::new(),
        }
    }

    fn accounts(&self) -> AccountsFile {
        match &self.accounts {
            FileRead::Text(t) => AccountsFile::parse(t).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn failed(&self) -> FailedFile {
        match &self.failed {
            FileRead::Text(t) => FailedFile::parse(t).unwrap(),
            FileRead::Missing => FailedFile::default(),
            other => panic!("{other:?}"),
        }
    }

    fn run(&mut self, upstream: &mut dyn FnMut(&Effect) -> Reply) -> Outcome {
        let mut request = TokenRequest::new(NOW, Policy::default());
        let mut locked = false;
        while let Some(effect) = request.poll_effect() {
            let event = match &effect {
                Effect::ReadFiles => {
                    if self
                        .edit_before_read
                        .as_ref()
                        .is_some_and(|(n, _)| *n == self.reads)
                    {
                        let (_, edit) = self.edit_before_read.take().expect("checked");
                        self.accounts = FileRead::Text(edit.into());
                    }
                    self.reads += 1;
                    Event::FilesRead {
                        accounts: self.accounts.clone(),
                        failed: self.failed.clone(),
                    }
                }
                Effect::Lock => {
                    assert!(!locked, "lock taken twice");
                    locked = true;
                    Event::Locked
                }
                Effect::Unlock => {
                    assert!(locked, "unlock without lock");
                    locked = false;
                    Event::Unlocked
                }
                Effect::Write {
                    file,
                    content,
                    expected,
                } => {
                    assert!(locked, "write without the lock");
                    if let Some(edit) = self.edit_before_write.take() {
                        self.accounts = FileRead::Text(edit.into());
                    }
                    let slot = match file {
                        StateFile::Accounts => &mut self.accounts,
                        StateFile::Failed => &mut self.failed,
                    };
                    let result = if slot == expected {
                        *slot = FileRead::Text(content.0.clone().into());
                        WriteResult::Done
                    } else {
                        WriteResult::Conflict
                    };
                    Event::Written {
                        file: *file,
                        result,
                    }
                }
                Effect::FetchUsage {
                    email,
                    access_token,
                    ..
                } => Event::UsageFetched {
                    email: email.clone(),
                    access_token: access_token.clone(),
                    reply: upstream(&effect),
                },
                Effect::RefreshToken {
                    email,
                    refresh_token,
                } => Event::TokenRefreshed {
                    email: email.clone(),
                    refresh_token: refresh_token.clone(),
                    reply: upstream(&effect),
                },
                Effect::Validate {
                    email,
                    access_token,
                    ..
                } => Event::ValidationAnswered {
                    email: email.clone(),
                    access_token: access_token.clone(),
                    reply: upstream(&effect),
                },
            };
            self.trace.push(step_name(&effect));
            for shown in [
                format!("{effect:?}"),
                format!("{event:?}"),
                format!("{request:?}"),
            ] {
                assert!(
                    !shown.contains("at-") && !shown.contains("rt-"),
                    "a token in Debug output: {shown}"
                );
            }
            request.handle(event);
        }
        assert!(!locked, "the lock was left held");
        request
            .into_outcome()
            .expect("an outcome once effects run out")
    }
}

fn step_name(effect: &Effect) -> String {
    match effect {
        Effect::ReadFiles => "read".into(),
        Effect::Lock => "lock".into(),
        Effect::Unlock => "unlock".into(),
        Effect::Write { file, .. } => format!("write {}", file.name()),
        Effect::FetchUsage { email, .. } => format!("usage {email}"),
        Effect::RefreshToken { email, .. } => format!("refresh {email}"),
        Effect::Validate { email, .. } => format!("validate {email}"),
    }
}

fn ok(body: &str) -> Reply {
    Reply::Http(HttpReply::json(200, body))
}

fn models() -> Reply {
    ok(r#"{"models": []}"#)
}

fn status(code: u16, body: &str) -> Reply {
    Reply::Http(HttpReply::json(code, body))
}

fn account(email: &str, primary: i64) -> Account {
    Account {
        email: email.into(),
        access_token: Secret::new(format!("at-{email}")),
        refresh_token: Secret::new(format!("rt-{email}")),
        token_refresh_at: Some(NOW + 1000),
        usage: Some(Usage {
            primary: Some(Window {
                used_percent: primary.into(),
                reset_at: NOW + 100,
            }),
            secondary: None,
        }),
        usage_checked_at: Some(NOW - 10),
        disabled: false,
    }
}

fn pool(active: Option<&str>, accounts: Vec<Account>) -> AccountsFile {
    AccountsFile {
        active_account: active.map(str::to_owned),
        accounts,
    }
}

fn served(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Token { answer, .. } => answer.email(),
        other => panic!("no token: {other:?}"),
    }
}

fn others(outcome: &Outcome) -> &Others {
    match outcome {
        Outcome::Token { others, .. } => others,
        other => panic!("no token: {other:?}"),
    }
}

#[test]
fn the_answer_accounts_for_every_account_not_chosen() {
    // Active and usable: the others were not looked at.
    let mut world = World::new(&pool(
        Some("b@x"),
        vec![account("a@x", 10), account("b@x", 50), account("c@x", 90)],
    ));
    let outcome = world.run(&mut |_| models());
    assert_eq!(others(&outcome), &Others::NotNeeded(2));

    // Fallback: the usable ones not chosen, in file order; the passed-over one is not here.
    let mut off = account("off@x", 80);
    off.disabled = true;
    let mut world = World::new(&pool(
        None,
        vec![
            account("a@x", 10),
            off,
            account("b@x", 50),
            account("c@x", 30),
        ],
    ));
    let outcome = world.run(&mut |_| models());
    assert_eq!(served(&outcome), "b@x");
    assert_eq!(
        others(&outcome),
        &Others::RankedLower(vec!["a@x".into(), "c@x".into()])
    );
}

#[test]
fn steady_state_reads_validates_and_writes_nothing() {
    let mut world = World::new(&pool(
        Some("a@x"),
        vec![account("a@x", 10), account("b@x", 50)],
    ));
    let outcome = world.run(&mut |_| models());
    assert_eq!(served(&outcome), "a@x");
    assert_eq!(world.trace, ["read", "validate a@x"]);
}

#[test]
fn stale_usage_is_fetched_once_and_persisted_at_the_end() {
    let mut a = account("a@x", 10);
    a.usage_checked_at = Some(NOW - 4000);
    let mut world = World::new(&pool(Some("a@x"), vec![a]));
    let usage = r#"{"rate_limit": {"primary_window": {"used_percent": 42, "limit_window_seconds": 18000, "reset_at": 1000500}, "secondary_window": null}}"#;
    let outcome = world.run(&mut |e| match e {
        Effect::FetchUsage { .. } => ok(usage),
        _ => models(),
    });
    assert_eq!(served(&outcome), "a@x");
    assert_eq!(
        world.trace,
        [
            "read",
            "usage a@x",
            "validate a@x",
            "lock",
            "read",
            "write accounts.json",
            "unlock"
        ]
    );
    let stored = world.accounts().accounts[0].clone();
    assert_eq!(stored.usage_checked_at, Some(NOW));
    assert_eq!(
        stored.usage.unwrap().primary.unwrap().used_percent,
        42.into()
    );
}

#[test]
fn fallback_fetches_stale_accounts_together_and_takes_the_fullest() {
    let mut b = account("b@x", 0);
    b.usage = None;
    let mut c = account("c@x", 0);
    c.usage = None;
    let mut world = World::new(&pool(Some("a@x"), vec![account("a@x", 99), b, c]));
    let outcome = world.run(&mut |e| match e {
        Effect::FetchUsage { email, .. } => {
            let pct = if email == "b@x" { 30 } else { 60 };
            ok(&format!(r#"{{"rate_limit": {{"primary_window": {{"used_percent": {pct}, "limit_window_seconds": 18000, "reset_after_seconds": 50}}}}}}"#))
        }
        _ => models(),
    });
    assert_eq!(served(&outcome), "c@x");
    assert_eq!(world.trace[..3], ["read", "usage b@x", "usage c@x"]);
    assert_eq!(world.accounts().active_account.as_deref(), Some("c@x"));
}

#[test]
fn due_token_is_refreshed_under_the_lock_before_validation() {
    let mut a = account("a@x", 10);
    a.token_refresh_at = Some(NOW);
    let mut world = World::new(&pool(Some("a@x"), vec![a]));
    let mut validated = Vec::new();
    let outcome = world.run(&mut |e| match e {
        Effect::RefreshToken { refresh_token, .. } => {
            assert_eq!(refresh_token.expose(), "rt-a@x");
            ok(r#"{"access_token": "new-at", "refresh_token": "new-rt", "expires_in": 864000}"#)
        }
        Effect::Validate { access_token, .. } => {
            validated.push(access_token.expose().to_owned());
            models()
        }
        _ => unreachable!(),
    });
    assert_eq!(served(&outcome), "a@x");
    assert_eq!(validated, ["new-at"]);
    assert_eq!(
        world.trace,
        [
            "read",
            "lock",
            "read",
            "refresh a@x",
            "write accounts.json",
            "unlock",
            "validate a@x"
        ]
    );
    let stored = &world.accounts().accounts[0];
    assert_eq!(
        (stored.access_token.expose(), stored.refresh_token.expose()),
        ("new-at", "new-rt")
    );
    assert_eq!(stored.token_refresh_at, Some(NOW + 864000 - 86400));
}

#[test]
fn a_refresh_done_elsewhere_is_adopted_without_a_call() {
    let mut a = account("a@x", 10);
    a.token_refresh_at = Some(NOW - 5);
    let mut world = World::new(&pool(Some("a@x"), vec![a.clone()]));
    // Another writer rotates the tokens between our first read and our locked read.
    let mut rotated = a;
    rotated.access_token = Secret::new("their-at");
    rotated.refresh_token = Secret::new("their-rt");
    rotated.token_refresh_at = Some(NOW + 5000);
    let rotated_text = pool(Some("a@x"), vec![rotated]).to_text();
    let mut request = TokenRequest::new(NOW, Policy::default());
    assert_eq!(request.poll_effect(), Some(Effect::ReadFiles));
    request.handle(Event::FilesRead {
        accounts: world.accounts.clone(),
        failed: FileRead::Missing,
    });
    assert_eq!(request.poll_effect(), Some(Effect::Lock));
    request.handle(Event::Locked);
    assert_eq!(request.poll_effect(), Some(Effect::ReadFiles));
    world.accounts = FileRead::Text(rotated_text.into());
    request.handle(Event::FilesRead {
        accounts: world.accounts.clone(),
        failed: FileRead::Missing,
    });
    assert_eq!(request.poll_effect(), Some(Effect::Unlock));
    request.handle(Event::Unlocked);
    match request.poll_effect() {
        Some(Effect::Validate { access_token, .. }) => {
            assert_eq!(access_token.expose(), "their-at")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_account_disabled_before_the_locked_read_is_neither_refreshed_nor_served() {
    let mut a = account("a@x", 10);
    a.token_refresh_at = Some(NOW - 5);
    let file = pool(Some("a@x"), vec![a.clone(), account("b@x", 5)]);
    let mut request = TokenRequest::new(NOW, Policy::default());
    assert_eq!(request.poll_effect(), Some(Effect::ReadFiles));
    request.handle(Event::FilesRead {
        accounts: FileRead::Text(file.to_text().into()),
        failed: FileRead::Missing,
    });
    assert_eq!(request.poll_effect(), Some(Effect::Lock));
    request.handle(Event::Locked);
    assert_eq!(request.poll_effect(), Some(Effect::ReadFiles));
    // A helper disabled it, same tokens, between our read and the lock.
    let mut disabled = file.clone();
    disabled.accounts[0].disabled = true;
    request.handle(Event::FilesRead {
        accounts: FileRead::Text(disabled.to_text().into()),
        failed: FileRead::Missing,
    });
    assert_eq!(request.poll_effect(), Some(Effect::Unlock));
    request.handle(Event::Unlocked);
    match request.poll_effect() {
        Some(Effect::Validate { email, .. }) => assert_eq!(email, "b@x"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_invalid_token_is_moved_whole_and_the_next_account_served() {
    let mut world = World::new(&pool(
        Some("a@x"),
        vec![account("a@x", 10), account("b@x", 5)],
    ));
    let before = world.accounts().accounts[0].clone();
    let outcome = world.run(&mut |e| match e {
        Effect::Validate { email, .. } if email == "a@x" => status(
            401,
            r#"{"detail": "Could not parse your authentication token."}"#,
        ),
        _ => models(),
    });
    assert_eq!(served(&outcome), "b@x");
    assert_eq!(world.failed().accounts, vec![before]);
    assert_eq!(
        world
            .accounts()
            .accounts
            .iter()
            .map(|a| a.email.as_str())
            .collect::<Vec<_>>(),
        ["b@x"]
    );
    assert_eq!(world.accounts().active_account.as_deref(), Some("b@x"));
    assert_eq!(
        world.trace,
        [
            "read",
            "validate a@x",
            "lock",
            "read",
            "write failed.json",
            "write accounts.json",
            "unlock",
            "validate b@x",
            "lock",
            "read",
            "write accounts.json",
            "unlock"
        ]
    );
}

#[test]
fn transient_failures_keep_every_account() {
    let file = pool(Some("a@x"), vec![account("a@x", 10), account("b@x", 5)]);
    let mut world = World::new(&file);
    let outcome = world.run(&mut |_| status(503, "<html>down</html>"));
    match outcome {
        Outcome::NoUsableAccount {
            passed_over,
            retry_after,
        } => {
            assert_eq!(passed_over.len(), 2);
            assert_eq!(retry_after, None);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(world.accounts(), file);
    assert_eq!(world.failed, FileRead::Missing);
}

#[test]
fn a_corrupt_failed_json_keeps_the_account_and_the_file() {
    let file = pool(Some("a@x"), vec![account("a@x", 10)]);
    let mut world = World::new(&file);
    world.failed = FileRead::Text("{not json".into());
    let outcome = world.run(&mut |_| status(401, "{}"));
    match outcome {
        Outcome::InvalidStateFile { detail } => {
            assert!(detail.starts_with("failed.json: "), "{detail}");
            assert!(detail.ends_with("a@x stays in accounts.json"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(world.accounts(), file);
    assert_eq!(world.failed, FileRead::Text("{not json".into()));
}

#[test]
fn a_hand_edit_under_the_lock_is_kept_and_the_change_redone() {
    let mut a = account("a@x", 10);
    a.usage_checked_at = Some(NOW - 4000);
    let mut world = World::new(&pool(Some("a@x"), vec![a.clone(), account("b@x", 5)]));
    let mut edited = pool(Some("a@x"), vec![a, account("b@x", 5)]);
    edited.accounts[1].disabled = true;
    world.edit_before_write = Some(edited.to_text());
    let usage = r#"{"rate_limit": {"primary_window": {"used_percent": 42, "limit_window_seconds": 18000, "reset_after_seconds": 100}}}"#;
    let outcome = world.run(&mut |e| match e {
        Effect::FetchUsage { .. } => ok(usage),
        _ => models(),
    });
    assert_eq!(served(&outcome), "a@x");
    let stored = world.accounts();
    assert!(stored.accounts[1].disabled, "the hand edit survives");
    assert_eq!(
        stored.accounts[0].usage_checked_at,
        Some(NOW),
        "our change is redone on top"
    );
    assert_eq!(
        world.trace,
        [
            "read",
            "usage a@x",
            "validate a@x",
            "lock",
            "read",
            "write accounts.json",
            "read",
            "write accounts.json",
            "unlock"
        ]
    );
}

#[test]
fn an_interrupted_move_is_finished_on_the_next_read() {
    let mut world = World::new(&pool(
        Some("a@x"),
        vec![account("a@x", 10), account("b@x", 5)],
    ));
    world.failed = FileRead::Text(
        FailedFile {
            accounts: vec![account("a@x", 10)],
        }
        .to_text()
        .into(),
    );
    let outcome = world.run(&mut |_| models());
    assert_eq!(served(&outcome), "b@x");
    assert_eq!(world.accounts().accounts.len(), 1);
    assert_eq!(world.failed().accounts.len(), 1, "not appended twice");
}

/// A never-checked account whose token is due: usage rejects the old token.
fn due_and_unchecked() -> AccountsFile {
    let mut a = account("a@x", 0);
    a.usage = None;
    a.usage_checked_at = None;
    a.token_refresh_at = None;
    pool(None, vec![a])
}

const USAGE_OK: &str = r#"{"rate_limit": {"primary_window": {"used_percent": 1, "limit_window_seconds": 18000, "reset_after_seconds": 9}}}"#;
const REFRESHED: &str =
    r#"{"access_token": "new-at", "refresh_token": "new-rt", "expires_in": 864000}"#;

#[test]
fn usage_401_for_a_due_token_is_refreshed_and_retried_before_any_verdict() {
    let mut world = World::new(&due_and_unchecked());
    let outcome = world.run(&mut |e| match e {
        Effect::FetchUsage { access_token, .. } if access_token.expose() == "at-a@x" => {
            status(401, "{}")
        }
        Effect::FetchUsage { .. } => ok(USAGE_OK),
        Effect::RefreshToken { .. } => ok(REFRESHED),
        _ => models(),
    });
    assert_eq!(served(&outcome), "a@x");
    assert_eq!(
        world.trace,
        [
            "read",
            "usage a@x",
            "lock",
            "read",
            "refresh a@x",
            "write accounts.json",
            "unlock",
            "usage a@x",
            "validate a@x",
            "lock",
            "read",
            "write accounts.json",
            "unlock"
        ]
    );
    assert_eq!(world.accounts().accounts[0].access_token.expose(), "new-at");
}

#[test]
fn usage_401_again_after_a_good_refresh_is_a_verdict() {
    let mut world = World::new(&due_and_unchecked());
    let outcome = world.run(&mut |e| match e {
        Effect::FetchUsage { .. } => status(401, "{}"),
        Effect::RefreshToken { .. } => ok(REFRESHED),
        _ => models(),
    });
    assert!(
        matches!(outcome, Outcome::NoUsableAccount { .. }),
        "{outcome:?}"
    );
    assert_eq!(world.failed().accounts.len(), 1);
    assert_eq!(world.failed().accounts[0].access_token.expose(), "new-at");
    assert!(world.accounts().accounts.is_empty());
}

#[test]
fn usage_401_after_a_failed_refresh_keeps_the_account() {
    let file = due_and_unchecked();
    let mut world = World::new(&file);
    let outcome = world.run(&mut |e| match e {
        Effect::FetchUsage { .. } => status(401, "{}"),
        Effect::RefreshToken { .. } => status(502, "bad gateway"),
        _ => models(),
    });
    assert!(
        matches!(outcome, Outcome::NoUsableAccount { .. }),
        "{outcome:?}"
    );
    assert_eq!(world.accounts(), file);
    assert_eq!(world.failed, FileRead::Missing);
    assert_eq!(
        world
            .trace
            .iter()
            .filter(|t| t.starts_with("usage"))
            .count(),
        2
    );
}

/// With usage stored, the account is still selected after its refresh failed transiently:
/// the old token is validated without a second refresh call in the same request, and a
/// rejection of it is no verdict.
#[test]
fn a_refresh_that_failed_transiently_is_not_tried_again_in_the_same_request() {
    let mut file = due_and_unchecked();
    let stored = account("a@x", 0);
    file.accounts[0].usage = stored.usage;
    file.accounts[0].usage_checked_at = Some(NOW - 7200);
    let mut world = World::new(&file);
    let outcome = world.run(&mut |e| match e {
        Effect::FetchUsage { .. } => status(401, "{}"),
        Effect::RefreshToken { .. } => status(502, "bad gateway"),
        _ => status(401, "{}"),
    });
    assert!(
        matches!(outcome, Outcome::NoUsableAccount { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        world.trace,
        [
            "read",
            "usage a@x",
            "lock",
            "read",
            "refresh a@x",
            "unlock",
            "usage a@x",
            "validate a@x"
        ]
    );
    assert_eq!(world.accounts(), file);
    assert_eq!(world.failed, FileRead::Missing);
}

/// Drives a request by hand up to its refresh call, then lets `during_call` change the world.
fn refresh_rejected_with(during_call: impl FnOnce(&mut World)) -> (World, Outcome) {
    refresh_rejected_then(during_call, models())
}

/// As [`refresh_rejected_with`], with `validation` answering every validation.
fn refresh_rejected_then(
    during_call: impl FnOnce(&mut World),
    validation: Reply,
) -> (World, Outcome) {
    let mut a = account("a@x", 10);
    a.token_refresh_at = Some(NOW);
    let mut world = World::new(&pool(Some("a@x"), vec![a]));
    let mut request = TokenRequest::new(NOW, Policy::default());
    let mut during_call = Some(during_call);
    let reused = r#"{"error": {"message": "already used", "type": "invalid_request_error", "param": null, "code": "refresh_token_reused"}}"#;
    while let Some(effect) = request.poll_effect() {
        world.trace.push(step_name(&effect));
        let event = match effect {
            Effect::ReadFiles => Event::FilesRead {
                accounts: world.accounts.clone(),
                failed: world.failed.clone(),
            },
            Effect::Lock => Event::Locked,
            Effect::Unlock => Event::Unlocked,
            Effect::Write { file, content, .. } => {
                match file {
                    StateFile::Accounts => world.accounts = FileRead::Text(content.0.into()),
                    StateFile::Failed => world.failed = FileRead::Text(content.0.into()),
                }
                Event::Written {
                    file,
                    result: WriteResult::Done,
                }
            }
            Effect::RefreshToken {
                email,
                refresh_token,
            } => {
                (during_call.take().unwrap())(&mut world);
                Event::TokenRefreshed {
                    email,
                    refresh_token,
                    reply: status(401, reused),
                }
            }
            Effect::Validate {
                email,
                access_token,
                ..
            } => Event::ValidationAnswered {
                email,
                access_token,
                reply: validation.clone(),
            },
            Effect::FetchUsage { .. } => unreachable!(),
        };
        request.handle(event);
    }
    (world, request.into_outcome().unwrap())
}

#[test]
fn refresh_token_reused_is_a_verdict_when_the_file_still_holds_that_token() {
    let (world, outcome) = refresh_rejected_with(|_| {});
    assert!(
        matches!(outcome, Outcome::NoUsableAccount { .. }),
        "{outcome:?}"
    );
    assert_eq!(world.failed().accounts.len(), 1);
    assert!(world.accounts().accounts.is_empty());
}

#[test]
fn refresh_token_reused_after_another_writer_rotated_uses_their_tokens() {
    let (world, outcome) = refresh_rejected_with(|world| {
        let mut file = world.accounts();
        file.accounts[0].access_token = Secret::new("their-at");
        file.accounts[0].refresh_token = Secret::new("their-rt");
        file.accounts[0].token_refresh_at = Some(NOW + 9000);
        world.accounts = FileRead::Text(file.to_text().into());
    });
    match &outcome {
        Outcome::Token { answer, .. } => assert_eq!(answer.access_token().expose(), "their-at"),
        other => panic!("{other:?}"),
    }
    assert_eq!(world.failed, FileRead::Missing);
    assert_eq!(
        world.accounts().accounts[0].refresh_token.expose(),
        "their-rt"
    );
    assert_eq!(
        world.trace,
        [
            "read",
            "lock",
            "read",
            "refresh a@x",
            "read",
            "unlock",
            "validate a@x"
        ]
    );
}

#[test]
fn a_refresh_that_failed_transiently_is_not_sent_again_in_the_same_request() {
    // Stale usage stored, token due: usage rejects the token, the refresh fails
    // transiently, the retry is rejected too; the stored usage still qualifies it.
    let mut a = account("a@x", 10);
    a.usage_checked_at = Some(NOW - 4000);
    a.token_refresh_at = Some(NOW - 1);
    let file = pool(Some("a@x"), vec![a]);
    let mut world = World::new(&file);
    let mut refreshes = 0;
    let outcome = world.run(&mut |e| match e {
        Effect::FetchUsage { .. } => status(401, "{}"),
        Effect::RefreshToken { .. } => {
            refreshes += 1;
            // A second use of a refresh token is refused as reuse: a verdict.
            if refreshes == 1 {
                status(502, "bad gateway")
            } else {
                status(401, r#"{"error": {"code": "refresh_token_reused"}}"#)
            }
        }
        Effect::Validate { access_token, .. } => {
            assert_eq!(access_token.expose(), "at-a@x");
            models()
        }
        _ => unreachable!(),
    });
    assert_eq!(served(&outcome), "a@x");
    assert_eq!(refreshes, 1, "the refresh token went upstream once");
    assert_eq!(
        world.trace,
        [
            "read",
            "usage a@x",
            "lock",
            "read",
            "refresh a@x",
            "unlock",
            "usage a@x",
            "validate a@x"
        ]
    );
    assert_eq!(world.accounts(), file);
    assert_eq!(world.failed, FileRead::Missing);
}

#[test]
fn usage_fetched_before_our_own_refresh_is_still_persisted() {
    let mut a = account("a@x", 10);
    a.usage_checked_at = Some(NOW - 4000);
    a.token_refresh_at = Some(NOW - 1);
    let mut world = World::new(&pool(Some("a@x"), vec![a]));
    let usage = r#"{"rate_limit": {"primary_window": {"used_percent": 42, "limit_window_seconds": 18000, "reset_after_seconds": 100}}}"#;
    let outcome = world.run(&mut |e| match e {
        Effect::FetchUsage { .. } => ok(usage),
        Effect::RefreshToken { .. } => ok(REFRESHED),
        _ => models(),
    });
    assert_eq!(served(&outcome), "a@x");
    let stored = &world.accounts().accounts[0];
    assert_eq!(stored.access_token.expose(), "new-at");
    assert_eq!(
        stored.usage_checked_at,
        Some(NOW),
        "the usage was written too"
    );
    assert_eq!(
        stored
            .usage
            .as_ref()
            .unwrap()
            .primary
            .as_ref()
            .unwrap()
            .used_percent,
        42.into()
    );
}

/// Another writer's tokens for `a`, stored with the given `token_refresh_at`.
fn theirs(file: &AccountsFile, token_refresh_at: Option<i64>) -> String {
    let mut file = file.clone();
    file.accounts[0].access_token = Secret::new("their-at");
    file.accounts[0].refresh_token = Secret::new("their-rt");
    file.accounts[0].token_refresh_at = token_refresh_at;
    file.to_text()
}

const THEIRS_REFRESHED: &str =
    r#"{"access_token": "next-at", "refresh_token": "next-rt", "expires_in": 864000}"#;

/// SPEC.md 5: a 401 for a due token is answered by a refresh first. Tokens another writer
/// stored while we waited for the lock are no exception: when they are due (no
/// `token_refresh_at`, or one in the past), they are refreshed once before validation,
/// instead of being validated as they are and a 401 moving the account.
#[test]
fn an_adopted_token_that_is_due_is_refreshed_before_validation() {
    for their_refresh_at in [None, Some(NOW - 1), Some(NOW)] {
        let mut a = account("a@x", 10);
        a.token_refresh_at = Some(NOW - 5);
        let file = pool(Some("a@x"), vec![a]);
        let mut world = World::new(&file);
        // Between the first read and the read under the lock.
        world.edit_before_read = Some((1, theirs(&file, their_refresh_at)));
        let mut refreshed = Vec::new();
        let outcome = world.run(&mut |e| match e {
            Effect::RefreshToken { refresh_token, .. } => {
                refreshed.push(refresh_token.expose().to_owned());
                ok(THEIRS_REFRESHED)
            }
            // Their token is too old for the upstream; only the refreshed one works.
            Effect::Validate { access_token, .. } if access_token.expose() == "next-at" => models(),
            Effect::Validate { .. } => status(401, "{}"),
            _ => unreachable!("{e:?}"),
        });
        assert_eq!(served(&outcome), "a@x", "{their_refresh_at:?}");
        assert_eq!(refreshed, ["their-rt"], "theirs, once");
        assert_eq!(
            world.trace,
            [
                "read",
                "lock",
                "read",
                "refresh a@x",
                "write accounts.json",
                "unlock",
                "validate a@x"
            ]
        );
        let stored = &world.accounts().accounts[0];
        assert_eq!(
            (stored.access_token.expose(), stored.refresh_token.expose()),
            ("next-at", "next-rt")
        );
        assert_eq!(world.failed, FileRead::Missing);
    }
}

/// An adopted token that is not due is validated as it is, without a refresh call.
#[test]
fn an_adopted_token_that_is_not_due_is_used_without_a_refresh() {
    let mut a = account("a@x", 10);
    a.token_refresh_at = Some(NOW - 5);
    let file = pool(Some("a@x"), vec![a]);
    let mut world = World::new(&file);
    world.edit_before_read = Some((1, theirs(&file, Some(NOW + 1))));
    let outcome = world.run(&mut |e| match e {
        Effect::Validate { access_token, .. } => {
            assert_eq!(access_token.expose(), "their-at");
            models()
        }
        _ => unreachable!("{e:?}"),
    });
    assert_eq!(served(&outcome), "a@x");
    assert_eq!(
        world.trace,
        ["read", "lock", "read", "unlock", "validate a@x"]
    );
}

/// The validation of a token that was not due is rejected, and under the lock the move
/// finds that another writer stored new tokens that are due: those are refreshed first
/// (this request has not sent a refresh for the account yet), then validated.
#[test]
fn tokens_adopted_at_a_move_are_refreshed_when_due() {
    let file = pool(Some("a@x"), vec![account("a@x", 10)]);
    let mut world = World::new(&file);
    world.edit_before_read = Some((1, theirs(&file, None)));
    let outcome = world.run(&mut |e| match e {
        Effect::RefreshToken { refresh_token, .. } => {
            assert_eq!(refresh_token.expose(), "their-rt");
            ok(THEIRS_REFRESHED)
        }
        Effect::Validate { access_token, .. } if access_token.expose() == "next-at" => models(),
        Effect::Validate { .. } => status(401, "{}"),
        _ => unreachable!("{e:?}"),
    });
    assert_eq!(served(&outcome), "a@x");
    assert_eq!(
        world.trace,
        [
            "read",
            "validate a@x",
            "lock",
            "read",
            "refresh a@x",
            "write accounts.json",
            "unlock",
            "validate a@x"
        ]
    );
    assert_eq!(world.failed, FileRead::Missing);
    assert_eq!(
        world.accounts().accounts[0].access_token.expose(),
        "next-at"
    );
}

/// After this request's own refresh was rejected (`refresh_token_reused`), another writer's
/// tokens are adopted; when they are due they cannot be refreshed in this request (one
/// refresh call per account and request), so a 401 for them is no verdict: the account
/// stays, with their tokens, and is passed over.
#[test]
fn a_due_adopted_token_after_our_refresh_is_not_refreshed_again_and_a_401_is_no_verdict() {
    let (world, outcome) = refresh_rejected_then(
        |world| world.accounts = FileRead::Text(theirs(&world.accounts(), None).into()),
        status(401, "{}"),
    );
    match &outcome {
        Outcome::NoUsableAccount { passed_over, .. } => {
            assert_eq!(passed_over.len(), 1);
            assert!(
                matches!(passed_over[0].reason, Reason::UpstreamUnavailable(_)),
                "{passed_over:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(world.failed, FileRead::Missing);
    assert_eq!(
        world.accounts().accounts[0].access_token.expose(),
        "their-at"
    );
    assert_eq!(
        world
            .trace
            .iter()
            .filter(|t| t.starts_with("refresh"))
            .count(),
        1
    );
}

/// DESIGN.md: a 402/403 with a dead account or workspace code is a verdict even for a token
/// that is due: no refresh brings a deactivated workspace back, so none is sent.
#[test]
fn a_coded_402_or_403_for_a_due_token_is_a_verdict_without_a_refresh() {
    for (code, body) in [
        (403, r#"{"detail": {"code": "invalid_workspace_selected"}}"#),
        (402, r#"{"detail": {"code": "deactivated_workspace"}}"#),
        (403, r#"{"error": {"code": "account_deactivated"}}"#),
    ] {
        let mut world = World::new(&due_and_unchecked());
        let outcome = world.run(&mut |e| match e {
            Effect::FetchUsage { .. } => status(code, body),
            _ => unreachable!("{e:?}"),
        });
        assert!(
            matches!(outcome, Outcome::NoUsableAccount { .. }),
            "{outcome:?}"
        );
        assert_eq!(
            world.trace,
            [
                "read",
                "usage a@x",
                "lock",
                "read",
                "write failed.json",
                "write accounts.json",
                "unlock"
            ],
            "{code} {body}"
        );
        assert_eq!(world.failed().accounts.len(), 1);
    }
}

/// The same holds for the old token validated after a refresh that failed transiently: a
/// 401 is no verdict then, but a coded 403 is.
#[test]
fn a_coded_403_after_a_failed_refresh_is_a_verdict_and_a_401_is_not() {
    for (reply, moved) in [
        (status(401, "{}"), false),
        (
            status(403, r#"{"detail": {"code": "invalid_workspace_selected"}}"#),
            true,
        ),
    ] {
        let mut a = account("a@x", 10);
        a.token_refresh_at = Some(NOW);
        let mut world = World::new(&pool(Some("a@x"), vec![a]));
        let outcome = world.run(&mut |e| match e {
            Effect::RefreshToken { .. } => status(502, "bad gateway"),
            Effect::Validate { .. } => reply.clone(),
            _ => unreachable!("{e:?}"),
        });
        assert!(
            matches!(outcome, Outcome::NoUsableAccount { .. }),
            "{outcome:?}"
        );
        assert_eq!(
            world.failed().accounts.len(),
            usize::from(moved),
            "{reply:?}"
        );
    }
}

/// A check stamped a second or two ahead of the request's clock (another process stamping
/// the second that has just begun) is fresh; further ahead it is stale.
#[test]
fn usage_checked_just_ahead_of_the_clock_is_fresh() {
    let policy = Policy::default();
    let checked_at = |offset: i64| {
        let mut a = account("a@x", 10);
        a.usage_checked_at = Some(NOW + offset);
        stage::Loaded::new(a).check_usage(NOW, &policy).is_ok()
    };
    assert!(checked_at(0));
    assert!(checked_at(1));
    assert!(checked_at(stage::CLOCK_SLACK_SECONDS));
    assert!(!checked_at(stage::CLOCK_SLACK_SECONDS + 1));
    assert!(!checked_at(600));
}
