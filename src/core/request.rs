//! One `GET /token`, as a state machine that asks for effects and is fed their results.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use super::change::{self, Change};
use super::effect::{Effect, Event, FileRead, FileText, StateFile, WriteResult};
use super::select;
use super::stage::{
    Failed, Loaded, Reason, RefreshAnswer, RefreshDue, TokenAnswer, TokenFresh, UsageAnswer,
    UsageChecked, UsageDue, ValidationAnswer,
};
use crate::model::{Account, AccountsFile, FailedFile, FileError, ACCOUNTS_FILE};
use crate::settings::Policy;

/// How often a locked write is redone because a hand edit landed under it.
const MAX_WRITE_CONFLICTS: u8 = 3;
/// `Retry-After` is capped at an hour.
const MAX_RETRY_AFTER: i64 = 3600;

/// An account passed over in this request, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct PassOver {
    pub email: String,
    pub reason: Reason,
}

/// Why the accounts that were neither chosen nor passed over were not chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Others {
    /// The active account was usable: these many others were not looked at.
    NotNeeded(usize),
    /// Usable too, but ranked below the chosen one (lower 5-hour usage, or the same and
    /// later in the file), in file order.
    RankedLower(Vec<String>),
}

/// How the request ends.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Every account that was not chosen is in `passed_over` when it was looked at, or
    /// accounted for by `others`.
    Token {
        answer: TokenAnswer,
        passed_over: Vec<PassOver>,
        others: Others,
    },
    NoUsableAccount {
        passed_over: Vec<PassOver>,
        /// Seconds until the earliest reset, when every account is only exhausted.
        retry_after: Option<i64>,
    },
    /// A state file that cannot be parsed or read; nothing was written.
    InvalidStateFile { detail: String },
}

/// The latest state this request has seen of both files.
#[derive(Debug)]
struct View {
    /// Shared with the [`ParseMemo`] until this request changes it.
    accounts: Arc<AccountsFile>,
    accounts_read: FileRead,
    failed: Result<Arc<FailedFile>, FileError>,
    failed_read: FileRead,
}

#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per request, moved a handful of times: boxing buys nothing"
)]
enum State {
    Reading,
    /// Waiting for the usage answers in `TokenRequest::pending_usage`.
    CheckingUsage,
    /// A read-modify-write under the lock: Lock → ReadFiles → [refresh] → Write… → Unlock.
    Locked {
        step: Step,
        conflicts: u8,
    },
    Unlocking(Next),
    Validating(TokenFresh),
    Done,
}

#[derive(Debug)]
enum Step {
    Locking(Job),
    Reading(Job),
    Refreshing(RefreshDue, Then),
    /// The writes still to do, the first one asked for.
    Writing(Job, VecDeque<(StateFile, FileText)>),
}

/// What a locked read-modify-write is for.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "at most a few per request, and moved whole into the state: boxing buys nothing"
)]
enum Job {
    /// Finish moves to failed.json that a crash interrupted.
    FinishMoves,
    /// Refresh a due token, unless someone else did meanwhile.
    Refresh(RefreshDue, Then),
    /// Store the tokens a refresh just returned.
    StoreTokens(TokenFresh, Change, Then),
    /// Move an invalid account to failed.json. With a `Then`, the account was on its way to
    /// serving a token: if another writer gave it new tokens meanwhile, those are used.
    Move(Failed, Option<Then>),
    /// Persist the usage and active-account changes, then answer.
    Persist(Outcome),
}

impl Job {
    fn describe(&self) -> String {
        match self {
            Job::FinishMoves => "finish interrupted moves".into(),
            Job::Refresh(due, _) => format!("refresh {}", due.email()),
            Job::StoreTokens(fresh, ..) => format!("store the new tokens of {}", fresh.email()),
            Job::Move(failed, _) => format!("move {} to failed.json", failed.email()),
            Job::Persist(_) => "persist usage and the active account".into(),
        }
    }
}

/// What the request does once the lock is released.
#[derive(Debug)]
enum Next {
    Select,
    Token(TokenFresh, Then),
    Finish(Outcome),
}

/// What a refreshed token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    /// The selected account: validate it.
    Validate,
    /// Usage rejected the due token: ask for usage again with the new one.
    RetryUsage,
}

