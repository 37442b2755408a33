//! Replicas on one Redis (`tokens.shared.redis`): for 1, 2 and 3 mailgate processes, logins
//! per second under a burst of concurrent logins, the provider requests they cost, and the
//! Redis round trips per login (mailgate's `mailgate_redis_calls_total`, each script one):
//! for an account's first login anywhere, its first login on another replica, and logins
//! with a warm local cache. A direct XOAUTH2 login to the same Dovecot is the baseline. Run
//! via `bench/run.sh replicas`.
//!
//! Only loopback is used; every loop is bounded in count and time.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use support::cluster::{ALICE, Cluster, log_in_and_out};
use support::imap_client::ImapClient;

const ACCOUNTS: usize = 10;
const BURST_LOGINS: usize = 2000;
/// Logins in flight at once during the burst.
const CONCURRENCY: usize = 200;
const BENCH_TIMEOUT: Duration = Duration::from_secs(900);

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to do then.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("benchmark skipped: run bench/run.sh replicas");
        return;
    }
    tokio::time::timeout(BENCH_TIMEOUT, run())
        .await
        .expect("benchmark did not finish within its time limit");
}

/// One line of the table.
struct Row {
    replicas: usize,
    logins_per_second: f64,
    provider_requests: usize,
    first_login: Calls,
    first_on_another: Option<Calls>,
    warm: Calls,
}

async fn run() {
    let mut rows = Vec::new();
    let mut direct = 0.0;
    for replicas in 1..=3 {
        eprintln!("{replicas} replica(s) ...");
        let mut cluster = Cluster::start(replicas, ACCOUNTS, "log: { level: warn }\n").await;
        cluster.start_all().await;
        if replicas == 1 {
            direct = direct_logins_per_second(&cluster).await;
        }
        rows.push(measure(&cluster).await);
    }
    println!();
    println!(
        "mailgate replicas on one Redis (real Dovecot and redis-server on loopback, {ACCOUNTS} accounts, release build)"
    );
    println!(
        "{:>8} {:>10} {:>7} {:>9} {:>14} {:>16} {:>10}",
        "replicas", "logins/s", "ratio", "provider", "Redis: first", "first elsewhere", "warm"
    );
    println!(
        "{:>8} {:>10.0} {:>7} {:>9} {:>14} {:>16} {:>10}",
        "direct*", direct, "1.000", "-", "-", "-", "-"
    );
    for row in &rows {
        let elsewhere = row
            .first_on_another
            .as_ref()
            .map_or("-".to_owned(), |calls| format!("{:.2}", calls.per_login));
        println!(
            "{:>8} {:>10.0} {:>7.3} {:>9} {:>14.2} {:>16} {:>10.3}",
            row.replicas,
            row.logins_per_second,
            row.logins_per_second / direct,
            row.provider_requests,
            row.first_login.per_login,
            elsewhere,
            row.warm.per_login
        );
    }
    println!(
        "(logins/s: {BURST_LOGINS} connect+login+logout, {CONCURRENCY} at once, over all replicas; provider: refresh requests in all; Redis: round trips per login)"
    );
    if let Some(row) = rows.last() {
        println!("round trips by operation, {} replicas:", row.replicas);
        println!("  first anywhere:  {}", row.first_login.ops);
        if let Some(calls) = &row.first_on_another {
            println!("  first elsewhere: {}", calls.ops);
        }
        println!("  warm:            {}", row.warm.ops);
    }
    println!(
        "(* direct: XOAUTH2 straight to Dovecot over plain IMAP; mailgate's own upstream connections use implicit TLS)"
    );
}

