//! Many requests, several writers: nothing lost, no token burned (SPEC.md section 7).
//!
//! Every test here runs the real `gibby serve` binary against the in-process fake upstream
//! on its real clock. Concurrent callers are lined up with the fake's gates and call
//! signals, never with sleeps, so each verdict is the same on every run.
#![allow(clippy::disallowed_methods)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::join_all;
use gibby::fake_upstream::{AccountSpec, Endpoint, FakeUpstream};
use gibby::model::{Account, AccountsFile, Secret, Usage, Window};
use support::{client, now, read_accounts, stored, token, write_file, Gibby, Served};

/// Long enough for any signal the fake can give on a loaded 2-core machine.
const SIGNAL: Duration = Duration::from_secs(30);

/// Usage checked just now, both windows far from their reset.
fn fresh_usage(primary: i64) -> (Option<Usage>, Option<i64>) {
    let window = |pct: i64, reset_at| {
        Some(Window {
            used_percent: pct.into(),
            reset_at,
        })
    };
    let now = now();
    (
        Some(Usage {
            primary: window(primary, now + 10_000),
            secondary: window(20, now + 500_000),
        }),
        Some(now),
    )
}

fn write_pool(dir: &std::path::Path, active: Option<&str>, accounts: Vec<Account>) {
    let file = AccountsFile {
        active_account: active.map(str::to_owned),
        accounts,
    };
    write_file(dir, "accounts.json", &file.to_text());
}

async fn fire(client: &reqwest::Client, url: &str, n: usize) -> Vec<Served> {
    let requests = (0..n).map(|_| {
        let (client, url) = (client.clone(), url.to_owned());
        tokio::spawn(async move { token(&client, &url).await })
    });
    join_all(requests)
        .await
        .into_iter()
        .map(|r| r.expect("request task"))
        .collect()
}

/// 200 requests arrive while the active account's token is due. All of them get past their
/// first read with the old token (their usage calls are held until all 200 have asked),
/// so all 200 need the refresh at once: exactly one refresh call is made, the other 199
/// wait for the lock, re-read and adopt the rotated tokens, and the fake never sees a
/// refresh token twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_requests_while_the_token_is_due_share_one_refresh() {
    const A: &str = "a@example.com";
    const N: usize = 200;
    let fake = FakeUpstream::new();
    let upstream = fake.start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let issued = fake.add_account(AccountSpec::new(A));
    let due = Account {
        token_refresh_at: Some(now() - 60),
        ..stored(A, &issued)
    };
    write_pool(dir.path(), Some(A), vec![due]);
    let gibby = Gibby::start(dir.path(), &upstream.base_url, &[]);
    let client = client();

    let usage = fake.hold(Endpoint::Usage);
    let (url, c) = (gibby.url.clone(), client.clone());
    let load = tokio::spawn(async move { fire(&c, &url, N).await });
    assert!(
        fake.wait_for_calls(Endpoint::Usage, N, SIGNAL).await,
        "not every request asked for usage: {} of {N}\n{}",
        fake.count(Endpoint::Usage),
        gibby.log()
    );
    assert_eq!(
        fake.count(Endpoint::Refresh),
        0,
        "no refresh before the gate"
    );
    usage.open();
    let served = load.await.unwrap();

    let after = read_accounts(dir.path());
    let stored = after.find(A).expect("the account stays");
    assert_ne!(
        stored.refresh_token.expose(),
        issued.refresh_token,
        "the rotated refresh token is stored"
    );
    let not_ok: Vec<&Served> = served.iter().filter(|s| s.status != 200).collect();
    assert!(not_ok.is_empty(), "{not_ok:?}\n{}", gibby.log());
    let with_new_token = served
        .iter()
        .filter(|s| s.access_token.as_deref() == Some(stored.access_token.expose()))
        .count();
    assert_eq!(
        with_new_token, N,
        "every answer carries the new access token"
    );
    assert_eq!(fake.count(Endpoint::Refresh), 1, "exactly one refresh call");
    assert_eq!(fake.reused_refresh_tokens(), 0, "no refresh token reused");
    let old_token_validated = fake
        .calls()
        .iter()
        .filter(|c| c.endpoint == Endpoint::Models)
        .filter(|c| c.bearer.as_deref() != Some(stored.access_token.expose()))
        .count();
    assert_eq!(old_token_validated, 0, "only the new token is validated");
    // Concurrent validations of the new token may be shared, never skipped.
    let validations = fake.count(Endpoint::Models);
    assert!(
        (1..=N).contains(&validations),
        "{validations} validations for {N} answers"
    );
}

