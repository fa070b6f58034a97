//! The pure core: no I/O, no clock, no async. `now` is a parameter.
//!
//! # Driving contract
//!
//! 1. Make a [`TokenRequest`] with the current time and the policy.
//! 2. Take every effect from [`TokenRequest::poll_effect`] until it returns `None`.
//!    Upstream calls taken together may be performed at once; file effects come one at a
//!    time and must be performed in order.
//! 3. Feed the result of each effect to [`TokenRequest::handle`] as its [`Event`].
//! 4. Repeat from 2 until [`TokenRequest::outcome`] is set. A `Lock` is always followed,
//!    eventually, by its `Unlock`, so an interpreter that performs every effect never
//!    leaves the lock held.
//!
//! The account lifecycle is in [`stage`]; which upstream answer means what is in
//! [`verdict`]; how a change is applied to a fresh read is in [`change`].

pub mod change;
pub mod effect;
pub mod request;
pub mod select;
pub mod stage;
pub mod verdict;
pub mod wire;

pub use effect::{Effect, Event, FileRead, FileText, HttpReply, Reply, StateFile, WriteResult};
pub use request::{Others, Outcome, ParseMemo, PassOver, TokenRequest};
pub use stage::{Reason, TokenAnswer};

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;
