//! Effects the core asks for (commands) and the events that answer them (past tense).
//!
//! Effects are primitive on purpose: read, lock, write, one HTTP call. Every decision
//! about what to read, write or call lives in the core, so the live, replay and simulated
//! interpreters differ only in how they carry an effect out. Each upstream event repeats
//! the account and the token it was about, so a stale answer is recognisable.

use crate::model::Secret;

/// Which state file a write is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateFile {
    Accounts,
    Failed,
}

impl StateFile {
    pub fn name(self) -> &'static str {
        match self {
            StateFile::Accounts => crate::model::ACCOUNTS_FILE,
            StateFile::Failed => crate::model::FAILED_FILE,
        }
    }
}

/// The content of a file as read. Debug shows only sizes: the files hold tokens.
#[derive(Clone, PartialEq, Eq)]
pub enum FileRead {
    Missing,
    Text(std::sync::Arc<str>),
    /// It exists but could not be read (permissions, not UTF-8, I/O error).
    Unreadable(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Read accounts.json and failed.json as they are now.
    ReadFiles,
    /// Take the exclusive write lock of the data directory; answered by [`Event::Locked`].
    Lock,
    /// Release it; answered by [`Event::Unlocked`].
    Unlock,
    /// Replace `file` with `content` atomically, but only if it still holds `expected`
    /// (a hand edit may land while the lock is held: editors do not take it).
    Write {
        file: StateFile,
        content: FileText,
        expected: FileRead,
    },
    /// `GET {CHATGPT}/backend-api/wham/usage`.
    FetchUsage {
        email: String,
        access_token: Secret,
        account_id: Option<String>,
    },
    /// `POST {AUTH}/oauth/token` with `grant_type=refresh_token`.
    RefreshToken {
        email: String,
        refresh_token: Secret,
    },
    /// `GET {CHATGPT}/backend-api/codex/models?client_version=..`.
    Validate {
        email: String,
        access_token: Secret,
        account_id: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    FilesRead {
        accounts: FileRead,
        failed: FileRead,
    },
    Locked,
    Unlocked,
    Written {
        file: StateFile,
        result: WriteResult,
    },
    UsageFetched {
        email: String,
        access_token: Secret,
        reply: Reply,
    },
    TokenRefreshed {
        email: String,
        refresh_token: Secret,
        reply: Reply,
    },
    ValidationAnswered {
        email: String,
        access_token: Secret,
        reply: Reply,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteResult {
    Done,
    /// The file no longer held what was expected; nothing was written.
    Conflict,
    /// The write failed (disk full, permissions); the old file is intact.
    Failed(String),
}

/// What an upstream call came back with, unjudged: the core classifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Http(HttpReply),
    /// No HTTP answer: timeout, refused connection, reset, TLS failure.
    Transport(String),
}

#[derive(Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: Option<String>,
    /// `cf-mitigated: challenge`: a Cloudflare challenge page, never a verdict.
    pub challenge: bool,
    pub body: String,
}

impl HttpReply {
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        HttpReply {
            status,
            content_type: Some("application/json".into()),
            challenge: false,
            body: body.into(),
        }
    }
}

/// The body of a refresh answer holds tokens, so Debug shows only its length.
impl std::fmt::Debug for HttpReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpReply")
            .field("status", &self.status)
            .field("content_type", &self.content_type)
            .field("challenge", &self.challenge)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

/// The whole new content of a state file. Debug shows only its size.
#[derive(Clone, PartialEq, Eq)]
pub struct FileText(pub String);

impl std::fmt::Debug for FileText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl std::fmt::Debug for FileRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileRead::Missing => write!(f, "Missing"),
            FileRead::Text(text) => write!(f, "Text(<{} bytes>)", text.len()),
            FileRead::Unreadable(why) => f.debug_tuple("Unreadable").field(why).finish(),
        }
    }
}
