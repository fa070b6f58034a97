//! The data directory: reads, the write lock, atomic writes.
//!
//! Files are only ever replaced by rename, so a read needs no lock and always sees a
//! whole file. Writers (gibby processes and cooperating helpers) serialise on an
//! exclusive `flock` of `<data dir>/.gibby.lock`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::core::{FileRead, ParseMemo, StateFile, WriteResult};

pub const LOCK_FILE: &str = ".gibby.lock";

/// How long a writer waits for the lock before it gives up. Another writer holds it at
/// most across one refresh call (bounded by the upstream timeout) and a few writes.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);
/// After this long a waiting writer says in the log whom it is waiting for.
const LOCK_WAIT_WARNING: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    /// Requests of this process queue here first, so only one thread waits in `flock`.
    local: Arc<tokio::sync::Mutex<()>>,
    /// Each file as last read, so that a read of unchanged bytes hands out the same shared
    /// text (and the core can reuse its parse) without holding a second copy.
    last: Arc<std::sync::Mutex<[Option<Seen>; 2]>>,
    memo: Arc<ParseMemo>,
    lock_timeout: Duration,
    /// How long ago a file must have last changed for a read to trust its stamp ([`Seen`]).
    settle: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Held while the lock is held; dropping it releases both locks.
#[derive(Debug)]
pub struct LockGuard {
    _file: std::fs::File,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store {
            dir: dir.into(),
            local: Arc::new(tokio::sync::Mutex::new(())),
            last: Arc::default(),
            memo: Arc::default(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            settle: SETTLE,
        }
    }

    /// Trusts the stamp of files that last changed `settle` before a read (tests only: the
    /// default is [`SETTLE`]).
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// Waits at most `timeout` for the lock (see [`lock`](Self::lock)).
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Where requests of this store share the parse of unchanged accounts.json bytes.
    pub fn memo(&self) -> Arc<ParseMemo> {
        self.memo.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, file: StateFile) -> PathBuf {
        self.dir.join(file.name())
    }

    /// The file as it is now, every byte read. When they are the bytes of the last read,
    /// the text of that read is handed out again (the core then reuses its parse). Reads
    /// under the lock use this.
    pub fn read(&self, file: StateFile) -> FileRead {
        let last = self.slot(file).map(|seen| seen.text);
        let (read, seen) = read_stamped(&self.path(file), self.settle, last.as_ref());
        self.last.lock().unwrap_or_else(|e| e.into_inner())[file as usize] = seen;
        read
    }

    /// The file as it is now, for a read outside the lock (the first read of every
    /// `/token`). When the file is the very one the last read saw, not changed since, and
    /// that read found it settled (see [`Seen`]), its text is handed out without reading
    /// the bytes again: one `stat` instead of a read of the whole pool.
    pub fn read_unlocked(&self, file: StateFile) -> FileRead {
        let path = self.path(file);
        if let Some(seen) = self.slot(file).filter(|seen| seen.settled) {
            if fs_err::metadata(&path).is_ok_and(|m| Stamp::of(&m) == seen.stamp) {
                return FileRead::Text(seen.text);
            }
        }
        self.read(file)
    }

    fn slot(&self, file: StateFile) -> Option<Seen> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())[file as usize].clone()
    }

    /// Takes the exclusive write lock, waiting for other writers: past a second it says so
    /// in the log, and past the lock timeout it gives up with [`std::io::ErrorKind::TimedOut`]
    /// (a helper that hangs holding the lock must not hang gibby). The wait polls a
    /// non-blocking `flock`, so a waiter holds no thread and can be dropped.
    pub async fn lock(&self) -> std::io::Result<LockGuard> {
        let local = self.local.clone().lock_owned().await;
        let path = self.dir.join(LOCK_FILE);
        let file = open_lock_file(&path)?;
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(1);
        let mut warned = false;
        while !try_flock(&file)? {
            let waited = started.elapsed();
            if waited >= self.lock_timeout {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "{} has been held by another writer for {} s",
                        path.display(),
                        waited.as_secs()
                    ),
                ));
            }
            if waited >= LOCK_WAIT_WARNING && !std::mem::replace(&mut warned, true) {
                tracing::warn!(
                    "waiting for {}: another writer holds it (at most {} s)",
                    path.display(),
                    self.lock_timeout.as_secs()
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        remove_abandoned_temporaries(&self.dir);
        Ok(LockGuard {
            _file: file,
            _local: local,
        })
    }

    /// Takes the lock only if it is free at once and lets it go: what a writer killed in
    /// the middle of a write left behind is removed. `serve` does this at startup; when
    /// another writer holds the lock, that writer (or the next one) cleans up instead.
    pub async fn recover(&self) -> std::io::Result<bool> {
        let _local = self.local.lock().await;
        let file = open_lock_file(&self.dir.join(LOCK_FILE))?;
        let free = try_flock(&file)?;
        if free {
            remove_abandoned_temporaries(&self.dir);
        }
        Ok(free)
    }

    /// Replaces `file` with `content` if it still holds `expected`. Call with the lock held.
    pub fn write(&self, file: StateFile, content: &str, expected: &FileRead) -> WriteResult {
        let path = self.path(file);
        if read(&path) != *expected {
            return WriteResult::Conflict;
        }
        match atomic_write(&path, content.as_bytes()) {
            Ok(()) => WriteResult::Done,
            Err(e) => WriteResult::Failed(e.to_string()),
        }
    }
}

fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Takes the `flock` if it is free; `false` when another writer holds it.
fn try_flock(file: &std::fs::File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own; it is released when the file closes.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => Ok(false),
        _ => Err(e),
    }
}

/// Whether `name` is the temporary file of an [`atomic_write`] of a state file.
pub fn is_temporary(name: &str) -> bool {
    [StateFile::Accounts, StateFile::Failed].iter().any(|f| {
        name.strip_prefix('.')
            .and_then(|n| n.strip_prefix(f.name()))
            .is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp"))
    })
}

/// Removes the temporary files of atomic writes that never finished: a writer killed
/// between creating one and renaming it (SIGKILL, power loss) cannot remove it itself.
/// Call with the lock held: every writer creates its temporary file under the lock, so
/// any found then belongs to nobody.
fn remove_abandoned_temporaries(dir: &Path) {
    let Ok(entries) = fs_err::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if is_temporary(&name) {
            match fs_err::remove_file(entry.path()) {
                Ok(()) => tracing::warn!("removed {name}, left by a write that was interrupted"),
                Err(e) => tracing::warn!("cannot remove a temporary file left behind: {e}"),
            }
        }
    }
}

/// The permission bits of `path` when group or others may read or write it.
pub fn loose_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs_err::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// A file as a read saw it: its text, which file it was and when it last changed, and
/// whether it had settled.
///
/// The kernel sets a file's change time (`ctime`) on every change of content or metadata,
/// and no program can set it back; a file replaced by rename is another inode with its
/// own change time. So a file whose identity, size, modification and change times are
/// all as a read saw them has not changed since, with one exception: timestamps are
/// coarse (a clock tick), so a second write within the same tick as the one before the
/// read leaves them as they were. A read therefore trusts its stamp only for a file whose
/// last change lay [`SETTLE`] or more before the read began (git's "racy clean" rule):
/// any later change gets a later change time. A file changed just now is read in full on
/// every request until it has settled.
#[derive(Clone)]
struct Seen {
    text: Arc<str>,
    stamp: Stamp,
    settled: bool,
}

/// Far longer than any timestamp granularity of a local file system.
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether the file's last change lay `settle` or more before `began`.
    fn settled_before(&self, began: std::time::SystemTime, settle: Duration) -> bool {
        let Ok(began) = began.duration_since(std::time::UNIX_EPOCH) else {
            return false;
        };
        let changed = Duration::new(
            u64::try_from(self.ctime.0).unwrap_or(u64::MAX),
            u32::try_from(self.ctime.1).unwrap_or(0),
        );
        changed.saturating_add(settle) <= began
    }
}

