//! The live interpreter: performs the core's effects with the file system and reqwest.
//! A loop without policy: perform, feed back, repeat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::join_all;
use tokio::sync::watch;

use super::store::{LockGuard, Store};
use super::upstream::Upstream;
use crate::core::{Effect, Event, Outcome, Reply, StateFile, TokenRequest, WriteResult};
use crate::model::Secret;
use crate::settings::Policy;

/// Where the interpreter reads the time: the system clock, or a fixed one in tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

#[derive(Clone)]
pub struct Live {
    pub store: Store,
    pub upstream: Upstream,
    pub policy: Policy,
    pub clock: Clock,
    /// Validation calls in flight, by token: concurrent requests for the same token share one.
    pub validations: Validations,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("store", &self.store)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// What the interpreter itself could not do.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The lock file could not be opened or locked.
    #[error("cannot lock the data directory: {0}")]
    Lock(std::io::Error),
    /// The core stopped asking for effects without an outcome (a bug).
    #[error("the request ended without an answer")]
    NoOutcome,
}

/// A finished request: the outcome and what the operator should hear about.
#[derive(Debug)]
pub struct Finished {
    pub outcome: Outcome,
    pub warnings: Vec<String>,
    /// Upstream calls this request sent itself (a shared validation it joined is not one).
    pub upstream_calls: usize,
    /// Files this request replaced.
    pub writes: usize,
}

type InFlight = HashMap<(String, Option<String>), Arc<watch::Sender<Option<Reply>>>>;

/// Validation calls in flight, keyed by access token and account id. A request that needs
/// a validation of a token already being validated waits for that call's answer instead of
/// sending another. The request that started the call sends it itself, in its own task
/// (no extra task, no extra thread hop on the hot path), and publishes the answer once;
/// the others are woken once, when it is in.
///
/// While requests keep joining, the next call for the token goes out before the answer of
/// the last one wakes them: when a call that others joined is accepted (a 200), a task of
/// its own sends the next call and takes over the entry, so that the requests those
/// answers release, coming straight back, join a call already on its way instead of
/// waiting for one of them to start it. It stops at the first call nobody joined, or that
/// was not accepted.
#[derive(Clone, Default)]
pub struct Validations {
    in_flight: Arc<Mutex<InFlight>>,
}

type Key = (String, Option<String>);
type Answer = Arc<watch::Sender<Option<Reply>>>;

/// The sender's claim on an in-flight entry. It takes the entry out of the map (or hands it
/// to the next call) before it publishes the answer, so a finished call is never reused;
/// it also gives the entry up when the sender is dropped half-way: its waiters then see a
/// closed channel, and no entry is left that nobody will answer.
struct Started {
    validations: Validations,
    key: Key,
    answer: Answer,
    removed: bool,
}

impl Started {
    fn joined(&self) -> bool {
        self.answer.receiver_count() > 0
    }

    fn finish(mut self, reply: Reply) {
        self.remove();
        self.answer.send_replace(Some(reply));
    }

    /// Gives the entry to a new call; this one's waiters still get this one's answer.
    fn hand_over(&mut self) -> Started {
        let answer: Answer = Arc::new(watch::Sender::new(None));
        self.removed = true;
        self.validations
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.key.clone(), answer.clone());
        Started {
            validations: self.validations.clone(),
            key: self.key.clone(),
            answer,
            removed: false,
        }
    }

    fn remove(&mut self) {
        if !std::mem::replace(&mut self.removed, true) {
            self.validations
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.key);
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.remove();
    }
}

fn accepted(reply: &Reply) -> bool {
    matches!(reply, Reply::Http(http) if http.status == 200)
}

