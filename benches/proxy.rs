//! Measures mailgate against a direct connection to the same real Dovecot, in one run:
//! bulk FETCH throughput, login-to-first-command latency with a warm token cache, memory per
//! idle authenticated session, and auth-server requests per account. Run via `bench/run.sh`.
//!
//! Only loopback is used; every loop is bounded in count and time.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use support::imap_client::ImapClient;
use support::{Dovecot, Mailgate, TestCa, free_port};

const ACCOUNT: &str = "bench";
const USER: &str = "bench@example.test";
/// 100 messages of 1 MiB: the ~100 MiB bulk FETCH the targets are stated for.
const MESSAGES: usize = 100;
const MESSAGE_BYTES: usize = 1024 * 1024;
/// Each round fetches the mailbox once directly and once through mailgate, in alternating
/// order; a round takes well under a second, so many of them even out scheduler noise.
const THROUGHPUT_ROUNDS: usize = 15;
const LOGIN_SAMPLES: usize = 300;
const IDLE_SESSIONS: usize = 10_000;
/// Descriptors mailgate keeps for listeners, the admin port, logs and the auth-server client.
const SPARE_DESCRIPTORS: usize = 100;
/// Logins in flight at once while opening the idle sessions.
const OPEN_CONCURRENCY: usize = 100;
/// Everything in this program must be done well within this.
const BENCH_TIMEOUT: Duration = Duration::from_secs(900);