/// Reads the file, with its stamp taken from the open file before its bytes are read.
/// When it holds the bytes of `last`, that text is handed out again; they are compared in
/// small pieces, so many concurrent reads of a large unchanged file need no copy each.
fn read_stamped(
    path: &Path,
    settle: Duration,
    last: Option<&Arc<str>>,
) -> (FileRead, Option<Seen>) {
    use std::io::Read;
    let began = std::time::SystemTime::now();
    let result = fs_err::File::open(path).and_then(|mut file| {
        let stamp = Stamp::of(&file.metadata()?);
        if let Some(last) = last.filter(|t| t.len() as u64 == stamp.size) {
            if holds(&mut file, last.as_bytes())? {
                return Ok((stamp, Ok(last.clone())));
            }
            use std::io::Seek;
            file.rewind()?;
        }
        let mut bytes = Vec::with_capacity(usize::try_from(stamp.size).unwrap_or(0) + 1);
        file.read_to_end(&mut bytes)?;
        Ok((stamp, Err(bytes)))
    });
    let text = match result {
        Ok((stamp, Ok(same))) => Ok((stamp, same)),
        Ok((stamp, Err(bytes))) => match String::from_utf8(bytes) {
            Ok(text) => Ok((stamp, Arc::from(text))),
            Err(e) => Err(FileRead::Unreadable(not_utf8(
                e.as_bytes(),
                e.utf8_error().valid_up_to(),
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(FileRead::Missing),
        Err(e) => Err(FileRead::Unreadable(e.to_string())),
    };
    match text {
        Ok((stamp, text)) => {
            let seen = Seen {
                text: text.clone(),
                stamp,
                settled: stamp.settled_before(began, settle),
            };
            (FileRead::Text(text), Some(seen))
        }
        Err(read) => (read, None),
    }
}

/// Whether the rest of `file` is exactly `expected`.
fn holds(file: &mut impl std::io::Read, expected: &[u8]) -> std::io::Result<bool> {
    let mut buf = [0u8; 16 * 1024];
    let mut at = 0;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(at == expected.len());
        }
        if expected.get(at..at + n) != Some(&buf[..n]) {
            return Ok(false);
        }
        at += n;
    }
}

/// The file as it is now.
pub fn read(path: &Path) -> FileRead {
    read_stamped(path, SETTLE, None).0
}

/// Where the first byte that is not UTF-8 stands, as line and column (1-based, in
/// characters, like serde's positions) and as a byte offset.
fn not_utf8(bytes: &[u8], valid_up_to: usize) -> String {
    let valid = String::from_utf8_lossy(&bytes[..valid_up_to]);
    let line = valid.matches('\n').count() + 1;
    let column = valid.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("not UTF-8 at line {line} column {column} (byte {valid_up_to})")
}

/// Creates `dir` and any missing parents with mode 0700 (before the umask): the data
/// directory holds tokens and a recording directory the pool's emails and usage, so other
/// users may not even list them. A directory that exists already is left as it is.
pub fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))
}

