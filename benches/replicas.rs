//! Replicas on one Redis (`tokens.shared.redis`): for 1, 2 and 3 mailgate processes, logins
//! per second under a burst of concurrent logins, the provider requests they cost, and the
//! Redis commands per login (from Redis's own `INFO` count): for an account's first login
//! anywhere, its first login on another replica, and logins with a warm local cache. A
//! direct XOAUTH2 login to the same Dovecot is the baseline. Run via `bench/run.sh replicas`.
//!
//! Only loopback is used; every loop is bounded in count and time.

#[path = "../tests/support/mod.rs"]
mod support;

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
    first_login: f64,
    first_on_another: Option<f64>,
    warm: f64,
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
        "{:>8} {:>13} {:>8} {:>9} {:>19} {:>19} {:>12}",
        "replicas", "logins/s", "ratio", "provider", "Redis cmds: first", "first elsewhere", "warm"
    );
    println!(
        "{:>8} {:>13.0} {:>8} {:>9} {:>19} {:>19} {:>12}",
        "direct*", direct, "1.000", "-", "-", "-", "-"
    );
    for row in &rows {
        let elsewhere = row
            .first_on_another
            .map_or("-".to_owned(), |n| format!("{n:.2}"));
        println!(
            "{:>8} {:>13.0} {:>8.3} {:>9} {:>19.2} {:>19} {:>12.3}",
            row.replicas,
            row.logins_per_second,
            row.logins_per_second / direct,
            row.provider_requests,
            row.first_login,
            elsewhere,
            row.warm
        );
    }
    println!(
        "(logins/s: {BURST_LOGINS} connect+login+logout, {CONCURRENCY} at once, over all replicas; provider: refresh requests in all; Redis cmds per login)"
    );
    println!(
        "(* direct: XOAUTH2 straight to Dovecot over plain IMAP; mailgate's own upstream connections use implicit TLS)"
    );
}

/// One mode's figures, on a cluster whose replicas run and have not served a login yet.
async fn measure(cluster: &Cluster) -> Row {
    let replicas = cluster.replicas.len();
    let before = commands(cluster).await;
    for account in &cluster.accounts {
        expect_ok(log_in_and_out(cluster.replicas[0].imap_address(), account).await);
    }
    let after_first = commands(cluster).await;
    for replica in &cluster.replicas[1..] {
        for account in &cluster.accounts {
            expect_ok(log_in_and_out(replica.imap_address(), account).await);
        }
    }
    let after_elsewhere = commands(cluster).await;
    let started = Instant::now();
    burst(BURST_LOGINS, |n| {
        let address = cluster.replicas[n % replicas].imap_address();
        let account = cluster.accounts[n % ACCOUNTS].clone();
        async move { log_in_and_out(address, &account).await }
    })
    .await;
    let logins_per_second = BURST_LOGINS as f64 / started.elapsed().as_secs_f64();
    let after_warm = commands(cluster).await;
    let elsewhere_logins = ACCOUNTS * (replicas - 1);
    Row {
        replicas,
        logins_per_second,
        provider_requests: cluster.refreshes().0,
        first_login: per_login(after_first - before, ACCOUNTS),
        first_on_another: (elsewhere_logins > 0)
            .then(|| per_login(after_elsewhere - after_first, elsewhere_logins)),
        warm: per_login(after_warm - after_elsewhere, BURST_LOGINS),
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

/// Commands Redis has processed so far, less the `INFO` asking for it.
async fn commands(cluster: &Cluster) -> u64 {
    let info = cluster.redis.cli(&["INFO", "stats"]).await;
    info.lines()
        .find_map(|line| line.strip_prefix("total_commands_processed:"))
        .and_then(|count| count.trim().parse::<u64>().ok())
        .expect("total_commands_processed in INFO stats")
        .saturating_sub(1)
}

fn per_login(commands: u64, logins: usize) -> f64 {
    commands as f64 / logins as f64
}
