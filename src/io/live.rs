//! The live interpreter: performs the core's effects with the file system and reqwest.
//! A loop without policy: perform, feed back, repeat.

use std::sync::Arc;

use futures_util::future::join_all;

use super::store::{LockGuard, Store};
use super::upstream::Upstream;
use crate::core::{Effect, Event, Outcome, StateFile, TokenRequest};
use crate::settings::Policy;

/// Where the interpreter reads the time: the system clock, or a fixed one in tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

#[derive(Clone)]
pub struct Live {
    pub store: Store,
    pub upstream: Upstream,
    pub policy: Policy,
    pub clock: Clock,
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
}

impl Live {
    /// Serves one `/token` request.
    pub async fn token(&self) -> Result<Finished, LiveError> {
        self.run(TokenRequest::new((self.clock)(), self.policy))
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
            for ((step, effect), event) in calls.iter().zip(events) {
                tracing::trace!(?event, "event");
                observe(*step, effect, &event);
                request.handle(event);
            }
        }
        drop(lock);
        let warnings = request.warnings().to_vec();
        let outcome = request.into_outcome().ok_or(LiveError::NoOutcome)?;
        Ok(Finished { outcome, warnings })
    }

    async fn call(&self, effect: Effect) -> Event {
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
                let reply = self.upstream.refresh(&refresh_token).await;
                Event::TokenRefreshed {
                    email,
                    refresh_token,
                    reply,
                }
            }
            Effect::Validate {
                email,
                access_token,
                account_id,
            } => {
                let reply = self
                    .upstream
                    .validate(&access_token, account_id.as_deref())
                    .await;
                Event::ValidationAnswered {
                    email,
                    access_token,
                    reply,
                }
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
