//! The live interpreter: performs the core's effects with the file system and reqwest.
//! A loop without policy: perform, feed back, repeat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::{join_all, BoxFuture, Shared};
use futures_util::FutureExt;

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

type InFlight = HashMap<(String, Option<String>), Shared<BoxFuture<'static, Reply>>>;

/// Validation calls in flight, keyed by access token and account id. A request that needs
/// a validation of a token already being validated joins that call instead of sending
/// another; the call runs as its own task, so a request that goes away cannot strand the
/// others, and the task removes its entry when the answer is in.
#[derive(Clone, Default)]
pub struct Validations {
    in_flight: Arc<Mutex<InFlight>>,
}

impl Validations {
    /// Joins the call in flight for this token, or starts one with `upstream`.
    /// Returns the answer and whether this request started the call.
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
        let (call, started) = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            match in_flight.get(&key) {
                Some(call) => (call.clone(), false),
                None => {
                    let (upstream, token, id) =
                        (upstream.clone(), access_token.clone(), key.1.clone());
                    let map = self.in_flight.clone();
                    let entry = key.clone();
                    let task = tokio::spawn(async move {
                        let reply = upstream.validate(&token, id.as_deref()).await;
                        map.lock().unwrap_or_else(|e| e.into_inner()).remove(&entry);
                        reply
                    });
                    let call = async move {
                        task.await
                            .unwrap_or_else(|e| Reply::Transport(format!("validation task: {e}")))
                    }
                    .boxed()
                    .shared();
                    in_flight.insert(key, call.clone());
                    (call, true)
                }
            }
        };
        (call.await, started)
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