/// Publishes `reply` for `started`; first, when others joined it and it was accepted, sends
/// the next call from a task of its own and lets it go out.
async fn publish(
    mut started: Started,
    reply: Reply,
    upstream: &Upstream,
    access_token: &Secret,
    account_id: Option<&str>,
) {
    if started.joined() && accepted(&reply) {
        let next = started.hand_over();
        tokio::spawn(relay(
            next,
            upstream.clone(),
            access_token.clone(),
            account_id.map(str::to_owned),
        ));
        // Deferred until the tasks ready now have run: the next call is on the wire
        // before this answer wakes anyone.
        tokio::task::yield_now().await;
    }
    started.finish(reply);
}

/// A call sent ahead for requests that keep coming (see [`Validations`]).
fn relay(
    started: Started,
    upstream: Upstream,
    access_token: Secret,
    account_id: Option<String>,
) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        let reply = upstream
            .validate(&access_token, account_id.as_deref())
            .await;
        publish(
            started,
            reply,
            &upstream,
            &access_token,
            account_id.as_deref(),
        )
        .await;
    })
}

impl Validations {
    /// Joins the call in flight for this token, or sends one with `upstream`.
    /// Returns the answer and whether this request sent the call.
    async fn validate(
        &self,
        upstream: &Upstream,
        access_token: &Secret,
        account_id: Option<&str>,
    ) -> (Reply, bool) {
        let key = (
            access_token.expose().to_owned(),
            account_id.map(str::to_owned),
        );
        let joined = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            match in_flight.get(&key) {
                Some(answer) => Err(answer.subscribe()),
                None => {
                    let answer: Answer = Arc::new(watch::Sender::new(None));
                    in_flight.insert(key.clone(), answer.clone());
                    Ok(Started {
                        validations: self.clone(),
                        key,
                        answer,
                        removed: false,
                    })
                }
            }
        };
        match joined {
            Ok(started) => {
                let reply = upstream.validate(access_token, account_id).await;
                publish(started, reply.clone(), upstream, access_token, account_id).await;
                (reply, true)
            }
            Err(mut waiting) => {
                let reply = match waiting.wait_for(Option::is_some).await {
                    Ok(answer) => answer.clone().expect("waited for an answer"),
                    // The request that sent the call went away without an answer.
                    Err(_) => Reply::Transport("the shared validation call was abandoned".into()),
                };
                (reply, false)
            }
        }
    }
}

impl Live {
    /// Serves one `/token` request.
    pub async fn token(&self) -> Result<Finished, LiveError> {
        self.run(TokenRequest::new((self.clock)(), self.policy).with_memo(self.store.memo()))
            .await
    }

    pub async fn run(&self, request: TokenRequest) -> Result<Finished, LiveError> {
        self.run_observed(request, &mut |_, _, _| {}).await
    }

    /// [`run`](Self::run), showing `observe` every effect with its number (from 1, in the
    /// order the core asked for them) and the event that answered it. Recording uses this.
    pub async fn run_observed(
        &self,
        mut request: TokenRequest,
        observe: &mut (dyn FnMut(usize, &Effect, &Event) + Send),
    ) -> Result<Finished, LiveError> {
        let mut lock: Option<LockGuard> = None;
        let (mut upstream_calls, mut writes) = (0, 0);
        let mut step = 0;
        loop {
            let mut calls = Vec::new();
            while let Some(effect) = request.poll_effect() {
                tracing::debug!(?effect, "effect");
                step += 1;
                let event = match &effect {
                    Effect::ReadFiles if lock.is_none() => Event::FilesRead {
                        accounts: self.store.read_unlocked(StateFile::Accounts),
                        failed: self.store.read_unlocked(StateFile::Failed),
                    },
                    Effect::ReadFiles => Event::FilesRead {
                        accounts: self.store.read(StateFile::Accounts),
                        failed: self.store.read(StateFile::Failed),
                    },
                    Effect::Lock => {
                        lock = Some(self.store.lock().await.map_err(LiveError::Lock)?);
                        Event::Locked
                    }
                    Effect::Unlock => {
                        lock = None;
                        Event::Unlocked
                    }
                    Effect::Write {
                        file,
                        content,
                        expected,
                    } => {
                        debug_assert!(lock.is_some(), "writes happen under the lock");
                        let result = self.store.write(*file, &content.0, expected);
                        writes += usize::from(result == WriteResult::Done);
                        Event::Written {
                            file: *file,
                            result,
                        }
                    }
                    _ => {
                        calls.push((step, effect));
                        continue;
                    }
                };
                observe(step, &effect, &event);
                request.handle(event);
            }
            if calls.is_empty() {
                break;
            }
            let events = join_all(calls.iter().map(|(_, c)| self.call(c.clone()))).await;
            for ((step, effect), (event, sent)) in calls.iter().zip(events) {
                tracing::trace!(?event, "event");
                upstream_calls += usize::from(sent);
                observe(*step, effect, &event);
                request.handle(event);
            }
        }
        drop(lock);
        let warnings = request.warnings().to_vec();
        let outcome = request.into_outcome().ok_or(LiveError::NoOutcome)?;
        Ok(Finished {
            outcome,
            warnings,
            upstream_calls,
            writes,
        })
    }