/// One `/token` request. Drive it as SPEC.md's interpreter contract says: take every
/// effect from [`poll_effect`](Self::poll_effect), perform them (upstream calls may run
/// at once), feed each result to [`handle`](Self::handle), and repeat until
/// [`outcome`](Self::outcome) is set.
#[derive(Debug)]
pub struct TokenRequest {
    now: i64,
    policy: Policy,
    effects: VecDeque<Effect>,
    state: State,
    view: Option<View>,
    outcome: Option<Outcome>,
    /// Accounts judged for this request and not consumed by selection.
    checked: BTreeMap<String, UsageChecked>,
    pending_usage: BTreeMap<String, UsageDue>,
    /// Accounts out of the running for the rest of this request.
    excluded: BTreeSet<String>,
    passed_over: Vec<PassOver>,
    /// Usage and active-account changes, written once at the end.
    changes: Vec<Change>,
    /// Accounts the usage call declared invalid, waiting to be moved.
    failures: Vec<Failed>,
    /// Accounts whose due token usage rejected: refreshed, then asked again.
    refresh_first: Vec<RefreshDue>,
    /// Accounts this request sent a refresh call for: at most one each.
    refreshed: BTreeSet<String>,
    /// Things the operator should hear about that did not change the answer.
    warnings: Vec<String>,
    memo: Option<Arc<ParseMemo>>,
}

/// The last text of each file parsed and what it parsed to, and the interrupted moves found
/// in that pair. Parsing is a pure function of the text, so a request that reads the very
/// same bytes takes the earlier result instead of parsing a large pool (or a failed.json
/// grown over months) again. The files are still read on every request.
#[derive(Debug, Default)]
pub struct ParseMemo {
    accounts: Mutex<Option<(Arc<str>, Arc<AccountsFile>)>>,
    failed: Mutex<Option<(Arc<str>, Arc<FailedFile>)>>,
    moves: Mutex<Option<Moves>>,
}

/// Interrupted moves found in one pair of parsed files.
type Moves = (Arc<AccountsFile>, Arc<FailedFile>, Vec<Account>);

/// The parse of `text`: the one remembered in `slot` when the text is the same.
fn remember<T>(
    slot: &Mutex<Option<(Arc<str>, Arc<T>)>>,
    text: &Arc<str>,
    parse: impl FnOnce(&str) -> Result<T, FileError>,
) -> Result<Arc<T>, FileError> {
    let mut last = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((seen, parsed)) = &mut *last {
        if Arc::ptr_eq(seen, text) {
            return Ok(parsed.clone());
        }
        if **seen == **text {
            // The same bytes read again: the store now hands out this copy, so keep it
            // and let the next request match by pointer, not by comparing every byte.
            *seen = text.clone();
            return Ok(parsed.clone());
        }
    }
    let parsed = Arc::new(parse(text)?);
    *last = Some((text.clone(), parsed.clone()));
    Ok(parsed)
}

impl ParseMemo {
    fn parse(&self, text: &Arc<str>) -> Result<Arc<AccountsFile>, FileError> {
        remember(&self.accounts, text, AccountsFile::parse)
    }

    fn parse_failed(&self, text: &Arc<str>) -> Result<Arc<FailedFile>, FileError> {
        remember(&self.failed, text, FailedFile::parse)
    }

    fn moves(&self, accounts: &Arc<AccountsFile>, failed: &Arc<FailedFile>) -> Vec<Account> {
        let mut last = self.moves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((a, f, moves)) = &*last {
            if Arc::ptr_eq(a, accounts) && Arc::ptr_eq(f, failed) {
                return moves.clone();
            }
        }
        let moves = change::interrupted_moves(accounts, failed);
        *last = Some((accounts.clone(), failed.clone(), moves.clone()));
        moves
    }
}

impl TokenRequest {
    pub fn new(now: i64, policy: Policy) -> Self {
        TokenRequest {
            now,
            policy,
            effects: VecDeque::from([Effect::ReadFiles]),
            state: State::Reading,
            view: None,
            outcome: None,
            checked: BTreeMap::new(),
            pending_usage: BTreeMap::new(),
            excluded: BTreeSet::new(),
            passed_over: Vec::new(),
            changes: Vec::new(),
            failures: Vec::new(),
            refresh_first: Vec::new(),
            refreshed: BTreeSet::new(),
            warnings: Vec::new(),
            memo: None,
        }
    }