/// A client that hangs up while its request holds the lock across a refresh call must not
/// take the rotated tokens with it: the upstream has already spent the old refresh token,
/// so gibby finishes the request (stores the new tokens) even with nobody left to answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_during_the_refresh_burns_no_token() {
    const A: &str = "a@example.com";
    let fake = FakeUpstream::new();
    let upstream = fake.start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let issued = fake.add_account(AccountSpec::new(A));
    let (usage, usage_checked_at) = fresh_usage(10);
    let due = Account {
        token_refresh_at: Some(now() - 60),
        usage,
        usage_checked_at,
        ..stored(A, &issued)
    };
    write_pool(dir.path(), Some(A), vec![due]);
    let gibby = Gibby::start(dir.path(), &upstream.base_url, &[]);
    let client = client();

    let refresh = fake.hold(Endpoint::Refresh);
    let (url, c) = (gibby.url.clone(), client.clone());
    let request = tokio::spawn(async move { token(&c, &url).await });
    assert!(fake.wait_for_calls(Endpoint::Refresh, 1, SIGNAL).await);
    // The fake has rotated the token; its answer is held. The client gives up.
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    refresh.open();
    // gibby stores the new tokens and then validates them: the validation call is the signal.
    assert!(
        fake.wait_for_calls(Endpoint::Models, 1, SIGNAL).await,
        "the request was dropped with its client; the rotated tokens were never stored\n{}",
        gibby.log()
    );

    let next = token(&client, &gibby.url).await;
    assert_eq!(next.status, 200, "{}", gibby.log());
    let stored = read_accounts(dir.path());
    let stored = stored.find(A).expect("the account stays");
    assert_ne!(stored.refresh_token.expose(), issued.refresh_token);
    assert_eq!(
        next.access_token.as_deref(),
        Some(stored.access_token.expose())
    );
    assert_eq!(fake.count(Endpoint::Refresh), 1);
    assert_eq!(fake.reused_refresh_tokens(), 0);
}

/// What an editor (which does not take the lock) does to accounts.json while gibby holds
/// the lock across a refresh of account A.
#[derive(Clone, Copy, Debug)]
enum Edit {
    /// Another account's usage changes.
    UsageOfAnother,
    /// A is disabled.
    Disable,
    /// A is logged in again: new tokens, which gibby's refresh did not produce.
    NewLogin,
    /// A is removed.
    Remove,
}

