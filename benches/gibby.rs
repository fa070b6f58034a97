//! `cargo bench --bench gibby`: what gibby costs on top of the upstream it works against.
//!
//! Starts the fake upstream in this process and the real `gibby serve` binary as a child
//! process, both on 127.0.0.1. For pools of 10, 100 and 1,000 accounts (fresh usage, fresh
//! tokens, the first one active, and a failed.json a fifth that size) it drives `GET /token`
//! with 1 and 64 concurrent clients, with the fake answering at once and with 50 ms added to
//! every answer, and prints requests per second, p50/p99 latency, upstream calls and file
//! writes per `/token` and gibby's peak resident memory; then the same for the fake's
//! validation endpoint hit directly, the limit gibby works against, and the targets of
//! issue #7 read from this one run. `GET /health` at 1 client shows what one hop to gibby
//! costs before gibby does anything: with a direct call, the floor under a `/token`.
//!
//! Figures only: nothing here fails a build. `GIBBY_BENCH_SCALE` (default 1) multiplies the
//! request counts; `GIBBY_BENCH_POOLS`, `GIBBY_BENCH_LATENCIES` and `GIBBY_BENCH_CLIENTS`
//! (comma-separated numbers) run a subset, for profiling.
#![allow(clippy::disallowed_methods)]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gibby::fake_upstream::{AccountSpec, Endpoint, FakeUpstream, Window};
use gibby::model::{Account, AccountsFile, Secret, Usage};
use gibby::settings::DEFAULT_CODEX_CLIENT_VERSION;

const POOLS: [usize; 3] = [10, 100, 1_000];
const CLIENTS: [usize; 2] = [1, 64];
const LATENCIES_MS: [u64; 2] = [0, 50];

/// The values of `T` to run: all of `all`, or those the variable `var` lists (`10,1000`).
fn chosen<T: std::str::FromStr + Copy>(var: &str, all: &[T]) -> Vec<T> {
    match std::env::var(var) {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{var}: numbers separated by commas"))
            })
            .collect(),
        Err(_) => all.to_vec(),
    }
}