/// Dovecot's defaults allow 10 sessions per user and IP and one process per IMAP client
/// (`service_count = 1`); ten thousand idle sessions of one user need both raised.
const DOVECOT_TUNING: &str = "
protocol imap {
  mail_max_userip_connections = 20000
}
service imap {
  service_count = 0
  client_limit = 1000
  process_limit = 100
}
service imap-login {
  service_count = 0
  client_limit = 1000
  process_min_avail = 2
}
default_client_limit = 25000
default_vsz_limit = 1G
";

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to do then.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("benchmark skipped: run bench/run.sh");
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
    let dovecot =
        Dovecot::start_tuned(&ca, &introspection.url(), sink.addr(), DOVECOT_TUNING).await;
    let token = auth.grant_with_expiry(ACCOUNT, USER, 3600);
    let direct = Dovecot::addr(dovecot.imap_port);

    let imap_port = free_port();
    let config = format!(
        r#"listeners:
  - name: imap
    protocol: imap
    listen: "127.0.0.1:{imap_port}"
    max_connections: 50000
    max_connections_per_client: 50000
    upstream: {{ host: 127.0.0.1, port: {port}, tls: none, mechanism: xoauth2 }}
tokens:
  auth_server: {{ url: "{url}" }}
log: {{ level: warn }}
"#,
        port = dovecot.imap_port,
        url = auth.url(),
    );
    let mailgate = Mailgate::start(&config).await;
    let proxied = SocketAddr::from(([127, 0, 0, 1], imap_port));
    let direct_login = Login::Direct(token.clone());
    let proxied_login = Login::Proxied;

    eprintln!(
        "filling the mailbox with {MESSAGES} x {} KiB ...",
        MESSAGE_BYTES / 1024
    );
    fill_mailbox(direct, &direct_login).await;

    eprintln!("throughput ...");
    // Warms Dovecot's caches and the page cache so the first counted round is not an outlier.
    fetch_all(direct, &direct_login).await;
    fetch_all(proxied, &proxied_login).await;
    let mut direct_rates = Vec::new();
    let mut proxied_rates = Vec::new();
    let mut ratios = Vec::new();
    for round in 0..THROUGHPUT_ROUNDS {
        let (direct_rate, proxied_rate) = if round % 2 == 0 {
            let direct_rate = fetch_all(direct, &direct_login).await;
            (direct_rate, fetch_all(proxied, &proxied_login).await)
        } else {
            let proxied_rate = fetch_all(proxied, &proxied_login).await;
            (fetch_all(direct, &direct_login).await, proxied_rate)
        };
        direct_rates.push(direct_rate);
        proxied_rates.push(proxied_rate);
        ratios.push(proxied_rate / direct_rate);
    }
    let direct_rate = median(&mut direct_rates);
    let proxied_rate = median(&mut proxied_rates);
    let ratio = median(&mut ratios);
    let (lowest, highest) = (ratios[0], ratios[ratios.len() - 1]);

    eprintln!("login latency ...");
    login_and_noop(proxied, &proxied_login).await; // warms the token cache
    let mut direct_ms = Vec::new();
    let mut proxied_ms = Vec::new();
    for _ in 0..LOGIN_SAMPLES {
        direct_ms.push(login_and_noop(direct, &direct_login).await);
        proxied_ms.push(login_and_noop(proxied, &proxied_login).await);
    }
    let direct_latency = median(&mut direct_ms);
    let proxied_latency = median(&mut proxied_ms);

    let mib = (MESSAGES * MESSAGE_BYTES) as f64 / (1024.0 * 1024.0);
    println!();
    println!("mailgate benchmark (real Dovecot on loopback, plain IMAP both ways, release build)");
    println!(
        "{:<52} {:>12} {:>12} {:>12}",
        "", "direct", "mailgate", "ratio/delta"
    );
    println!(
        "{:<52} {:>7.0} MiB/s {:>7.0} MiB/s {:>12.3}",
        format!("bulk FETCH of {mib:.0} MiB (median of {THROUGHPUT_ROUNDS} rounds)"),
        direct_rate,
        proxied_rate,
        ratio
    );
    println!(
        "{:<52} {:>12} {:>12} {:>5.3}-{:.3}",
        "  per-round ratio, lowest-highest", "", "", lowest, highest
    );
    println!(
        "{:<52} {:>9.3} ms {:>9.3} ms {:>+9.3} ms",
        format!("connect+login+NOOP, warm cache (median of {LOGIN_SAMPLES})"),
        direct_latency,
        proxied_latency,
        proxied_latency - direct_latency
    );

    let pid = mailgate.pid().expect("mailgate runs");
    // Each session is a client and an upstream socket; a sandbox's descriptor limit may not
    // fit ten thousand of them.
    let idle_sessions =
        IDLE_SESSIONS.min(open_file_limit(pid).saturating_sub(SPARE_DESCRIPTORS) / 2);
    eprintln!("{idle_sessions} idle sessions ...");
    let rss_before = rss_kib(pid);
    let sessions = match open_idle_sessions(proxied, idle_sessions).await {
        Ok(sessions) => sessions,
        Err((opened, error)) => {
            let tail = |text: String| {
                let lines = text.lines().rev();
                let notable = lines.filter(|l| !l.contains("Disconnected"));
                notable.take(15).collect::<Vec<_>>().join("\n")
            };
            panic!(
                "login {} of {idle_sessions} failed: {error}\n--- mailgate (newest first)\n{}\n--- dovecot (newest first)\n{}",
                opened + 1,
                tail(mailgate.output()),
                tail(dovecot.log())
            );
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(pid);
    // Every proxied login of the run, against the auth-server requests they caused.
    let proxied_logins = THROUGHPUT_ROUNDS + 2 + LOGIN_SAMPLES + sessions.len();
    let requests = auth.requests(ACCOUNT);
    let per_session = (rss_after.saturating_sub(rss_before)) as f64 / sessions.len() as f64;
    drop(sessions);
    println!(
        "{:<52} {:>12} {:>9} KiB {:>8.2} KiB/session",
        format!("mailgate RSS with {idle_sessions} idle sessions"),
        "",
        rss_after,
        per_session
    );
    println!(
        "{:<52} {:>12} {:>12}",
        format!("auth-server requests for {proxied_logins} logins (1 account)"),
        "",
        requests
    );
    drop(mailgate);
    drop(dovecot);
}

/// How a bench client authenticates: straight to Dovecot with the token, or through mailgate.
enum Login {
    Direct(String),
    Proxied,
}

/// Connects and logs in; panics if the login fails.
async fn connect(address: SocketAddr, login: &Login) -> ImapClient {
    try_connect(address, login)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

/// Connects and logs in; the tagged reply when the login fails.
async fn try_connect(address: SocketAddr, login: &Login) -> Result<ImapClient, String> {
    let mut client = ImapClient::connect(address).await;
    let done = match login {
        Login::Direct(token) => {
            let message = format!("user={USER}\x01auth=Bearer {token}\x01\x01");
            let encoded = base64::engine::general_purpose::STANDARD.encode(message);
            client
                .command(&format!("AUTHENTICATE XOAUTH2 {encoded}"))
                .await
        }
        Login::Proxied => client.login(ACCOUNT, "any-password").await,
    };
    if done.is_ok() {
        Ok(client)
    } else {
        Err(format!("login failed: {}", done.tagged))
    }
}

async fn fill_mailbox(address: SocketAddr, login: &Login) {
    let mut client = connect(address, login).await;
    let body = message_body();
    for i in 0..MESSAGES {
        let tag = format!("append{i}");
        let head = format!("{tag} APPEND INBOX {{{}+}}\r\n", body.len());
        client.send_raw(head.as_bytes()).await;
        client.send_raw(&body).await;
        client.send_raw(b"\r\n").await;
        assert!(client.until_tagged(&tag).await.is_ok());
    }
}

fn message_body() -> Vec<u8> {
    let mut body = "From: bench@example.test\r\nTo: bench@example.test\r\nSubject: bench\r\n\r\n"
        .to_owned()
        .into_bytes();
    let line =
        b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdef\r\n";
    while body.len() + line.len() <= MESSAGE_BYTES {
        body.extend_from_slice(line);
    }
    body
}

/// MiB/s for a FETCH of every message body in one command.
async fn fetch_all(address: SocketAddr, login: &Login) -> f64 {
    let mut client = connect(address, login).await;
    client.command("SELECT INBOX").await;
    let started = Instant::now();
    let bytes = client.command("FETCH 1:* BODY.PEEK[]").await.bytes;
    let seconds = started.elapsed().as_secs_f64();
    client.command("LOGOUT").await;
    bytes as f64 / (1024.0 * 1024.0) / seconds
}

/// Milliseconds from connect to the first command's completion after login.
async fn login_and_noop(address: SocketAddr, login: &Login) -> f64 {
    let started = Instant::now();
    let mut client = connect(address, login).await;
    client.command("NOOP").await;
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    client.command("LOGOUT").await;
    elapsed
}

/// Opens `count` logged-in sessions, a bounded number at a time; on a failure, how many were
/// open and why.
async fn open_idle_sessions(
    address: SocketAddr,
    count: usize,
) -> Result<Vec<ImapClient>, (usize, String)> {
    let mut sessions = Vec::with_capacity(count);
    let mut pending = tokio::task::JoinSet::new();
    let mut started = 0;
    while sessions.len() < count {
        while started < count && pending.len() < OPEN_CONCURRENCY {
            pending.spawn(async move { try_connect(address, &Login::Proxied).await });
            started += 1;
        }
        if let Some(done) = pending.join_next().await {
            match done.expect("login task") {
                Ok(session) => sessions.push(session),
                Err(error) => return Err((sessions.len(), error)),
            }
        }
    }
    Ok(sessions)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The soft limit on open files of process `pid`.
fn open_file_limit(pid: u32) -> usize {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("proc limits");
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
        .expect("Max open files")
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