    /// Reuses the parse of an accounts.json text that an earlier request already parsed.
    pub fn with_memo(mut self, memo: Arc<ParseMemo>) -> Self {
        self.memo = Some(memo);
        self
    }

    /// The next effect to perform, if any.
    #[must_use]
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn into_outcome(self) -> Option<Outcome> {
        self.outcome
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Where the request stands, in words, for traces (`gibby replay`). Names accounts,
    /// never tokens.
    pub fn stage(&self) -> String {
        match &self.state {
            State::Reading => "reading the files".into(),
            State::CheckingUsage => {
                let waiting: Vec<&str> = self.pending_usage.keys().map(String::as_str).collect();
                format!("checking usage (waiting for {})", waiting.join(", "))
            }
            State::Locked { step, .. } => {
                let (job, doing) = match step {
                    Step::Locking(job) => (job, "taking the lock"),
                    Step::Reading(job) => (job, "reading under the lock"),
                    Step::Refreshing(due, _) => {
                        return format!("locked: refreshing the token of {}", due.email())
                    }
                    Step::Writing(job, _) => (job, "writing"),
                };
                format!("locked to {}: {doing}", job.describe())
            }
            State::Unlocking(next) => match next {
                Next::Select => "unlocking, then selecting again".into(),
                Next::Token(fresh, Then::Validate) => {
                    format!("unlocking, then validating {}", fresh.email())
                }
                Next::Token(fresh, Then::RetryUsage) => {
                    format!("unlocking, then asking usage of {} again", fresh.email())
                }
                Next::Finish(_) => "unlocking, then answering".into(),
            },
            State::Validating(fresh) => format!("validating {}", fresh.email()),
            State::Done => "done".into(),
        }
    }

    /// Feeds the result of an effect. An event that does not fit the current state (a
    /// late or duplicate answer) is ignored.
    pub fn handle(&mut self, event: Event) {
        match (std::mem::replace(&mut self.state, State::Done), event) {
            (State::Reading, Event::FilesRead { accounts, failed }) => {
                match self.take_view(accounts, failed) {
                    Ok(moves) if moves.is_empty() => self.select(),
                    Ok(_) => self.lock(Job::FinishMoves),
                    Err(e) => self.finish_now(Outcome::InvalidStateFile {
                        detail: e.to_string(),
                    }),
                }
            }
            (
                State::CheckingUsage,
                Event::UsageFetched {
                    email,
                    access_token,
                    reply,
                },
            ) => {
                self.state = State::CheckingUsage;
                let matches = self
                    .pending_usage
                    .get(&email)
                    .is_some_and(|due| due.access_token() == &access_token);
                if matches {
                    let due = self.pending_usage.remove(&email).expect("checked above");
                    self.usage_answered(due.answered(&reply, self.now));
                }
                if self.pending_usage.is_empty() {
                    self.select();
                }
            }
            (
                State::Validating(fresh),
                Event::ValidationAnswered {
                    email,
                    access_token,
                    reply,
                },
            ) if email == fresh.email() && &access_token == fresh.access_token() => {
                match fresh.answered(&reply) {
                    ValidationAnswer::Valid(validated) => {
                        let answer = validated.into_answer();
                        let passed_over = std::mem::take(&mut self.passed_over);
                        let others = self.others(answer.email());
                        self.finish(Outcome::Token {
                            answer,
                            passed_over,
                            others,
                        })
                    }
                    ValidationAnswer::Failed(failed) => {
                        self.lock(Job::Move(failed, Some(Then::Validate)))
                    }
                    ValidationAnswer::Transient(reason) => {
                        self.pass_over(&email, reason);
                        self.select();
                    }
                }
            }
            (State::Locked { step, conflicts }, event) => self.locked_event(step, conflicts, event),
            (State::Unlocking(next), Event::Unlocked) => match next {
                Next::Select => self.select(),
                Next::Token(fresh, then) => self.use_token(fresh, then),
                Next::Finish(outcome) => self.finish_now(outcome),
            },
            (state, _) => self.state = state,
        }
    }

    fn take_view(
        &mut self,
        accounts: FileRead,
        failed: FileRead,
    ) -> Result<Vec<Account>, FileError> {
        let parsed = match &accounts {
            FileRead::Text(text) => match &self.memo {
                Some(memo) => memo.parse(text)?,
                None => Arc::new(AccountsFile::parse(text)?),
            },
            FileRead::Missing => {
                return Err(FileError {
                    file: ACCOUNTS_FILE,
                    problem: "the file does not exist".into(),
                })
            }
            FileRead::Unreadable(why) => {
                return Err(FileError {
                    file: ACCOUNTS_FILE,
                    problem: format!("cannot be read: {why}"),
                })
            }
        };
        let failed_parsed = match &failed {
            FileRead::Missing => Ok(Arc::default()),
            FileRead::Text(text) => match &self.memo {
                Some(memo) => memo.parse_failed(text),
                None => FailedFile::parse(text).map(Arc::new),
            },
            FileRead::Unreadable(why) => Err(FileError {
                file: crate::model::FAILED_FILE,
                problem: format!("cannot be read: {why}"),
            }),
        };
        let moves = match (&failed_parsed, &self.memo) {
            (Ok(f), _) if f.accounts.is_empty() => Vec::new(),
            (Ok(f), Some(memo)) => memo.moves(&parsed, f),
            (Ok(f), None) => change::interrupted_moves(&parsed, f),
            (Err(e), _) => {
                // Only a move needs failed.json; until then the pool is served as it is.
                self.warnings
                    .push(format!("{e}; interrupted moves cannot be checked"));
                Vec::new()
            }
        };
        self.view = Some(View {
            accounts: parsed,
            accounts_read: accounts,
            failed: failed_parsed,
            failed_read: failed,
        });
        Ok(moves)
    }

    fn view(&self) -> &View {
        self.view
            .as_ref()
            .expect("selection runs after the first read")
    }

    /// The accounts still in the running that were not chosen (the log line names them).
    fn others(&self, chosen: &str) -> Others {
        let view = &self.view().accounts;
        let others = view
            .accounts
            .iter()
            .filter(|a| a.email != chosen && !self.excluded.contains(&a.email));
        // The steady state (the active account served) only counts: no copy per account,
        // and with none passed over, no set lookup per account either (emails are unique).
        if view.active_account.as_deref() == Some(chosen) {
            Others::NotNeeded(if self.excluded.is_empty() {
                view.accounts.len() - usize::from(view.find(chosen).is_some())
            } else {
                others.count()
            })
        } else {
            Others::RankedLower(others.map(|a| a.email.clone()).collect())
        }
    }

    fn pass_over(&mut self, email: &str, reason: Reason) {
        self.excluded.insert(email.to_owned());
        self.checked.remove(email);
        self.passed_over.push(PassOver {
            email: email.to_owned(),
            reason,
        });
    }

    fn usage_answered(&mut self, answer: UsageAnswer) {
        match answer {
            UsageAnswer::Checked(checked, change) => {
                self.changes.extend(change);
                self.checked.insert(checked.email().to_owned(), checked);
            }
            UsageAnswer::Failed(failed) => self.failures.push(failed),
            UsageAnswer::RefreshFirst(due) => self.refresh_first.push(due),
        }
    }

    /// SPEC.md section 4: the active account first, else the fullest usable one.
    /// Asks for usage where it is stale and comes back here when it has arrived.
    fn select(&mut self) {
        if let Some(failed) = self.failures.pop() {
            return self.lock(Job::Move(failed, None));
        }
        if let Some(due) = self.refresh_first.pop() {
            return self.lock(Job::Refresh(due, Then::RetryUsage));
        }
        // The view is shared (and may be large): take out only the accounts looked at.
        let view = self.view().accounts.clone();
        let active = view.active_account.as_deref();
        let active_account = view
            .accounts
            .iter()
            .filter(|a| !self.excluded.contains(&a.email))
            .find(|a| Some(a.email.as_str()) == active)
            .cloned();

        if let Some(account) = active_account {
            let email = account.email.clone();
            if !self.check(account) {
                self.state = State::CheckingUsage;
                return;
            }
            // Not in `checked` when it was just passed over as disabled.
            if let Some(checked) = self.checked.get(&email) {
                match checked.usable(&self.policy) {
                    Ok(()) => return self.choose(&email),
                    Err(reason) => self.pass_over(&email, reason),
                }
            }
        }

        let others: Vec<Account> = view
            .accounts
            .iter()
            .filter(|a| !self.excluded.contains(&a.email))
            .filter(|a| Some(a.email.as_str()) != active)
            .cloned()
            .collect();
        let mut waiting = false;
        for account in others {
            waiting |= !self.check(account);
        }
        if waiting {
            self.state = State::CheckingUsage;
            return;
        }

        let candidates: Vec<&UsageChecked> = self.checked.values().collect();
        let candidates = self.in_file_order(candidates);
        let chosen =
            select::fallback(&candidates, &self.policy).map(|i| candidates[i].email().to_owned());
        let unusable: Vec<(String, Reason)> = candidates
            .iter()
            .filter_map(|c| {
                c.usable(&self.policy)
                    .err()
                    .map(|r| (c.email().to_owned(), r))
            })
            .collect();
        for (email, reason) in unusable {
            self.pass_over(&email, reason);
        }
        match chosen {
            Some(email) => self.choose(&email),
            None => {
                let until: Option<Vec<i64>> = self
                    .passed_over
                    .iter()
                    .map(|p| p.reason.exhausted_until())
                    .collect();
                let retry_after = until
                    .and_then(|t| t.into_iter().min())
                    .map(|t| t.saturating_sub(self.now).clamp(1, MAX_RETRY_AFTER));
                let passed_over = std::mem::take(&mut self.passed_over);
                self.finish(Outcome::NoUsableAccount {
                    passed_over,
                    retry_after,
                })
            }
        }
    }

    /// Makes sure the account is judged for this request: disabled ones are passed
    /// over, fresh usage is taken as it is, stale usage is asked for (once per request).
    /// `false` while an answer is awaited.
    fn check(&mut self, account: Account) -> bool {
        let email = account.email.clone();
        if account.disabled {
            self.pass_over(&email, Reason::Disabled);
            return true;
        }
        if self.checked.contains_key(&email) {
            return true;
        }
        if self.pending_usage.contains_key(&email) {
            return false;
        }
        match Loaded::new(account).check_usage(self.now, &self.policy) {
            Ok(checked) => {
                self.checked.insert(email, checked);
                true
            }
            Err(due) => {
                self.effects.push_back(due.effect());
                self.pending_usage.insert(email, due);
                false
            }
        }
    }

    /// The candidates still in the file and in the running, in file order.
    fn in_file_order<'a>(&self, candidates: Vec<&'a UsageChecked>) -> Vec<&'a UsageChecked> {
        let position = |email: &str| {
            self.view()
                .accounts
                .accounts
                .iter()
                .position(|a| a.email == email)
        };
        let mut placed: Vec<(usize, &UsageChecked)> = candidates
            .into_iter()
            .filter(|c| !self.excluded.contains(c.email()))
            .filter_map(|c| position(c.email()).map(|p| (p, c)))
            .collect();
        placed.sort_by_key(|(p, _)| *p);
        placed.into_iter().map(|(_, c)| c).collect()
    }

    fn choose(&mut self, email: &str) {
        let checked = self.checked.remove(email).expect("chosen from the checked");
        match checked.select().check_token(self.now) {
            Ok(fresh) => self.validate(fresh),
            Err(due) => self.lock(Job::Refresh(due, Then::Validate)),
        }
    }

    fn use_token(&mut self, fresh: TokenFresh, then: Then) {
        match then {
            Then::Validate => self.validate(fresh),
            Then::RetryUsage => {
                let due = fresh.retry_usage();
                self.effects.push_back(due.effect());
                self.pending_usage.insert(due.email().to_owned(), due);
                self.state = State::CheckingUsage;
            }
        }
    }

    fn validate(&mut self, fresh: TokenFresh) {
        self.effects.push_back(fresh.effect());
        self.state = State::Validating(fresh);
    }

    /// Ends the request, persisting usage and the active account first.
    fn finish(&mut self, outcome: Outcome) {
        if let Outcome::Token { answer, .. } = &outcome {
            let seen = self.view().accounts.active_account.clone();
            if seen.as_deref() != Some(answer.email()) {
                self.changes.push(Change::SetActive {
                    email: answer.email().to_owned(),
                    seen,
                });
            }
        }
        if self.changes.is_empty() {
            self.finish_now(outcome)
        } else {
            self.lock(Job::Persist(outcome))
        }
    }

    fn finish_now(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
        self.state = State::Done;
    }

    fn lock(&mut self, job: Job) {
        self.effects.push_back(Effect::Lock);
        self.state = State::Locked {
            step: Step::Locking(job),
            conflicts: 0,
        };
    }

    fn unlock(&mut self, next: Next) {
        self.effects.push_back(Effect::Unlock);
        self.state = State::Unlocking(next);
    }

    fn read_locked(&mut self, job: Job, conflicts: u8) {
        self.effects.push_back(Effect::ReadFiles);
        self.state = State::Locked {
            step: Step::Reading(job),
            conflicts,
        };
    }

    fn locked_event(&mut self, step: Step, conflicts: u8, event: Event) {
        match (step, event) {
            (Step::Locking(job), Event::Locked) => self.read_locked(job, conflicts),
            (Step::Reading(job), Event::FilesRead { accounts, failed }) => {
                match self.take_view(accounts, failed) {
                    Ok(_) => self.locked_read(job, conflicts),
                    Err(e) => self.unlock(Next::Finish(Outcome::InvalidStateFile {
                        detail: e.to_string(),
                    })),
                }
            }
            (
                Step::Refreshing(due, then),
                Event::TokenRefreshed {
                    email,
                    refresh_token,
                    reply,
                },
            ) if email == due.email() && &refresh_token == due.refresh_token() => {
                match due.answered(&reply, self.now) {
                    RefreshAnswer::Refreshed(fresh, tokens) => {
                        let change = Change::SetTokens {
                            email,
                            spent: refresh_token,
                            tokens,
                        };
                        self.locked_read(Job::StoreTokens(fresh, change, then), conflicts)
                    }
                    // The read under this very lock showed the token that was refused.
                    // Read again: a writer that ignores the lock may have rotated the
                    // token while the call ran, and then theirs is used.
                    RefreshAnswer::Failed(failed) => {
                        self.read_locked(Job::Move(failed, Some(then)), conflicts)
                    }
                    RefreshAnswer::Kept(fresh) => self.unlock(Next::Token(fresh, then)),
                }
            }
            (Step::Writing(job, mut writes), Event::Written { file, result }) => match result {
                WriteResult::Done => {
                    if let Some((file, content)) = writes.pop_front() {
                        self.wrote(file, content);
                    }
                    self.write_next(job, writes, conflicts)
                }
                // A hand edit landed under the lock: redo the change on the newer content.
                WriteResult::Conflict if conflicts < MAX_WRITE_CONFLICTS => {
                    self.read_locked(job, conflicts + 1)
                }
                WriteResult::Conflict => {
                    self.write_failed(job, file, "it kept changing under the lock".into())
                }
                WriteResult::Failed(why) => self.write_failed(job, file, why),
            },
            (step, _) => self.state = State::Locked { step, conflicts },
        }
    }

    /// Keeps the view at what the files now hold, so later changes build on our own.
    fn wrote(&mut self, file: StateFile, content: FileText) {
        let view = self.view.as_mut().expect("writes follow a read");
        match file {
            StateFile::Accounts => {
                view.accounts =
                    Arc::new(AccountsFile::parse(&content.0).expect("gibby writes what it parses"));
                view.accounts_read = FileRead::Text(content.0.into());
            }
            StateFile::Failed => {
                view.failed = FailedFile::parse(&content.0).map(Arc::new);
                view.failed_read = FileRead::Text(content.0.into());
            }
        }
    }

    /// Asks for the first of `writes`, or, with none left, finishes the job.
    fn write_next(&mut self, job: Job, writes: VecDeque<(StateFile, FileText)>, conflicts: u8) {
        let Some((file, content)) = writes.front() else {
            let next = self.job_done(job);
            return self.unlock(next);
        };
        let view = self.view();
        let expected = match file {
            StateFile::Accounts => view.accounts_read.clone(),
            StateFile::Failed => view.failed_read.clone(),
        };
        self.effects.push_back(Effect::Write {
            file: *file,
            content: content.clone(),
            expected,
        });
        self.state = State::Locked {
            step: Step::Writing(job, writes),
            conflicts,
        };
    }

    /// Under the lock, with a fresh read showing `due`'s refresh token: send it upstream.
    fn send_refresh(&mut self, due: RefreshDue, then: Then, conflicts: u8) {
        self.refreshed.insert(due.email().to_owned());
        self.effects.push_back(due.effect());
        self.state = State::Locked {
            step: Step::Refreshing(due, then),
            conflicts,
        };
    }

    /// Under the lock, with a fresh read in `self.view`: decide what to write.
    fn locked_read(&mut self, job: Job, conflicts: u8) {
        let view = self.view();
        let mut accounts = AccountsFile::clone(&view.accounts);
        let mut writes = VecDeque::new();
        match &job {
            Job::Refresh(due, then) => {
                let then = *then;
                // Disabled by hand since our read: neither refreshed nor served.
                let next = match view
                    .accounts
                    .find(due.email())
                    .filter(|a| !a.disabled)
                    .cloned()
                {
                    Some(stored) if stored.refresh_token == *due.refresh_token() => {
                        let Job::Refresh(due, _) = job else {
                            unreachable!()
                        };
                        if self.refreshed.contains(due.email()) {
                            Next::Token(due.without_refresh(), then)
                        } else {
                            return self.send_refresh(due, then, conflicts);
                        }
                    }
                    // Their tokens may be due too: then they are refreshed (once) first.
                    Some(stored) => {
                        let Job::Refresh(due, _) = job else {
                            unreachable!()
                        };
                        let may_refresh = !self.refreshed.contains(due.email());
                        match due.rotated_elsewhere(stored, self.now, may_refresh) {
                            Ok(fresh) => Next::Token(fresh, then),
                            Err(due) => return self.send_refresh(due, then, conflicts),
                        }
                    }
                    _ => {
                        let email = due.email().to_owned();
                        self.pass_over(&email, Reason::ChangedMeanwhile);
                        Next::Select
                    }
                };
                return self.unlock(next);
            }
            Job::FinishMoves => {
                if let Ok(failed) = &view.failed {
                    for account in change::interrupted_moves(&accounts, failed) {
                        change::remove(&mut accounts, &account);
                        let email = account.email.clone();
                        self.pass_over(
                            &email,
                            Reason::Invalid(
                                "already in failed.json: finished an interrupted move".into(),
                            ),
                        );
                    }
                }
            }
            Job::StoreTokens(_, change, _) => {
                let email = change_email(change);
                let replaced = accounts.find(email).map(|a| a.access_token.clone());
                if change.apply(&mut accounts) {
                    let (Some(old), Some(new)) = (
                        replaced,
                        accounts.find(email).map(|a| a.access_token.clone()),
                    ) else {
                        unreachable!("the tokens were just stored for this account")
                    };
                    for pending in &mut self.changes {
                        pending.follow_refresh(email, &old, &new);
                    }
                } else {
                    self.warnings.push(format!(
                        "{}: the refreshed tokens were not stored: the account changed meanwhile",
                        change_email(change)
                    ));
                }
            }
            Job::Persist(_) => {
                for change in &self.changes {
                    change.apply(&mut accounts);
                }
            }
            Job::Move(failed, then) => {
                let then = *then;
                let same = view.accounts.accounts.iter().find(|a| failed.matches(a));
                let Some(account) = same.cloned() else {
                    let next = match (then, view.accounts.find(failed.email())) {
                        (Some(then), Some(theirs)) if !theirs.disabled => {
                            let theirs = theirs.clone();
                            let Job::Move(failed, _) = job else {
                                unreachable!()
                            };
                            let may_refresh = !self.refreshed.contains(failed.email());
                            match failed.rotated_elsewhere(theirs, self.now, may_refresh) {
                                Ok(fresh) => Next::Token(fresh, then),
                                // Still under the lock, with this very read.
                                Err(due) => return self.send_refresh(due, then, conflicts),
                            }
                        }
                        _ => {
                            self.pass_over(failed.email(), Reason::ChangedMeanwhile);
                            Next::Select
                        }
                    };
                    return self.unlock(next);
                };
                let record = match &view.failed {
                    Ok(record) => record,
                    Err(e) => {
                        let detail = format!("{e}; {} stays in accounts.json", failed.email());
                        return self.unlock(Next::Finish(Outcome::InvalidStateFile { detail }));
                    }
                };
                if !record.accounts.contains(&account) {
                    let mut record = FailedFile::clone(record);
                    record.accounts.push(account.clone());
                    writes.push_back((StateFile::Failed, FileText(record.to_text())));
                }
                change::remove(&mut accounts, &account);
            }
        }
        if accounts != *self.view().accounts {
            writes.push_back((StateFile::Accounts, FileText(accounts.to_text())));
        }
        self.write_next(job, writes, conflicts)
    }

    /// The job's writes are done (or were not needed): where the request goes next.
    fn job_done(&mut self, job: Job) -> Next {
        match job {
            Job::FinishMoves | Job::Refresh(..) => Next::Select,
            Job::StoreTokens(fresh, _, then) => Next::Token(fresh, then),
            Job::Persist(outcome) => Next::Finish(outcome),
            Job::Move(failed, _) => {
                self.pass_over(failed.email(), Reason::Invalid(failed.why().to_owned()));
                Next::Select
            }
        }
    }

    /// A write did not happen. Nothing is lost: the old file is intact.
    fn write_failed(&mut self, job: Job, file: StateFile, why: String) {
        self.warnings
            .push(format!("{}: not written: {why}", file.name()));
        let next = match job {
            Job::Move(failed, _) if file == StateFile::Failed => {
                self.pass_over(
                    failed.email(),
                    Reason::NotMoved(format!("{}: {why}", file.name())),
                );
                Next::Select
            }
            job => self.job_done(job),
        };
        self.unlock(next)
    }
}