/// Requests measured per run (after a warm-up that is not counted).
fn requests(latency_ms: u64, clients: usize) -> usize {
    let scale = std::env::var("GIBBY_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.0);
    let base = match (latency_ms, clients) {
        (0, 1) => 3_000,
        (0, _) => 20_000,
        (_, 1) => 100,
        (_, _) => 4_000,
    };
    ((base as f64 * scale) as usize).max(10)
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Direct,
    Gibby(usize),
    /// `GET /health` on gibby: one loopback round trip and no work, no upstream call.
    Health,
}

struct Row {
    target: Target,
    latency_ms: u64,
    clients: usize,
    load: Load,
    upstream_per_token: f64,
    writes_per_token: Option<f64>,
    /// CPU time gibby's threads spent per `/token`, from the kernel's scheduler statistics.
    cpu_per_token: Option<Duration>,
    peak_rss_kib: Option<u64>,
}

struct Load {
    requests: usize,
    failures: usize,
    rps: f64,
    p50: Duration,
    p99: Duration,
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}

async fn run() {
    let fake = FakeUpstream::new();
    fake.set_token_lifetime(30 * 86_400);
    // The fake stands for a distant host: it runs on a runtime and thread of its own, so
    // a direct call crosses threads as gibby's calls cross processes, and neither shares a
    // worker thread with the server it calls.
    let fake_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fake-upstream")
        .enable_all()
        .build()
        .expect("fake upstream runtime");
    let upstream = {
        let fake = fake.clone();
        fake_runtime
            .spawn(async move { fake.start(0).await })
            .await
            .expect("fake upstream task")
            .expect("fake upstream starts")
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(128)
        .build()
        .expect("client");
    let mut rows = Vec::new();

    // The pools are written first, as a pool stands between changes: gibby reads a file
    // that changed in the last seconds in full on every request (see `Store::read_unlocked`),
    // one that has settled with a `stat`. The direct runs below take longer than that in a
    // full run; before gibby starts, the benchmark waits for it in any case. The direct runs below take longer than that.
    let pools: Vec<_> = chosen("GIBBY_BENCH_POOLS", &POOLS)
        .into_iter()
        .map(|size| {
            let dir = tempfile::tempdir().expect("temp dir");
            write_pool(&fake, dir.path(), size);
            (size, dir)
        })
        .collect();
    let written = Instant::now();

    // The limit: the fake's validation endpoint, hit directly with a known token.
    let issued = fake.add_account(AccountSpec::new("direct@bench.invalid"));
    let url = format!(
        "{}/backend-api/codex/models?client_version={DEFAULT_CODEX_CLIENT_VERSION}",
        upstream.base_url
    );
    let direct: Request = Arc::new(move |c: &reqwest::Client| {
        c.get(&url)
            .bearer_auth(&issued.access_token)
            .header("chatgpt-account-id", &issued.account_id)
    });
    for latency_ms in chosen("GIBBY_BENCH_LATENCIES", &LATENCIES_MS) {
        fake.set_latency(Duration::from_millis(latency_ms));
        for clients in chosen("GIBBY_BENCH_CLIENTS", &CLIENTS) {
            let calls = upstream_calls(&fake);
            let load = drive(&client, &direct, clients, requests(latency_ms, clients)).await;
            let per = (upstream_calls(&fake) - calls) as f64 / (load.requests + WARM_UP) as f64;
            rows.push(Row {
                target: Target::Direct,
                latency_ms,
                clients,
                load,
                upstream_per_token: per,
                writes_per_token: None,
                cpu_per_token: None,
                peak_rss_kib: None,
            });
        }
    }

    // A subset run may reach here before the pools have settled: wait for that.
    let settled = written + Duration::from_millis(3_500);
    tokio::time::sleep_until(settled.into()).await;
    for (i, (size, dir)) in pools.into_iter().enumerate() {
        let gibby = Gibby::start(dir.path(), &upstream.base_url);
        let url = format!("{}/token", gibby.url);
        let token: Request = Arc::new(move |c: &reqwest::Client| c.get(&url));
        // What one hop to gibby costs before gibby does anything: with a direct call, the
        // floor under a `/token` that makes one upstream call.
        let floor = chosen("GIBBY_BENCH_LATENCIES", &LATENCIES_MS).contains(&0)
            && chosen("GIBBY_BENCH_CLIENTS", &CLIENTS).contains(&1);
        if i == 0 && floor {
            fake.set_latency(Duration::ZERO);
            let url = format!("{}/health", gibby.url);
            let health: Request = Arc::new(move |c: &reqwest::Client| c.get(&url));
            let calls = upstream_calls(&fake);
            let cpu = gibby.cpu_time();
            let load = drive(&client, &health, 1, requests(0, 1)).await;
            let per = (upstream_calls(&fake) - calls) as f64 / (load.requests + WARM_UP) as f64;
            rows.push(Row {
                target: Target::Health,
                latency_ms: 0,
                clients: 1,
                upstream_per_token: per,
                writes_per_token: None,
                cpu_per_token: Some((gibby.cpu_time() - cpu) / (load.requests + WARM_UP) as u32),
                peak_rss_kib: gibby.peak_rss_kib(),
                load,
            });
        }
        for latency_ms in chosen("GIBBY_BENCH_LATENCIES", &LATENCIES_MS) {
            fake.set_latency(Duration::from_millis(latency_ms));
            for clients in chosen("GIBBY_BENCH_CLIENTS", &CLIENTS) {
                let calls = upstream_calls(&fake);
                let before = gibby.scan();
                let cpu = gibby.cpu_time();
                let load = drive(&client, &token, clients, requests(latency_ms, clients)).await;
                let after = gibby.log_lines(before.lines + load.requests + WARM_UP);
                let per = (upstream_calls(&fake) - calls) as f64 / (load.requests + WARM_UP) as f64;
                // Calls and writes are counted over the warm-up too, so a first-request
                // write shows.
                let wrote = after.writes - before.writes;
                let writes_per_token = wrote as f64 / (load.requests + WARM_UP) as f64;
                let cpu_per_token = (gibby.cpu_time() - cpu) / (load.requests + WARM_UP) as u32;
                rows.push(Row {
                    target: Target::Gibby(size),
                    latency_ms,
                    clients,
                    load,
                    upstream_per_token: per,
                    writes_per_token: Some(writes_per_token),
                    cpu_per_token: Some(cpu_per_token),
                    peak_rss_kib: gibby.peak_rss_kib(),
                });
            }
        }
        drop(gibby);
    }
    fake.set_latency(Duration::ZERO);
    fake_runtime
        .spawn(upstream.shutdown())
        .await
        .expect("fake upstream stops");
    fake_runtime.shutdown_background();
    print_report(&rows);
}

/// Upstream calls the fake has answered so far, every endpoint.
fn upstream_calls(fake: &FakeUpstream) -> usize {
    [Endpoint::Refresh, Endpoint::Usage, Endpoint::Models]
        .into_iter()
        .map(|e| fake.count(e))
        .sum()
}

type Request = Arc<dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync>;

const WARM_UP: usize = 20;

/// Sends `total` requests from `clients` concurrent loops, after a short warm-up that is
/// not measured (but is counted in upstream calls and writes by the callers).
async fn drive(client: &reqwest::Client, request: &Request, clients: usize, total: usize) -> Load {
    for _ in 0..WARM_UP {
        let _ = send(client, request).await;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (client, request, next) = (client.clone(), request.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = 0;
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let t = Instant::now();
                    if !send(&client, &request).await {
                        failures += 1;
                    }
                    latencies.push(t.elapsed());
                }
                (latencies, failures)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    let mut failures = 0;
    for worker in workers {
        let (l, f) = worker.await.expect("load worker");
        latencies.extend(l);
        failures += f;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Load {
        requests: latencies.len(),
        failures,
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// One request, body read to the end; true on a 200.
async fn send(client: &reqwest::Client, request: &Request) -> bool {
    match request(client).send().await {
        Ok(response) => {
            let ok = response.status() == reqwest::StatusCode::OK;
            response.bytes().await.is_ok() && ok
        }
        Err(_) => false,
    }
}

/// A pool of `size` accounts the fake knows, all usable: fresh usage, tokens not due.
fn write_pool(fake: &FakeUpstream, dir: &std::path::Path, size: usize) {
    let now = gibby::io::live::unix_now();
    let accounts = (0..size)
        .map(|i| {
            let email = format!("user{i:04}@bench.invalid");
            let primary = (i % 90) as i64;
            let issued = fake.add_account(AccountSpec {
                primary: Some(Window::five_hour(primary)),
                secondary: Some(Window::weekly(20)),
                ..AccountSpec::new(&email)
            });
            Account {
                email,
                access_token: Secret::new(issued.access_token),
                refresh_token: Secret::new(issued.refresh_token),
                token_refresh_at: Some(issued.expires_at - 86_400),
                usage: Some(Usage {
                    primary: Some(gibby::model::Window {
                        used_percent: primary.into(),
                        reset_at: now + 18_000,
                    }),
                    secondary: Some(gibby::model::Window {
                        used_percent: 20.into(),
                        reset_at: now + 604_800,
                    }),
                }),
                usage_checked_at: Some(now),
                disabled: false,
            }
        })
        .collect::<Vec<_>>();
    let file = AccountsFile {
        active_account: Some(accounts[0].email.clone()),
        accounts,
    };
    gibby::io::store::atomic_write(
        &dir.join(gibby::model::ACCOUNTS_FILE),
        file.to_text().as_bytes(),
    )
    .expect("pool written");
    // A pool that has run for a while has lost accounts: a fifth of its size here.
    let failed = gibby::model::FailedFile {
        accounts: (0..size / 5)
            .map(|i| Account {
                email: format!("gone{i:04}@bench.invalid"),
                ..file.accounts[i].clone()
            })
            .collect(),
    };
    gibby::io::store::atomic_write(
        &dir.join(gibby::model::FAILED_FILE),
        failed.to_text().as_bytes(),
    )
    .expect("failed.json written");
}

/// The `gibby serve` child process, killed on drop, and what its log lines say.
///
/// gibby logs to a file, read between runs: a pipe would wake a reader in this process
/// on every line, and that work would be counted against gibby.
struct Gibby {
    child: Child,
    url: String,
    log: std::path::PathBuf,
    _log_dir: tempfile::TempDir,
    /// How far the log has been read, and what it said so far.
    seen: std::sync::Mutex<LogSeen>,
}

#[derive(Default)]
struct LogSeen {
    offset: usize,
    /// Per-request log lines (`token served` / `no usable account`).
    lines: usize,
    /// Sum of their `writes=` fields.
    writes: usize,
    address: Option<String>,
}

impl Gibby {
    fn start(dir: &std::path::Path, upstream: &str) -> Gibby {
        let log_dir = tempfile::tempdir().expect("log dir");
        let log = log_dir.path().join("gibby.log");
        let child = Command::new(env!("CARGO_BIN_EXE_gibby"))
            .arg("serve")
            .env("GIBBY_DATA_DIR", dir)
            .env("GIBBY_LISTEN", "127.0.0.1:0")
            .env("GIBBY_CHATGPT_BASE_URL", upstream)
            .env("GIBBY_AUTH_BASE_URL", upstream)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("GIBBY_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs_err::File::create(&log).expect("log file").into_parts().0)
            .spawn()
            .expect("gibby starts");
        let mut gibby = Gibby {
            child,
            url: String::new(),
            log,
            _log_dir: log_dir,
            seen: Default::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let address = loop {
            if let Some(address) = gibby.scan().address {
                break address;
            }
            assert!(Instant::now() < deadline, "gibby logs its address");
            std::thread::sleep(Duration::from_millis(5));
        };
        gibby.url = format!("http://{address}");
        gibby
    }

    /// Reads the log lines written since the last scan; returns what they said so far.
    fn scan(&self) -> LogSeen {
        let mut seen = self.seen.lock().unwrap();
        let text = fs_err::read(&self.log).expect("gibby's log");
        // Only whole lines: one being written is read next time.
        let end = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in String::from_utf8_lossy(&text[seen.offset.min(end)..end]).lines() {
            let line = strip_ansi(line);
            if line.contains("gibby serving") {
                seen.address = Some(field(&line, "listen").unwrap_or_default());
            } else if line.contains("token served") || line.contains("no usable account") {
                seen.writes += field(&line, "writes")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                seen.lines += 1;
            } else if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("gibby: {line}");
            }
        }
        seen.offset = end;
        LogSeen {
            offset: end,
            lines: seen.lines,
            writes: seen.writes,
            address: seen.address.clone(),
        }
    }

    /// The counts once `n` request lines are in. Each is written before its answer is
    /// sent, so after a run they are all there; the bound only guards against a bug.
    fn log_lines(&self, n: usize) -> LogSeen {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.scan();
            if seen.lines >= n || Instant::now() >= deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// CPU time all of gibby's threads have run so far (`/proc/<pid>/task/*/schedstat`,
    /// nanoseconds; a thread that has ended is not counted, and gibby's are long-lived).
    fn cpu_time(&self) -> Duration {
        let tasks = format!("/proc/{}/task", self.child.id());
        let nanos: u64 = fs_err::read_dir(&tasks)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|task| fs_err::read_to_string(task.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        Duration::from_nanos(nanos)
    }

    /// `VmHWM`: the peak resident set of the process so far.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = fs_err::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Gibby {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `name=value` in a log line.
fn field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    Some(
        line[start..]
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn print_report(rows: &[Row]) {
    println!();
    println!(
        "gibby benchmark: {} ({}), {} logical CPUs",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!();
    println!(
        "{:<18} {:>8} {:>7} {:>8} {:>5} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>9}",
        "target",
        "upstream",
        "clients",
        "requests",
        "fail",
        "req/s",
        "p50",
        "p99",
        "calls/tok",
        "writes/tok",
        "CPU/tok",
        "peak RSS"
    );
    for r in rows {
        let target = match r.target {
            Target::Direct => "direct validation".to_owned(),
            Target::Gibby(n) => format!("gibby {n} accounts"),
            Target::Health => "gibby /health".to_owned(),
        };
        println!(
            "{:<18} {:>6}ms {:>7} {:>8} {:>5} {:>9.0} {:>9} {:>9} {:>10.3} {:>10} {:>8} {:>9}",
            target,
            r.latency_ms,
            r.clients,
            r.load.requests,
            r.load.failures,
            r.load.rps,
            micros(r.load.p50),
            micros(r.load.p99),
            r.upstream_per_token,
            r.writes_per_token.map_or("-".into(), |w| format!("{w:.3}")),
            r.cpu_per_token.map_or("-".into(), micros),
            r.peak_rss_kib
                .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
        );
    }
    println!();
    let floor = |target| {
        rows.iter()
            .find(|r| r.target == target && r.latency_ms == 0 && r.clients == 1)
            .map(|r| r.load.p50)
    };
    if let (Some(health), Some(direct)) = (floor(Target::Health), floor(Target::Direct)) {
        let sum = health + direct;
        println!(
            "floor under /token, 1 client, upstream at once: /health {} + direct {} = {} ({:.2} x direct)",
            micros(health),
            micros(direct),
            micros(sum),
            sum.as_secs_f64() / direct.as_secs_f64()
        );
        println!();
    }
    if ["GIBBY_BENCH_LATENCIES", "GIBBY_BENCH_CLIENTS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
    {
        println!("targets (issue #7): judged only when every latency and client count runs");
        return;
    }
    println!("targets (issue #7):");
    let find = |target: Target, latency_ms: u64, clients: usize| {
        rows.iter()
            .find(|r| r.target == target && r.latency_ms == latency_ms && r.clients == clients)
            .expect("every combination ran")
    };
    let verdict = |ok: bool, what: String| {
        println!("  [{}] {what}", if ok { "met" } else { "MISSED" });
    };
    let direct = |l, c| find(Target::Direct, l, c);
    for size in chosen("GIBBY_BENCH_POOLS", &POOLS) {
        let g = |l, c| find(Target::Gibby(size), l, c);
        let (gp, dp) = (g(0, 1).load.p50, direct(0, 1).load.p50);
        verdict(
            gp <= dp * 2,
            format!(
                "{size} accounts, upstream at once, 1 client: p50 {} <= 2 x direct {}",
                micros(gp),
                micros(dp)
            ),
        );
        let (gr, dr) = (g(0, 64).load.rps, direct(0, 64).load.rps);
        verdict(
            gr >= dr / 2.0,
            format!("{size} accounts, upstream at once, 64 clients: {gr:.0} req/s >= half of direct {dr:.0}"),
        );
        let (gp, dp) = (g(50, 1).load.p50, direct(50, 1).load.p50);
        verdict(
            gp <= dp + Duration::from_millis(2),
            format!(
                "{size} accounts, upstream +50 ms, 1 client: p50 {} <= direct {} + 2 ms",
                micros(gp),
                micros(dp)
            ),
        );
        let (gr, dr) = (g(50, 64).load.rps, direct(50, 64).load.rps);
        verdict(
            gr >= dr,
            format!(
                "{size} accounts, upstream +50 ms, 64 clients: {gr:.0} req/s >= direct {dr:.0}"
            ),
        );
        let steady = [g(0, 1), g(50, 1)];
        let writes = steady
            .iter()
            .filter_map(|r| r.writes_per_token)
            .fold(0.0, f64::max);
        let calls = steady
            .iter()
            .map(|r| r.upstream_per_token)
            .fold(0.0, f64::max);
        verdict(
            writes == 0.0 && calls <= 1.0,
            format!("{size} accounts, steady state: {writes:.3} writes and {calls:.3} upstream calls per /token (0 and <= 1)"),
        );
        let shared = [g(0, 64), g(50, 64)].map(|r| r.upstream_per_token);
        verdict(
            shared.iter().all(|&c| c < 1.0),
            format!(
                "{size} accounts, 64 clients: {:.3} / {:.3} upstream calls per /token (< 1, shared validations)",
                shared[0], shared[1]
            ),
        );
        let rss = g(50, 64).peak_rss_kib.unwrap_or(u64::MAX);
        verdict(
            rss < 30 * 1024,
            format!(
                "{size} accounts: gibby peak RSS {:.1} MiB < 30 MiB",
                rss as f64 / 1024.0
            ),
        );
    }
    let p50 = |size| {
        rows.iter()
            .find(|r| r.target == Target::Gibby(size) && r.latency_ms == 0 && r.clients == 1)
            .map(|r| r.load.p50)
    };
    let (Some(big), Some(small)) = (p50(1_000), p50(10)) else {
        return;
    };
    verdict(
        big <= small * 2,
        format!(
            "1,000 vs 10 accounts, upstream at once, 1 client: p50 {} <= 2 x {}",
            micros(big),
            micros(small)
        ),
    );
}

fn micros(d: Duration) -> String {
    if d >= Duration::from_millis(10) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{} us", d.as_micros())
    }
}

fn cpu_model() -> String {
    fs_err::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