    /// Performs one upstream call; says whether it was sent (rather than joined).
    async fn call(&self, effect: Effect) -> (Event, bool) {
        match effect {
            Effect::FetchUsage {
                email,
                access_token,
                account_id,
            } => {
                let reply = self
                    .upstream
                    .usage(&access_token, account_id.as_deref())
                    .await;
                let event = Event::UsageFetched {
                    email,
                    access_token,
                    reply,
                };
                (event, true)
            }
            Effect::RefreshToken {
                email,
                refresh_token,
            } => {
                let reply = self.upstream.refresh(&refresh_token).await;
                let event = Event::TokenRefreshed {
                    email,
                    refresh_token,
                    reply,
                };
                (event, true)
            }
            Effect::Validate {
                email,
                access_token,
                account_id,
            } => {
                let (reply, sent) = self
                    .validations
                    .validate(&self.upstream, &access_token, account_id.as_deref())
                    .await;
                let event = Event::ValidationAnswered {
                    email,
                    access_token,
                    reply,
                };
                (event, sent)
            }
            _ => unreachable!("only upstream calls are collected"),
        }
    }
}

pub fn system_clock() -> Clock {
    Arc::new(unix_now)
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fake_upstream::{AccountSpec, Endpoint, FakeUpstream};
    use crate::settings::Settings;

    async fn upstream(fake: &FakeUpstream) -> (Upstream, crate::fake_upstream::RunningFake) {
        let running = fake.start(0).await.expect("fake starts");
        let mut settings = Settings::from_lookup(|_| None).expect("default settings");
        settings.chatgpt_base_url = running.base_url.clone();
        settings.auth_base_url = running.base_url.clone();
        (Upstream::new(&settings).expect("client"), running)
    }

    /// Waits until `n` requests wait on the call in flight for `token`.
    async fn joined(validations: &Validations, token: &Secret, n: usize) {
        let key = (token.expose().to_owned(), None);
        let waiting = || {
            let in_flight = validations.in_flight.lock().unwrap();
            in_flight.get(&key).map_or(0, |a| a.receiver_count())
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while waiting() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the second request joins the call in flight");
    }

    /// One request sends a validation (held by the fake), a second joins it.
    async fn joined_pair(
        fake: &FakeUpstream,
        upstream: &Upstream,
        token: &Secret,
        validations: &Validations,
    ) -> (
        tokio::task::JoinHandle<(Reply, bool)>,
        tokio::task::JoinHandle<(Reply, bool)>,
    ) {
        let request = || {
            let (v, u, t) = (validations.clone(), upstream.clone(), token.clone());
            tokio::spawn(async move { v.validate(&u, &t, None).await })
        };
        let first = request();
        assert!(
            fake.wait_for_calls(Endpoint::Models, 1, Duration::from_secs(10))
                .await
        );
        let second = request();
        joined(validations, token, 1).await;
        (first, second)
    }

    /// Waits until no validation is in flight.
    async fn settled(validations: &Validations) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !validations.in_flight.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the calls in flight end");
    }

    #[tokio::test]
    async fn a_validation_in_flight_is_joined_and_a_finished_one_is_not_reused() {
        let fake = FakeUpstream::new();
        let issued = fake.add_account(AccountSpec::new("a@x"));
        let (upstream, _running) = upstream(&fake).await;
        let token = Secret::new(issued.access_token);
        let validations = Validations::default();
        let gate = fake.hold(Endpoint::Models);
        let (first, second) = joined_pair(&fake, &upstream, &token, &validations).await;
        // The call sent ahead (below) is held by this gate; the first one by the old one.
        let ahead = fake.hold(Endpoint::Models);
        gate.open();
        let (a, sent_a) = first.await.expect("first");
        let (b, sent_b) = second.await.expect("second");
        assert_eq!((sent_a, sent_b), (true, false));
        assert_eq!(a, b);
        assert!(matches!(&a, Reply::Http(r) if r.status == 200), "{a:?}");

        // Someone joined and it was accepted: the next call went out before the answer was
        // published, and a request arriving now joins it rather than reusing the answer.
        assert!(
            fake.wait_for_calls(Endpoint::Models, 2, Duration::from_secs(10))
                .await
        );
        let third = tokio::spawn({
            let (v, u, t) = (validations.clone(), upstream.clone(), token.clone());
            async move { v.validate(&u, &t, None).await }
        });
        joined(&validations, &token, 1).await;
        ahead.open();
        let (c, sent_c) = third.await.expect("third");
        assert!(!sent_c);
        assert!(matches!(&c, Reply::Http(r) if r.status == 200), "{c:?}");
        // The third joined that one, so one more went ahead; nobody joined it, and there
        // it stops.
        settled(&validations).await;
        assert_eq!(fake.count(Endpoint::Models), 3);

        // Finished: the next request sends a call of its own, and alone sends nothing ahead.
        let (_, sent) = validations.validate(&upstream, &token, None).await;
        assert!(sent);
        assert!(validations.in_flight.lock().unwrap().is_empty());
        assert_eq!(fake.count(Endpoint::Models), 4);
    }

    #[tokio::test]
    async fn nothing_is_sent_ahead_after_a_rejected_validation() {
        let fake = FakeUpstream::new();
        let issued = fake.add_account(AccountSpec::new("a@x"));
        let (upstream, _running) = upstream(&fake).await;
        let token = Secret::new(issued.access_token);
        let validations = Validations::default();
        fake.push_reply(
            Endpoint::Models,
            None,
            crate::fake_upstream::Reply::json(401, serde_json::json!({"detail": "no"})),
        );
        let gate = fake.hold(Endpoint::Models);
        let (first, second) = joined_pair(&fake, &upstream, &token, &validations).await;
        gate.open();
        let (a, _) = first.await.expect("first");
        let (b, _) = second.await.expect("second");
        assert_eq!(a, b);
        assert!(matches!(&a, Reply::Http(r) if r.status == 401), "{a:?}");
        assert!(validations.in_flight.lock().unwrap().is_empty());
        assert_eq!(fake.count(Endpoint::Models), 1);
    }

    #[tokio::test]
    async fn waiters_on_an_abandoned_validation_get_a_transient_answer() {
        let fake = FakeUpstream::new();
        let issued = fake.add_account(AccountSpec::new("a@x"));
        let (upstream, _running) = upstream(&fake).await;
        let token = Secret::new(issued.access_token);
        let validations = Validations::default();
        let _gate = fake.hold(Endpoint::Models);
        let (first, second) = joined_pair(&fake, &upstream, &token, &validations).await;
        first.abort();
        let (reply, sent) = second.await.expect("second");
        assert!(!sent);
        assert!(matches!(reply, Reply::Transport(_)), "{reply:?}");
        assert!(validations.in_flight.lock().unwrap().is_empty());
    }
}