/// gibby's write of the refreshed tokens compares the file with what it read under the
/// lock, finds the edit, re-reads and redoes its change on the newer content: the edit
/// stays, and the rotated tokens are stored wherever they still apply (so none is burned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edit_that_lands_during_a_refresh_is_kept() {
    const A: &str = "a@example.com";
    const B: &str = "b@example.com";
    for edit in [
        Edit::UsageOfAnother,
        Edit::Disable,
        Edit::NewLogin,
        Edit::Remove,
    ] {
        let fake = FakeUpstream::new();
        let upstream = fake.start(0).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let issued_a = fake.add_account(AccountSpec::new(A));
        let issued_b = fake.add_account(AccountSpec::new(B));
        let (usage, usage_checked_at) = fresh_usage(10);
        let a = Account {
            token_refresh_at: Some(now() - 60),
            usage: usage.clone(),
            usage_checked_at,
            ..stored(A, &issued_a)
        };
        let b = Account {
            usage,
            usage_checked_at,
            ..stored(B, &issued_b)
        };
        write_pool(dir.path(), Some(A), vec![a, b]);
        let gibby = Gibby::start(dir.path(), &upstream.base_url, &[]);
        let client = client();

        let refresh = fake.hold(Endpoint::Refresh);
        let (url, c) = (gibby.url.clone(), client.clone());
        let request = tokio::spawn(async move { token(&c, &url).await });
        assert!(fake.wait_for_calls(Endpoint::Refresh, 1, SIGNAL).await);

        // The editor: read, change, replace; no lock.
        let mut edited = read_accounts(dir.path());
        let mut login = None;
        match edit {
            Edit::UsageOfAnother => {
                let (usage, checked) = fresh_usage(42);
                let b = edited.find_mut(B).unwrap();
                b.usage = usage;
                b.usage_checked_at = checked;
            }
            Edit::Disable => edited.find_mut(A).unwrap().disabled = true,
            Edit::NewLogin => {
                let tokens = fake.login(A);
                let a = edited.find_mut(A).unwrap();
                a.access_token = Secret::new(&tokens.access_token);
                a.refresh_token = Secret::new(&tokens.refresh_token);
                login = Some(tokens);
            }
            Edit::Remove => edited.accounts.retain(|a| a.email != A),
        }
        write_file(dir.path(), "accounts.json", &edited.to_text());
        refresh.open();
        let served = request.await.unwrap();
        assert_eq!(served.status, 200, "{edit:?}\n{}", gibby.log());

        let after = read_accounts(dir.path());
        let spent = support::spent_refresh_tokens(&fake.calls());
        assert_eq!(spent.len(), 1, "{edit:?}: one refresh");
        match edit {
            Edit::UsageOfAnother | Edit::Disable => {
                let a = after.find(A).unwrap();
                assert!(
                    a.refresh_token.expose() != issued_a.refresh_token
                        && !spent.contains(&a.refresh_token.expose().to_owned()),
                    "{edit:?}: the rotated tokens are stored"
                );
                assert_eq!(
                    served.access_token.as_deref(),
                    Some(a.access_token.expose())
                );
                let mut expected = edited.clone();
                let e = expected.find_mut(A).unwrap();
                e.access_token = a.access_token.clone();
                e.refresh_token = a.refresh_token.clone();
                e.token_refresh_at = a.token_refresh_at;
                assert_eq!(
                    after, expected,
                    "{edit:?}: the edit is kept, only tokens added"
                );
            }
            Edit::NewLogin => {
                let login = login.unwrap();
                let a = after.find(A).unwrap();
                assert_eq!(
                    (a.access_token.expose(), a.refresh_token.expose()),
                    (login.access_token.as_str(), login.refresh_token.as_str()),
                    "the editor's tokens stay"
                );
                assert_eq!(after, edited);
            }
            Edit::Remove => assert_eq!(after, edited, "the removal stays"),
        }
        assert_eq!(fake.reused_refresh_tokens(), 0, "{edit:?}");
        assert!(support::stray_files(dir.path()).is_empty(), "{edit:?}");
    }
}

/// An account disabled by hand after a request read it, but before the request took the
/// lock to refresh its due token, is neither refreshed nor served: the request re-reads
/// under the lock, passes over it and serves another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_disabled_while_a_request_is_underway_is_not_refreshed() {
    const A: &str = "a@example.com";
    const B: &str = "b@example.com";
    let fake = FakeUpstream::new();
    let upstream = fake.start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let issued_a = fake.add_account(AccountSpec::new(A));
    let issued_b = fake.add_account(AccountSpec::new(B));
    let a = Account {
        token_refresh_at: Some(now() - 60),
        ..stored(A, &issued_a)
    };
    let (usage, usage_checked_at) = fresh_usage(10);
    let b = Account {
        usage,
        usage_checked_at,
        ..stored(B, &issued_b)
    };
    write_pool(dir.path(), Some(A), vec![a, b]);
    let gibby = Gibby::start(dir.path(), &upstream.base_url, &[]);
    let client = client();

    // A's usage is stale: the request asks for it first, and that answer is held.
    let usage = fake.hold(Endpoint::Usage);
    let (url, c) = (gibby.url.clone(), client.clone());
    let request = tokio::spawn(async move { token(&c, &url).await });
    assert!(fake.wait_for_calls(Endpoint::Usage, 1, SIGNAL).await);
    let mut edited = read_accounts(dir.path());
    edited.find_mut(A).unwrap().disabled = true;
    write_file(dir.path(), "accounts.json", &edited.to_text());
    usage.open();
    let served = request.await.unwrap();

    assert_eq!(
        (served.status, served.email.as_deref()),
        (200, Some(B)),
        "{}",
        gibby.log()
    );
    assert_eq!(
        fake.count(Endpoint::Refresh),
        0,
        "no refresh for a disabled account"
    );
    let after = read_accounts(dir.path());
    let a = after.find(A).unwrap();
    assert!(a.disabled);
    assert_eq!(a.refresh_token.expose(), issued_a.refresh_token);
}

