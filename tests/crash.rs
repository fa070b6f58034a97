//! Sudden crashes: gibby is killed with SIGKILL at random moments while accounts are
//! failing, many times over, and after every kill and every restart the data directory
//! must be whole (SPEC.md sections 1, 6 and 7).
#![allow(clippy::disallowed_methods)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::future::join_all;
use gibby::fake_upstream::{AccountSpec, Endpoint, FakeUpstream, Window};
use gibby::model::{Account, AccountsFile, Secret};
use support::{
    client, loose_modes, now, read_accounts, read_failed, stray_files, token, write_file, Gibby,
};

const ITERATIONS: usize = 100;
const BURST: usize = 6;
const START_ACCOUNTS: usize = 10;

/// xorshift64: a fixed sequence, so every run makes the same choices (timing still varies;
/// the verdict does not depend on it).
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// Right after a kill: both files parse, nothing is lost (every account ever added is in
/// a file), and an account in both files is an interrupted move (identical objects).
fn check_after_kill(dir: &std::path::Path, known: &BTreeSet<String>, round: usize) -> bool {
    let accounts = read_accounts(dir);
    let failed = read_failed(dir);
    let mut interrupted = false;
    for email in known {
        let live = accounts.find(email);
        let dead: Vec<&Account> = failed
            .accounts
            .iter()
            .filter(|a| &a.email == email)
            .collect();
        match (live, dead.as_slice()) {
            (Some(_), []) | (None, [_]) => {}
            (Some(a), [f]) => {
                assert_eq!(a, *f, "round {round}: {email} differs between the files");
                interrupted = true;
            }
            (None, []) => panic!("round {round}: {email} is in neither file"),
            (_, _) => panic!("round {round}: {email} is in failed.json more than once"),
        }
    }
    interrupted
}

