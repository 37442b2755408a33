//! Measures what routing over a pool of backends adds to a warm login: one mailgate with a
//! listener on a pool of three real Dovecots and listeners on each of them alone, the same
//! account logged in through the pool and through the one server the pool routes it to,
//! alternately, in one run. Run via `bench/run.sh pool`.
//!
//! Only loopback is used; every loop is bounded in count and time.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::imap_client::ImapClient;
use support::{Dovecot, Mailgate, TestCa, free_port};

const ACCOUNT: &str = "bench";
const USER: &str = "bench@example.test";
const SERVERS: usize = 3;
/// Logins through each listener; enough for a 99th percentile of a few samples.
const LOGIN_SAMPLES: usize = 1000;
/// Everything in this program must be done well within this.
const BENCH_TIMEOUT: Duration = Duration::from_secs(600);

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to do then.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("benchmark skipped: run bench/run.sh pool");
        return;
    }
    tokio::time::timeout(BENCH_TIMEOUT, run())
        .await
        .expect("benchmark did not finish within its time limit");
}

async fn run() {
    let ca = TestCa::create().await;
    let introspection = support::Introspection::start().await;
    let auth = support::AuthServer::start(Some(&introspection)).await;
    let sink = support::SmtpSink::start().await;
    let mut dovecots = Vec::new();
    for _ in 0..SERVERS {
        dovecots.push(Dovecot::start(&ca, &introspection.url(), sink.addr()).await);
    }
    auth.grant_with_expiry(ACCOUNT, USER, 3600);

    let pool_port = free_port();
    let admin_port = free_port();
    let alone_ports: Vec<u16> = dovecots.iter().map(|_| free_port()).collect();
    let mailgate = Mailgate::start(&config(
        &dovecots,
        pool_port,
        &alone_ports,
        admin_port,
        &auth.url(),
    ))
    .await;
    let pool = SocketAddr::from(([127, 0, 0, 1], pool_port));

    // Warms the token cache, and shows which server the pool routes the account to.
    login_and_noop(pool).await;
    let chosen = routed_server(admin_port).await;
    let alone = SocketAddr::from(([127, 0, 0, 1], alone_ports[chosen]));
    login_and_noop(alone).await;

    eprintln!("{LOGIN_SAMPLES} logins through each listener ...");
    let mut alone_ms = Vec::new();
    let mut pool_ms = Vec::new();
    for sample in 0..LOGIN_SAMPLES {
        // Alternating which goes first evens out whatever the previous login left behind.
        if sample % 2 == 0 {
            alone_ms.push(login_and_noop(alone).await);
            pool_ms.push(login_and_noop(pool).await);
        } else {
            pool_ms.push(login_and_noop(pool).await);
            alone_ms.push(login_and_noop(alone).await);
        }
    }
    alone_ms.sort_by(f64::total_cmp);
    pool_ms.sort_by(f64::total_cmp);

    println!();
    println!(
        "mailgate pool benchmark (real Dovecots on loopback, plain IMAP, release build, warm token cache)"
    );
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "connect+login+NOOP", "one server", "pool of 3", "ratio"
    );
    for (name, share) in [("p50", 0.50), ("p99", 0.99)] {
        let one = percentile(&alone_ms, share);
        let three = percentile(&pool_ms, share);
        println!(
            "{:<44} {:>9.3} ms {:>9.3} ms {:>8.3}",
            format!("  {name} of {LOGIN_SAMPLES}"),
            one,
            three,
            three / one
        );
    }
    drop(mailgate);
    drop(dovecots);
}

/// A listener on the pool of every Dovecot and one on each Dovecot alone; the admin
/// endpoint, whose metrics tell which server the pool chose.
fn config(
    dovecots: &[Dovecot],
    pool_port: u16,
    alone_ports: &[u16],
    admin_port: u16,
    auth_url: &str,
) -> String {
    let servers: String = dovecots
        .iter()
        .enumerate()
        .map(|(n, dovecot)| {
            format!(
                "        - {{ name: d{n}, host: 127.0.0.1, port: {} }}\n",
                dovecot.imap_port
            )
        })
        .collect();
    let alone: String = dovecots
        .iter()
        .zip(alone_ports)
        .enumerate()
        .map(|(n, (dovecot, port))| {
            format!(
                r#"  - name: alone{n}
    protocol: imap
    listen: "127.0.0.1:{port}"
    upstream: {{ host: 127.0.0.1, port: {}, tls: none, mechanism: xoauth2 }}
"#,
                dovecot.imap_port
            )
        })
        .collect();
    format!(
        r#"listeners:
  - name: pool
    protocol: imap
    listen: "127.0.0.1:{pool_port}"
    upstream:
      servers:
{servers}      tls: none
      mechanism: xoauth2
{alone}tokens:
  auth_server: {{ url: "{auth_url}" }}
admin:
  listen: "127.0.0.1:{admin_port}"
log: {{ level: warn }}
"#
    )
}

/// The index of the Dovecot the pool logged the account in on.
async fn routed_server(admin_port: u16) -> usize {
    let metrics = support::curl(&[&format!("http://127.0.0.1:{admin_port}/metrics")])
        .await
        .stdout;
    (0..SERVERS)
        .find(|n| {
            let series = format!(
                "mailgate_backend_logins_total{{listener=\"pool\",server=\"d{n}\",result=\"ok\"}}"
            );
            support::metric(&metrics, &series) > 0.0
        })
        .expect("the pool counted the warm-up login on one of its servers")
}

/// Milliseconds from connect to the first command's completion after login.
async fn login_and_noop(address: SocketAddr) -> f64 {
    let started = Instant::now();
    let mut client = ImapClient::connect(address).await;
    let done = client.login(ACCOUNT, "any-password").await;
    assert!(done.is_ok(), "login failed: {}", done.tagged);
    client.command("NOOP").await;
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    client.command("LOGOUT").await;
    elapsed
}

/// The value below which `share` of the sorted `values` lie (nearest rank).
fn percentile(sorted: &[f64], share: f64) -> f64 {
    let rank = (share * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
