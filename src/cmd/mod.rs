//! The operator's subcommands besides `serve`: one file each. They read the files
//! directly and never call the upstream.

pub mod check;
pub mod import;
pub mod status;

use std::path::Path;

use crate::core::{FileRead, StateFile};
use crate::io::store;

/// Reads one state file of `dir`; `None` when it does not exist.
fn read(dir: &Path, file: StateFile) -> Result<Option<String>, String> {
    match store::read(&dir.join(file.name())) {
        FileRead::Missing => Ok(None),
        FileRead::Text(text) => Ok(Some(text.to_string())),
        FileRead::Unreadable(why) => Err(format!("{}: cannot be read: {why}", file.name())),
    }
}
