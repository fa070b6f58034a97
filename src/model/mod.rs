//! Data shapes: the state files and the token claims. No I/O here.

mod claims;
mod files;
mod secret;

pub use claims::Claims;
pub use files::{
    email_problem, shown_email, Account, AccountsFile, FailedFile, FileError, Usage, Window,
    ACCOUNTS_FILE, FAILED_FILE,
};
pub use secret::Secret;