/// Writes a temporary file beside `path` (created 0600), fsyncs it, renames it over
/// `path` and fsyncs the directory. On any failure the temporary file is removed and
/// `path` is untouched.
///
/// A `path` that is a symbolic link is written through: its target is replaced, and the
/// link stays (an operator who keeps the pool elsewhere and links it in keeps one copy).
pub fn atomic_write(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let resolved;
    let path = if fs_err::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        resolved = fs_err::canonicalize(path)?;
        resolved.as_path()
    } else {
        path
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // tempfile creates the file with mode 0600 and deletes it when dropped unpersisted.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(content)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    fs_err::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn text(read: FileRead) -> Arc<str> {
        match read {
            FileRead::Text(text) => text,
            other => panic!("not text: {other:?}"),
        }
    }

    #[test]
    fn a_settled_unchanged_file_is_handed_out_again_without_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.json");
        std::fs::write(&path, "one").unwrap();
        let store = Store::new(dir.path()).with_settle(Duration::ZERO);
        let first = text(store.read_unlocked(StateFile::Accounts));
        let again = text(store.read_unlocked(StateFile::Accounts));
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(&*again, "one");
    }

    #[test]
    fn a_file_replaced_by_rename_is_read_again_even_when_its_size_is_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.json");
        std::fs::write(&path, "one").unwrap();
        let store = Store::new(dir.path()).with_settle(Duration::ZERO);
        assert_eq!(&*text(store.read_unlocked(StateFile::Accounts)), "one");
        atomic_write(&path, b"two").unwrap();
        assert_eq!(&*text(store.read_unlocked(StateFile::Accounts)), "two");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(store.read_unlocked(StateFile::Accounts), FileRead::Missing);
    }

    #[test]
    fn a_file_changed_just_now_is_read_in_full_every_time() {
        // Written a moment ago: not settled, so an in-place rewrite of the same size in the
        // same clock tick (same mtime and ctime) is still seen.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.json");
        std::fs::write(&path, "one").unwrap();
        let store = Store::new(dir.path());
        assert_eq!(&*text(store.read_unlocked(StateFile::Accounts)), "one");
        std::fs::write(&path, "two").unwrap();
        assert_eq!(&*text(store.read_unlocked(StateFile::Accounts)), "two");
        std::fs::write(&path, "one").unwrap();
        assert_eq!(&*text(store.read_unlocked(StateFile::Accounts)), "one");
    }

    #[test]
    fn a_file_settles_only_when_its_last_change_is_old_enough() {
        let at = |secs| std::time::UNIX_EPOCH + Duration::from_secs(secs);
        let stamp = Stamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (1_000, 0),
            ctime: (1_000, 500),
        };
        let settle = Duration::from_secs(3);
        assert!(!stamp.settled_before(at(1_000), settle));
        assert!(!stamp.settled_before(at(1_003), settle));
        assert!(stamp.settled_before(at(1_004), settle));
        // A change time in the future (a clock set back) never settles.
        assert!(!stamp.settled_before(at(900), settle));
    }

    #[test]
    fn a_locked_read_reads_every_byte_and_keeps_the_text_of_equal_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.json");
        std::fs::write(&path, "one").unwrap();
        let store = Store::new(dir.path()).with_settle(Duration::ZERO);
        let first = text(store.read(StateFile::Accounts));
        atomic_write(&path, b"one").unwrap();
        let again = text(store.read(StateFile::Accounts));
        assert!(Arc::ptr_eq(&first, &again), "equal bytes share one text");
        // ... and the new file's stamp is kept, so the unlocked read trusts it.
        assert!(Arc::ptr_eq(
            &first,
            &text(store.read_unlocked(StateFile::Accounts))
        ));
    }

    #[test]
    fn a_symlinked_state_file_is_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join("pool.json");
        std::fs::write(&target, "old").unwrap();
        let link = dir.path().join("accounts.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        atomic_write(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn a_writer_holding_the_lock_makes_a_waiter_time_out_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let holder = Store::new(dir.path());
        let _held = holder.lock().await.unwrap();
        // Another process's lock: a second Store has its own in-process queue, and flock
        // locks of two open files exclude each other even within one process.
        let waiter = Store::new(dir.path()).with_lock_timeout(Duration::from_millis(200));
        let err = waiter.lock().await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains(".gibby.lock"), "{err}");
        assert!(!waiter.recover().await.unwrap(), "recover does not wait");
        drop(_held);
        assert!(waiter.lock().await.is_ok());
        assert!(waiter.recover().await.unwrap());
    }

    #[test]
    fn a_read_sees_every_changed_byte_even_when_the_size_stays() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let path = store.path(StateFile::Accounts);
        std::fs::write(&path, "{\"a\": 1}").unwrap();
        let first = store.read(StateFile::Accounts);
        let FileRead::Text(first_text) = &first else {
            panic!("text expected")
        };
        let FileRead::Text(again) = store.read(StateFile::Accounts) else {
            panic!("text expected")
        };
        assert!(
            Arc::ptr_eq(first_text, &again),
            "unchanged bytes share the text"
        );
        // An in-place edit of the same length (no rename, same inode).
        std::fs::write(&path, "{\"a\": 2}").unwrap();
        assert_eq!(
            store.read(StateFile::Accounts),
            FileRead::Text("{\"a\": 2}".into())
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(store.read(StateFile::Accounts), FileRead::Missing);
        std::fs::write(&path, "{\"a\": 1}").unwrap();
        assert_eq!(store.read(StateFile::Accounts), first);
    }

    #[test]
    fn atomic_write_is_0600_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.json");
        atomic_write(&path, b"one").unwrap();
        atomic_write(&path, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("accounts.json")]);
    }

    #[test]
    fn failed_write_leaves_the_target_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("accounts.json");
        std::fs::create_dir(&target).unwrap(); // rename over a directory fails
        assert!(atomic_write(&target, b"x").is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("accounts.json")]);
    }

    #[test]
    fn a_file_that_is_not_utf8_is_unreadable_with_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.json");
        std::fs::write(&path, b"{\n  \"\xc3\xa9\xff\"").unwrap();
        assert_eq!(
            read(&path),
            FileRead::Unreadable("not UTF-8 at line 2 column 5 (byte 7)".into())
        );
    }

    #[test]
    fn temporary_file_names() {
        for name in [".accounts.json.a1B2c3.tmp", ".failed.json.XyZ987.tmp"] {
            assert!(is_temporary(name), "{name}");
        }
        for name in [
            "accounts.json",
            ".gibby.lock",
            ".accounts.json.swp",
            "accounts.json.tmp",
            ".accounts.jsonx.tmp",
            ".other.json.abc.tmp",
        ] {
            assert!(!is_temporary(name), "{name}");
        }
    }

    #[tokio::test]
    async fn the_lock_removes_temporary_files_a_killed_writer_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        std::fs::write(store.path(StateFile::Accounts), "{}").unwrap();
        for name in [".accounts.json.abc123.tmp", ".failed.json.def456.tmp"] {
            std::fs::write(dir.path().join(name), "half a file").unwrap();
        }
        std::fs::write(dir.path().join("notes.tmp"), "the operator's").unwrap();
        store.recover().await.unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [".gibby.lock", "accounts.json", "notes.tmp"]);
    }

    #[test]
    fn write_refuses_when_the_file_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        std::fs::write(store.path(StateFile::Accounts), "hand edit").unwrap();
        let stale = FileRead::Text("what we read".into());
        assert_eq!(
            store.write(StateFile::Accounts, "new", &stale),
            WriteResult::Conflict
        );
        assert_eq!(
            store.read(StateFile::Accounts),
            FileRead::Text("hand edit".into())
        );
        assert_eq!(
            store.write(StateFile::Failed, "new", &FileRead::Missing),
            WriteResult::Done
        );
    }
}