/// Two gibby processes on one data directory, 40 concurrent requests each. Half the
/// accounts hold an expired access token that is due for refresh (their usage call is
/// rejected, so every request that looks at them wants the refresh), a quarter are revoked.
/// Across both processes each due account is refreshed exactly once, no refresh token is
/// ever presented twice, every answer carries the account's current token, and every
/// account ends in exactly one file: revoked ones in failed.json, the others in
/// accounts.json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_directory_refresh_once_and_move_once() {
    const ACCOUNTS: usize = 16;
    const PER_PROCESS: usize = 40;
    let fake = FakeUpstream::new();
    let upstream = fake.start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let email = |i: usize| format!("user{i:02}@example.com");
    let due = |i: usize| i % 2 == 0;
    let revoked = |i: usize| i % 5 == 0;
    let mut accounts = Vec::new();
    for i in 0..ACCOUNTS {
        // Expired access tokens: issued with a negative lifetime.
        fake.set_token_lifetime(if due(i) { -600 } else { 864_000 });
        let issued = fake.add_account(AccountSpec {
            primary: Some(gibby::fake_upstream::Window::five_hour(10 + 5 * i as i64)),
            ..AccountSpec::new(&email(i))
        });
        let mut account = stored(&email(i), &issued);
        if due(i) {
            account.token_refresh_at = Some(now() - 60);
        }
        accounts.push(account);
    }
    fake.set_token_lifetime(864_000);
    for i in (0..ACCOUNTS).filter(|&i| revoked(i)) {
        fake.revoke(&email(i));
    }
    // The active account is revoked: every request falls back and looks at the whole pool.
    write_pool(dir.path(), Some(&email(0)), accounts);
    let first = Gibby::start(dir.path(), &upstream.base_url, &[]);
    let second = Gibby::start(dir.path(), &upstream.base_url, &[]);
    let client = client();

    let (one, two) = tokio::join!(
        fire(&client, &first.url, PER_PROCESS),
        fire(&client, &second.url, PER_PROCESS)
    );
    let served: Vec<Served> = one.into_iter().chain(two).collect();
    let logs = || format!("{}\n{}", first.log(), second.log());

    let not_ok: Vec<&Served> = served.iter().filter(|s| s.status != 200).collect();
    assert!(not_ok.is_empty(), "{not_ok:?}\n{}", logs());
    assert_eq!(fake.reused_refresh_tokens(), 0, "no refresh token reused");
    let refreshes = support::refreshes_per_account(&fake);
    for i in 0..ACCOUNTS {
        let expected = usize::from(due(i));
        assert_eq!(
            refreshes.get(&email(i)).copied().unwrap_or(0),
            expected,
            "refresh calls for {}",
            email(i)
        );
    }
    let placement = support::placement(dir.path());
    for i in 0..ACCOUNTS {
        let expected = if revoked(i) { (0, 1) } else { (1, 0) };
        assert_eq!(
            placement.get(&email(i)).copied(),
            Some(expected),
            "{}: (in accounts.json, in failed.json)",
            email(i)
        );
    }
    assert_eq!(placement.len(), ACCOUNTS);
    let after = read_accounts(dir.path());
    for s in &served {
        let email = s.email.as_deref().expect("a 200 names its account");
        let current = after
            .find(email)
            .expect("served from an account that stays");
        assert_eq!(
            s.access_token.as_deref(),
            Some(current.access_token.expose()),
            "{email} was served with a token other than its current one"
        );
    }
    assert!(
        support::accounts_holding_spent_tokens(dir.path(), &fake).is_empty(),
        "a rotated refresh token was lost"
    );
    assert!(support::stray_files(dir.path()).is_empty());
    assert!(support::loose_modes(dir.path()).is_empty());
}

/// Where the cooperating writer process works, and where it reports.
const WRITER_DIR: &str = "CONCURRENCY_TEST_WRITER_DIR";
const WRITER_REPORT: &str = "writer-report.json";
const WRITER_EDITS: usize = 150;

/// What the writer last set on an account: usage, usage_checked_at, disabled.
type Edited = (Option<Usage>, Option<i64>, bool);

