//! gibby owns a pool of ChatGPT accounts signed in for Codex and answers `GET /token`
//! with an access token that works right now.
//!
//! # Layout
//!
//! - [`model`]: the state files (`accounts.json`, `failed.json`) and token claims.
//! - [`settings`]: the environment, parsed and checked at startup.
//! - [`core`]: the pure request state machine: typed lifecycle stages, effects and
//!   events, the selection rule and the upstream verdicts. No I/O, no clock.
//! - [`io`]: the only place with I/O: the file store (atomic writes, the lock), the
//!   upstream HTTP client and the live interpreter that performs the core's effects.
//! - [`http`]: the axum router and its one error type.
//! - [`fake_upstream`]: an in-repo stand-in for the OpenAI auth server and the ChatGPT
//!   backend, used by tests, the demo and benchmarks.
//! - [`replay`]: scenarios (files, clock, upstream answers, expected outcomes) and the
//!   replay interpreter that runs them through the core and traces every step.
//! - [`cmd`]: `status`, `check` and `import`, the operator's commands.
//! - [`serve`]: `gibby serve`: binding and graceful shutdown.
//! - [`demo`]: a ready demo: the fake upstream plus a generated pool.

pub mod cmd;
pub mod core;
pub mod demo;
pub mod fake_upstream;
pub mod http;
pub mod io;
pub mod model;
pub mod replay;
pub mod serve;
pub mod settings;