/// At rest, after a restart and one request: each account in exactly one file, no
/// temporary file, every file 0600.
fn check_at_rest(dir: &std::path::Path, known: &BTreeSet<String>, round: usize) {
    let stray = stray_files(dir);
    assert!(stray.is_empty(), "round {round}: left behind: {stray:?}");
    let loose = loose_modes(dir);
    assert!(loose.is_empty(), "round {round}: modes not 0600: {loose:?}");
    let placement = support::placement(dir);
    for email in known {
        let (live, dead) = placement.get(email).copied().unwrap_or_default();
        assert_eq!(
            live + dead,
            1,
            "round {round}: {email}: {live} time(s) in accounts.json, {dead} in failed.json"
        );
    }
    assert_eq!(
        placement.len(),
        known.len(),
        "round {round}: unknown accounts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing() {
    let fake = FakeUpstream::new();
    let upstream = fake.start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut known = BTreeSet::new();
    let mut next_id = 0;
    // A login helper adds an account: some with an expired, due token (gibby refreshes it
    // and writes the new tokens), all with usage never checked (gibby fetches and writes it).
    let mut add_account = |pool: &mut AccountsFile, rng: &mut Rng, known: &mut BTreeSet<String>| {
        let email = format!("user{next_id:03}@example.com");
        next_id += 1;
        let due = rng.next(3) == 0;
        fake.set_token_lifetime(if due { -600 } else { 864_000 });
        let issued = fake.add_account(AccountSpec {
            primary: Some(Window::five_hour(rng.next(90) as i64)),
            ..AccountSpec::new(&email)
        });
        fake.set_token_lifetime(864_000);
        pool.accounts.push(Account {
            email: email.clone(),
            access_token: Secret::new(&issued.access_token),
            refresh_token: Secret::new(&issued.refresh_token),
            token_refresh_at: Some(if due {
                now() - 60
            } else {
                issued.expires_at - 86_400
            }),
            usage: None,
            usage_checked_at: None,
            disabled: false,
        });
        known.insert(email);
    };
    let mut pool = AccountsFile::default();
    for _ in 0..START_ACCOUNTS {
        add_account(&mut pool, &mut rng, &mut known);
    }
    write_file(dir.path(), "accounts.json", &pool.to_text());

    // Stale after a second: every request refetches usage and writes it back, so writes
    // (and kills in the middle of them) are frequent.
    let env = [("GIBBY_USAGE_STALE_SECONDS", "0")];
    let (mut interrupted_moves, mut killed_mid_burst, mut temporaries_left) = (0, 0, 0);
    for round in 0..ITERATIONS {
        // gibby is down: the helper adds three accounts and an account in accounts.json is
        // revoked upstream and made the active one, so the next request moves it.
        let mut pool = read_accounts(dir.path());
        let failed = read_failed(dir.path());
        for _ in 0..3 {
            add_account(&mut pool, &mut rng, &mut known);
        }
        let candidates: Vec<String> = pool
            .accounts
            .iter()
            .filter(|a| !failed.accounts.iter().any(|f| f.email == a.email))
            .map(|a| a.email.clone())
            .collect();
        let doomed = candidates[rng.next(candidates.len() as u64) as usize].clone();
        fake.revoke(&doomed);
        pool.active_account = Some(doomed);
        // Another one fails whenever gibby next looks at it.
        fake.revoke(&candidates[rng.next(candidates.len() as u64) as usize]);
        write_file(dir.path(), "accounts.json", &pool.to_text());

        let mut gibby = Gibby::start(dir.path(), &upstream.base_url, &env);
        // One request on its own: it finishes a move the last kill interrupted and moves
        // the revoked active account; then everything is at rest.
        let calm = token(&client, &gibby.url).await;
        assert!(
            [200, 503].contains(&calm.status),
            "round {round}: {calm:?}\n{}",
            gibby.log()
        );
        check_at_rest(dir.path(), &known, round);
        // Accounts fail while gibby serves: the new active one and another.
        let pool = read_accounts(dir.path());
        if let Some(active) = &pool.active_account {
            fake.revoke(active);
        }
        if !pool.accounts.is_empty() {
            fake.revoke(&pool.accounts[rng.next(pool.accounts.len() as u64) as usize].email);
        }

        // The burst, killed after a random number of upstream calls (or when it is over).
        // Every tenth round is steered instead: every endpoint holds its answers, and the
        // kill comes once the burst's first call is recorded, so that round certainly kills
        // a request in flight (each request makes at least one call: no account of the pool
        // is ever exhausted or disabled). The assertion on `killed_mid_burst` below rests
        // on these rounds alone and cannot flake.
        let steered = round % 10 == 9;
        let usage_before = fake.count(Endpoint::Usage);
        let models_before = fake.count(Endpoint::Models);
        let refresh_before = fake.count(Endpoint::Refresh);
        let gates = steered
            .then(|| [Endpoint::Usage, Endpoint::Models, Endpoint::Refresh].map(|e| fake.hold(e)));
        let burst: Vec<_> = (0..BURST)
            .map(|_| {
                let (client, url) = (client.clone(), gibby.url.clone());
                tokio::spawn(async move {
                    client
                        .get(format!("{url}/token"))
                        .send()
                        .await
                        .map(|r| r.status())
                })
            })
            .collect();
        let usage_at = usage_before + 1 + rng.next(BURST as u64 * 3) as usize;
        let models_at = models_before + 1 + rng.next(BURST as u64) as usize;
        let mut burst = Box::pin(join_all(burst));
        let wait = Duration::from_secs(30);
        let finished = if steered {
            let called = tokio::select! {
                c = fake.wait_for_calls(Endpoint::Usage, usage_before + 1, wait) => c,
                c = fake.wait_for_calls(Endpoint::Models, models_before + 1, wait) => c,
                c = fake.wait_for_calls(Endpoint::Refresh, refresh_before + 1, wait) => c,
            };
            assert!(
                called,
                "round {round}: the burst made no upstream call\n{}",
                gibby.log()
            );
            None
        } else {
            tokio::select! {
                _ = fake.wait_for_calls(Endpoint::Usage, usage_at, wait) => None,
                _ = fake.wait_for_calls(Endpoint::Models, models_at, wait) => None,
                done = &mut burst => Some(done),
            }
        };
        if !steered {
            // Jitter (0-8 ms) spreads the kills over the writes that follow a call.
            let jitter = rng.next(8_000);
            tokio::time::sleep(Duration::from_micros(jitter)).await;
        }
        gibby.kill();
        drop(gates);
        if finished.is_none() {
            killed_mid_burst += 1;
            // The requests end with the connection: answered or reset.
            burst.await;
        }
        temporaries_left += usize::from(!stray_files(dir.path()).is_empty());
        interrupted_moves += usize::from(check_after_kill(dir.path(), &known, round));
    }

    // A last restart finishes whatever the last kill interrupted.
    let gibby = Gibby::start(dir.path(), &upstream.base_url, &env);
    let last = token(&client, &gibby.url).await;
    assert!([200, 503].contains(&last.status), "{last:?}");
    check_at_rest(dir.path(), &known, ITERATIONS);
    let failed = read_failed(dir.path()).accounts.len();
    // Every round's revoked active account was moved by its calm request.
    assert!(failed >= ITERATIONS, "only {failed} accounts were moved");
    // The steered rounds alone make this certain (see above).
    assert!(
        killed_mid_burst >= ITERATIONS / 10,
        "only {killed_mid_burst} kills hit requests in flight"
    );
    // `interrupted_moves` is reported, not asserted. An interrupted move (the record in
    // failed.json, the account still in accounts.json) exists only between two writes
    // that follow each other under the lock with no upstream call between them: nothing
    // the fake can hold stops gibby there, and a kill from outside cannot be aimed at it,
    // so whether a random kill lands there is a matter of timing. The state itself, and
    // its repair on restart, is tested deterministically by
    // `an_interrupted_move_left_by_a_kill_is_finished_on_restart` below.
    let stats: BTreeMap<&str, usize> = [
        ("rounds", ITERATIONS),
        ("killed mid-burst", killed_mid_burst),
        ("interrupted moves found", interrupted_moves),
        ("temporary files left by a kill", temporaries_left),
        ("moved to failed.json", failed),
        ("upstream calls", fake.calls().len()),
        // Not asserted: a kill between the upstream's rotation and gibby's write of the
        // new tokens burns them, and no design can prevent that (DESIGN.md).
        ("refresh tokens reused", fake.reused_refresh_tokens()),
    ]
    .into_iter()
    .collect();
    eprintln!("crash test: {stats:?}");
}

/// The state a kill between a move's two writes leaves (the account appended to
/// failed.json, still in accounts.json, byte-identical), built directly: the restarted
/// gibby finishes the move on its first request and the files are at rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_move_left_by_a_kill_is_finished_on_restart() {
    let fake = FakeUpstream::new();
    let upstream = fake.start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut pool = AccountsFile::default();
    let mut known = BTreeSet::new();
    for email in ["a@example.com", "b@example.com"] {
        let issued = fake.add_account(AccountSpec::new(email));
        pool.accounts.push(support::stored(email, &issued));
        known.insert(email.to_owned());
    }
    fake.revoke("a@example.com");
    let failed = gibby::model::FailedFile {
        accounts: vec![pool.accounts[0].clone()],
    };
    write_file(dir.path(), "accounts.json", &pool.to_text());
    write_file(dir.path(), "failed.json", &failed.to_text());
    assert!(
        check_after_kill(dir.path(), &known, 0),
        "an interrupted move"
    );

    let gibby = Gibby::start(dir.path(), &upstream.base_url, &[]);
    let answer = token(&client(), &gibby.url).await;
    assert_eq!(answer.status, 200, "{answer:?}\n{}", gibby.log());
    check_at_rest(dir.path(), &known, 0);
    assert_eq!(
        read_failed(dir.path()).accounts.len(),
        1,
        "not appended twice"
    );
    assert!(read_accounts(dir.path()).find("a@example.com").is_none());
}