/// Whether the writer's last edit of an account still stands. gibby never changes
/// `disabled`, and never replaces usage it did not find stale; usage the writer cleared
/// (never checked) is gibby's to fill in.
fn edit_stands(a: &Account, edited: &Edited) -> bool {
    a.disabled == edited.2
        && (edited.0.is_none() || (&a.usage, &a.usage_checked_at) == (&edited.0, &edited.1))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct WriterReport {
    edits: usize,
    /// Edits of its own the writer found changed (by email, never a token).
    violations: Vec<String>,
    last: BTreeMap<String, Edited>,
}

/// Kills the writer when the test ends, however it ends.
struct Writer(std::process::Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The cooperating writer, run as a process of its own by
/// `a_cooperating_writer_keeps_every_edit`: this test binary re-executed with
/// `WRITER_DIR` set. Without it (a plain `--ignored` run) it does nothing.
///
/// Like a usage-polling helper, it edits accounts.json under the flock of `.gibby.lock`:
/// each round it re-reads the file, checks that every edit it made earlier is still there,
/// writes fresh usage on one account (sometimes 95% or more, exhausting it) or clears it,
/// and sometimes flips `disabled`. The last account is never touched, so one always stays usable.
#[test]
#[ignore = "the writer process of a_cooperating_writer_keeps_every_edit"]
fn cooperating_writer_process() {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let Some(dir) = std::env::var_os(WRITER_DIR) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut report = WriterReport {
        edits: 0,
        violations: Vec::new(),
        last: BTreeMap::new(),
    };
    for round in 0..WRITER_EDITS {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(".gibby.lock"))
            .unwrap();
        // SAFETY: flock on a descriptor we own; closing it releases the lock.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let mut pool = read_accounts(&dir);
        for (email, edited) in &report.last {
            match pool.find(email) {
                Some(a) if edit_stands(a, edited) => {}
                Some(_) => report.violations.push(format!(
                    "round {round}: {email}: an earlier edit was overwritten"
                )),
                None => report
                    .violations
                    .push(format!("round {round}: {email}: removed")),
            }
        }
        let untouched = pool.accounts.len() - 1;
        let account = &mut pool.accounts[next() as usize % untouched];
        let now = now();
        if next() % 3 == 0 {
            // Cleared: gibby fetches it when it next looks at the account.
            account.usage = None;
            account.usage_checked_at = None;
        } else {
            account.usage = Some(Usage {
                primary: Some(Window {
                    used_percent: (next() % 100).into(),
                    // Unique per round, so every edit is told apart.
                    reset_at: now + 100_000 + round as i64,
                }),
                secondary: Some(Window {
                    used_percent: 20.into(),
                    reset_at: now + 500_000,
                }),
            });
            account.usage_checked_at = Some(now);
        }
        if next() % 3 == 0 {
            account.disabled = !account.disabled;
        }
        let edited = (
            account.usage.clone(),
            account.usage_checked_at,
            account.disabled,
        );
        report.last.insert(account.email.clone(), edited);
        write_file(&dir, "accounts.json", &pool.to_text());
        report.edits += 1;
        drop(lock);
        // Pacing, not synchronisation: leave gibby room to take the lock between rounds.
        std::thread::sleep(Duration::from_millis(3));
    }
    let report = serde_json::to_string(&report).unwrap();
    gibby::io::store::atomic_write(&dir.join(WRITER_REPORT), report.as_bytes()).unwrap();
}

/// A cooperating writer process rewrites accounts.json in a loop while gibby serves
/// requests that refresh tokens, fetch usage, move the active pointer and write all of it
/// back. Every edit the writer made is still in the file at its next round (and at the
/// end), unless it edited that account again itself; gibby's rotated tokens are never lost
/// to the writer either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooperating_writer_keeps_every_edit() {
    const ACCOUNTS: usize = 8;
    const LOOPS: usize = 4;
    /// Bounds each request loop, whatever happens to the writer.
    const MAX_REQUESTS: usize = 5_000;
    let fake = FakeUpstream::new();
    let upstream = fake.start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let email = |i: usize| format!("user{i:02}@example.com");
    let mut accounts = Vec::new();
    // Expired, due tokens and no usage: whenever gibby looks at an account it has to fetch
    // usage, refresh, fetch again and write, all while the writer edits.
    fake.set_token_lifetime(-600);
    for i in 0..ACCOUNTS {
        let issued = fake.add_account(AccountSpec::new(&email(i)));
        accounts.push(Account {
            token_refresh_at: Some(now() - 60),
            ..stored(&email(i), &issued)
        });
    }
    fake.set_token_lifetime(864_000);
    // Slow answers keep each request's read old for a while: the writer's edits land
    // between gibby's read and gibby's write.
    fake.set_latency(Duration::from_millis(5));
    write_pool(dir.path(), Some(&email(0)), accounts);
    let gibby = Gibby::start(dir.path(), &upstream.base_url, &[]);
    let client = client();

    let writer_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops: Vec<_> = (0..LOOPS)
        .map(|_| {
            let (client, url, done) = (client.clone(), gibby.url.clone(), writer_done.clone());
            tokio::spawn(async move {
                let mut served = Vec::new();
                while !done.load(std::sync::atomic::Ordering::SeqCst) && served.len() < MAX_REQUESTS
                {
                    served.push(token(&client, &url).await);
                }
                served
            })
        })
        .collect();
    // Start the writer once gibby is demonstrably serving.
    assert!(fake.wait_for_calls(Endpoint::Models, 1, SIGNAL).await);
    let mut writer = Writer(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cooperating_writer_process",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(WRITER_DIR, dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = tokio::task::spawn_blocking(move || {
        let status = writer.0.wait();
        (writer, status)
    })
    .await
    .unwrap()
    .1
    .unwrap();
    writer_done.store(true, std::sync::atomic::Ordering::SeqCst);
    let served: Vec<Served> = join_all(loops)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    assert!(status.success(), "the writer failed: {status}");

    let report: WriterReport = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(WRITER_REPORT)).expect("the writer reported"),
    )
    .unwrap();
    std::fs::remove_file(dir.path().join(WRITER_REPORT)).unwrap();
    assert_eq!(report.edits, WRITER_EDITS);
    assert!(
        report.violations.is_empty(),
        "{:?}\n{}",
        report.violations,
        gibby.log()
    );
    let after = read_accounts(dir.path());
    for (email, edited) in &report.last {
        let a = after.find(email).expect("every account stays");
        assert!(
            edit_stands(a, edited),
            "{email}: the writer's last edit is gone"
        );
    }
    assert_eq!(after.accounts.len(), ACCOUNTS);
    let not_ok: Vec<&Served> = served.iter().filter(|s| s.status != 200).collect();
    assert!(not_ok.is_empty(), "{not_ok:?}\n{}", gibby.log());
    assert!(served.len() >= LOOPS, "gibby served while the writer ran");
    assert!(fake.count(Endpoint::Refresh) >= 1);
    assert_eq!(fake.reused_refresh_tokens(), 0, "no refresh token reused");
    assert!(
        support::accounts_holding_spent_tokens(dir.path(), &fake).is_empty(),
        "a rotated refresh token was lost"
    );
    assert!(support::stray_files(dir.path()).is_empty());
    assert!(support::loose_modes(dir.path()).is_empty());
}