/// One mode's figures, on a cluster whose replicas run and have not served a login yet.
async fn measure(cluster: &Cluster) -> Row {
    let replicas = cluster.replicas.len();
    let before = round_trips(cluster).await;
    for account in &cluster.accounts {
        expect_ok(log_in_and_out(cluster.replicas[0].imap_address(), account).await);
    }
    let after_first = round_trips(cluster).await;
    for replica in &cluster.replicas[1..] {
        for account in &cluster.accounts {
            expect_ok(log_in_and_out(replica.imap_address(), account).await);
        }
    }
    let after_elsewhere = round_trips(cluster).await;
    let started = Instant::now();
    burst(BURST_LOGINS, |n| {
        let address = cluster.replicas[n % replicas].imap_address();
        let account = cluster.accounts[n % ACCOUNTS].clone();
        async move { log_in_and_out(address, &account).await }
    })
    .await;
    let logins_per_second = BURST_LOGINS as f64 / started.elapsed().as_secs_f64();
    let after_warm = round_trips(cluster).await;
    let elsewhere_logins = ACCOUNTS * (replicas - 1);
    Row {
        replicas,
        logins_per_second,
        provider_requests: cluster.refreshes().0,
        first_login: per_login(&before, &after_first, ACCOUNTS),
        first_on_another: (elsewhere_logins > 0)
            .then(|| per_login(&after_first, &after_elsewhere, elsewhere_logins)),
        warm: per_login(&after_elsewhere, &after_warm, BURST_LOGINS),
    }
}

/// Direct XOAUTH2 logins to the cluster's Dovecot with a valid token, as the burst does them.
async fn direct_logins_per_second(cluster: &Cluster) -> f64 {
    let token = cluster.up.auth.grant("bench-direct", ALICE);
    let address = SocketAddr::from(([127, 0, 0, 1], cluster.up.dovecot.imap_port));
    let started = Instant::now();
    burst(BURST_LOGINS, |_| {
        let token = token.clone();
        async move {
            let mut client = ImapClient::connect(address).await;
            let message = format!("user={ALICE}\x01auth=Bearer {token}\x01\x01");
            let encoded = base64::engine::general_purpose::STANDARD.encode(message);
            let login = client
                .command(&format!("AUTHENTICATE XOAUTH2 {encoded}"))
                .await;
            if login.is_ok() {
                client.command("LOGOUT").await;
            }
            login.tagged
        }
    })
    .await;
    BURST_LOGINS as f64 / started.elapsed().as_secs_f64()
}

/// Runs `count` logins, [`CONCURRENCY`] at once; panics on a failed one.
async fn burst<F, Fut>(count: usize, login: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = String> + Send + 'static,
{
    let mut pending = tokio::task::JoinSet::new();
    let mut started = 0;
    while started < count || !pending.is_empty() {
        while started < count && pending.len() < CONCURRENCY {
            pending.spawn(login(started));
            started += 1;
        }
        if let Some(done) = pending.join_next().await {
            expect_ok(done.expect("login task"));
        }
    }
}

fn expect_ok(tagged: String) {
    assert!(tagged.contains(" OK "), "login failed: {tagged}");
}

/// Round trips to Redis so far, over all replicas, by operation (mailgate's own count: one
/// per call, each script one).
async fn round_trips(cluster: &Cluster) -> BTreeMap<String, f64> {
    let mut calls = BTreeMap::new();
    for n in 0..cluster.replicas.len() {
        for line in cluster.metrics(n).await.lines() {
            let Some(rest) = line.strip_prefix("mailgate_redis_calls_total{op=\"") else {
                continue;
            };
            let (op, rest) = rest.split_once('"').expect("an op label");
            let count: f64 = rest
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *calls.entry(op.to_owned()).or_insert(0.0) += count;
        }
    }
    calls
}

/// Round trips per login.
struct Calls {
    per_login: f64,
    /// The operations, each with its calls per login.
    ops: String,
}

/// What was called between two counts, per login.
fn per_login(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    logins: usize,
) -> Calls {
    let mut ops = Vec::new();
    for (op, count) in after {
        let delta = count - before.get(op).copied().unwrap_or(0.0);
        if delta > 0.0 {
            ops.push(format!("{op} {:.2}", delta / logins as f64));
        }
    }
    let total: f64 = after.values().sum::<f64>() - before.values().sum::<f64>();
    Calls {
        per_login: total / logins as f64,
        ops: ops.join(", "),
    }
}
