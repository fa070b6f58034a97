//! The only place with I/O: the file store, the upstream client, the live interpreter.
#![allow(clippy::disallowed_methods)] // the one place that performs effects

pub mod live;
pub mod record;
pub mod store;
pub mod upstream;

pub use live::{Finished, Live, LiveError};
pub use store::Store;
pub use upstream::Upstream;