/// SIGTERM while a request whose client hung up is still inside its refresh: gibby stops
/// accepting, but before exiting it lets that request store the rotated tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_request_whose_client_hung_up() {
    const A: &str = "a@example.com";
    let fake = FakeUpstream::new();
    let upstream = fake.start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let issued = fake.add_account(AccountSpec::new(A));
    let (usage, usage_checked_at) = fresh_usage(10);
    let due = Account {
        token_refresh_at: Some(now() - 60),
        usage,
        usage_checked_at,
        ..stored(A, &issued)
    };
    write_pool(dir.path(), Some(A), vec![due]);
    let mut gibby = Gibby::start(dir.path(), &upstream.base_url, &[]);
    let log = gibby.log_handle();
    let client = client();

    let refresh = fake.hold(Endpoint::Refresh);
    let (url, c) = (gibby.url.clone(), client.clone());
    let request = tokio::spawn(async move { token(&c, &url).await });
    assert!(fake.wait_for_calls(Endpoint::Refresh, 1, SIGNAL).await);
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    // SAFETY: a signal to the child this test started and still owns.
    assert_eq!(unsafe { libc::kill(gibby.pid() as i32, libc::SIGTERM) }, 0);
    let shutting_down = log.clone();
    assert!(
        tokio::task::spawn_blocking(move || shutting_down.wait_for_line("shutting down", SIGNAL))
            .await
            .unwrap(),
        "{}",
        gibby.log()
    );
    refresh.open();
    let exited = log.clone();
    assert!(
        tokio::task::spawn_blocking(move || exited.wait_for_exit(SIGNAL))
            .await
            .unwrap(),
        "gibby did not exit after the request ended\n{}",
        gibby.log()
    );
    assert_eq!(gibby.exit_status().code(), Some(0), "{}", gibby.log());

    let after = read_accounts(dir.path());
    let a = after.find(A).unwrap();
    assert!(
        a.refresh_token.expose() != issued.refresh_token
            && !support::spent_refresh_tokens(&fake.calls())
                .contains(&a.refresh_token.expose().to_owned()),
        "the rotated tokens were stored before gibby exited"
    );
    assert_eq!(fake.count(Endpoint::Refresh), 1);
}