fn change_email(change: &Change) -> &str {
    match change {
        Change::SetUsage { email, .. }
        | Change::SetTokens { email, .. }
        | Change::SetActive { email, .. } => email,
    }
}

#[cfg(test)]
mod memo_tests {
    use super::*;

    #[test]
    fn the_memo_reuses_a_parse_only_for_the_same_text() {
        let memo = ParseMemo::default();
        let one: Arc<str> = r#"{"active_account": null, "accounts": []}"#.into();
        let same: Arc<str> = one.to_string().into();
        let other: Arc<str> = r#"{"active_account": "x", "accounts": []}"#.into();
        let first = memo.parse(&one).unwrap();
        assert!(Arc::ptr_eq(&first, &memo.parse(&one).unwrap()));
        assert!(Arc::ptr_eq(&first, &memo.parse(&same).unwrap()));
        let changed = memo.parse(&other).unwrap();
        assert_eq!(changed.active_account.as_deref(), Some("x"));
        assert!(
            memo.parse(&"{".into()).is_err(),
            "a broken text is an error"
        );
        // A broken text leaves the last good parse in place, and never replaces the answer.
        assert!(Arc::ptr_eq(&changed, &memo.parse(&other).unwrap()));
    }

    #[test]
    fn failed_json_and_the_moves_it_shows_are_remembered_for_the_same_texts() {
        let account = |email: &str, refresh: &str| Account {
            email: email.into(),
            access_token: crate::model::Secret::new("at"),
            refresh_token: crate::model::Secret::new(refresh),
            token_refresh_at: Some(10),
            usage: None,
            usage_checked_at: None,
            disabled: false,
        };
        let memo = ParseMemo::default();
        let pool = AccountsFile {
            active_account: None,
            accounts: vec![account("a@x", "rt"), account("b@x", "rt")],
        };
        let pool: Arc<str> = pool.to_text().into();
        let moved = FailedFile {
            accounts: vec![account("c@x", "rt"), account("b@x", "rt")],
        };
        let moved: Arc<str> = moved.to_text().into();
        let (accounts, failed) = (
            memo.parse(&pool).unwrap(),
            memo.parse_failed(&moved).unwrap(),
        );
        assert_eq!(memo.moves(&accounts, &failed), vec![account("b@x", "rt")]);
        let again = memo.parse_failed(&moved.to_string().into()).unwrap();
        assert!(Arc::ptr_eq(&failed, &again), "the same text is parsed once");
        assert_eq!(memo.moves(&accounts, &again), vec![account("b@x", "rt")]);
        // b@x re-added by hand with new tokens: not the same object, no move.
        let readded = FailedFile {
            accounts: vec![account("b@x", "older")],
        };
        let readded = memo.parse_failed(&readded.to_text().into()).unwrap();
        assert!(memo.moves(&accounts, &readded).is_empty());
    }
}
