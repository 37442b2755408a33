//! Hostile input against one running mailgate while it serves real clients: 100 good sessions
//! (IMAP, SMTP, POP3 and ManageSieve, over STARTTLS and implicit TLS, through to Dovecot and the
//! SMTP sink) run
//! while other connections attack at the same time: random bytes (ClientHellos on plaintext
//! ports, plaintext on TLS ports), megabyte lines, endless literals and BDAT chunks, one byte a
//! second, clients that never read, a flood of connects and closes, and TLS and PROXY
//! handshakes that stall halfway. Every good session must succeed, the process must stay up
//! within a memory bound, and mailgate itself must close every attacking connection in time.
//!
//! Attack payloads come from a seeded generator ([`SEED`]): a failure replays the same bytes.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use mailgate::io::BoxedIo;
use mailgate::login::GOODBYE_TIMEOUT;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use support::process::{is_running, rss_kib};
use support::{Mailgate, TestUpstream, curl, eventually, free_port, secrets, with_timeout};

/// Seeds every attacker's generator (task `i` uses `SEED + i`).
const SEED: u64 = 0x6d61_696c_6761_7465;
const GOOD_SESSIONS: usize = 100;
const GOOD_CONCURRENCY: usize = 20;
/// Good sessions spread over this many accounts: Dovecot allows 10 IMAP sessions per user and
/// address (`mail_max_userip_connections`), and every session reaches it from 127.0.0.1.
const ACCOUNTS: usize = 10;
/// Short, so that attackers are shed within seconds; the lifetime leaves good sessions room to
/// log in on a loaded machine (the slowest login took 3.6 s from its connect with IMAP and SMTP
/// listeners only; with all eight, on two cores shared with two other builds, 5.5 s, and up to
/// 10 s in runs where each listener had attackers of its own). A good client's own pause
/// between two steps passed 2 s once on two cores shared with a fuzzing run, hence 3 s.
const PRE_AUTH_TIMEOUT: Duration = Duration::from_secs(3);
const PRE_AUTH_LIFETIME: Duration = Duration::from_secs(12);
/// Allowance past a deadline for a loaded two-core machine to close the connection.
const SLACK: Duration = Duration::from_secs(4);
/// The attack lasts at least this long, even when the good sessions are done sooner.
const MIN_ATTACK: Duration = Duration::from_secs(10);
/// Resident memory of mailgate (a debug build) must stay below this. Measured on a loaded
/// two-core machine: 25 MiB idle, 28.8 MiB at the peak of the good sessions alone, 31-32 MiB
/// under attack. About twice that: room for other machines' thread counts and allocators,
/// yet far below what keeping the attackers' streams (tens of MiB each) would take.
const RSS_BOUND_KIB: u64 = 64 * 1024;
/// Each step of a good session.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Good clients come from here, so that neither the throttle nor `max_connections_per_client`
/// ties them to the attackers on 127.0.0.1 (Linux routes all of 127/8 on lo).
const GOOD_CLIENT: [u8; 4] = [127, 0, 0, 2];
/// The load balancer the IMAP STARTTLS listener trusts for PROXY headers; only attackers use it.
const BALANCER: [u8; 4] = [127, 0, 0, 3];
/// No line end for 1 MiB, then another MiB.
const LONG_LINE: usize = 2 * 1024 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Protocol {
    Imap,
    Smtp,
    Pop3,
    ManageSieve,
}

/// Every protocol, each with a STARTTLS and an implicit-TLS listener.
const LISTENERS: usize = 8;
type Targets = [Target; LISTENERS];

/// One listener of the mailgate under attack.
#[derive(Clone, Copy, Debug)]
struct Target {
    name: &'static str,
    address: SocketAddr,
    protocol: Protocol,
    /// TLS from the first byte; otherwise plaintext with STARTTLS required.
    implicit: bool,
}

struct Setup {
    up: TestUpstream,
    mailgate: Mailgate,
    _certs: tempfile::TempDir,
    targets: Targets,
    admin: u16,
    tls: Arc<rustls::ClientConfig>,
}

impl Setup {
    async fn start() -> Setup {
        let up = TestUpstream::start().await;
        for n in 0..ACCOUNTS {
            up.auth.grant(&account(n), &user(n));
        }
        let certs = tempfile::tempdir().unwrap();
        std::fs::copy(up.ca.cert_pem(), certs.path().join("tls.crt")).unwrap();
        std::fs::copy(up.ca.key_pem(), certs.path().join("tls.key")).unwrap();
        let ports: Vec<u16> = (0..=LISTENERS).map(|_| free_port()).collect();
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let targets = [
            ("imap", Protocol::Imap, false),
            ("imaps", Protocol::Imap, true),
            ("smtp", Protocol::Smtp, false),
            ("smtps", Protocol::Smtp, true),
            ("pop3", Protocol::Pop3, false),
            ("pop3s", Protocol::Pop3, true),
            ("sieve", Protocol::ManageSieve, false),
            ("sieves", Protocol::ManageSieve, true),
        ]
        .iter()
        .zip(&ports)
        .map(|(&(name, protocol, implicit), &port)| Target {
            name,
            address: at(port),
            protocol,
            implicit,
        })
        .collect::<Vec<_>>();
        let targets: Targets = targets.try_into().unwrap();
        let admin = ports[LISTENERS];
        let mailgate = Mailgate::start(&config(&up, certs.path(), &targets, admin)).await;
        mailgate::tls::install_crypto_provider();
        let tls = mailgate::tls::client_config(Some(&up.ca.ca_pem()), false).unwrap();
        Setup {
            up,
            mailgate,
            _certs: certs,
            targets,
            admin,
            tls,
        }
    }

    fn target(&self, name: &str) -> Target {
        *self.targets.iter().find(|t| t.name == name).unwrap()
    }

    async fn metrics(&self) -> String {
        curl(&[&format!("http://127.0.0.1:{}/metrics", self.admin)])
            .await
            .stdout
    }
}

fn account(n: usize) -> String {
    format!("hostile{n}")
}

fn user(n: usize) -> String {
    format!("hostile{n}@example.test")
}

fn config(up: &TestUpstream, certs: &Path, targets: &[Target], admin: u16) -> String {
    let ca = up.ca_path();
    let mut text = String::from("listeners:\n");
    for target in targets {
        let (protocol, upstream_port, upstream_tls) = match target.protocol {
            Protocol::Imap => ("imap", up.dovecot.imaps_port, "implicit"),
            Protocol::Smtp => ("smtp", up.dovecot.submission_port, "starttls"),
            Protocol::Pop3 => ("pop3", up.dovecot.pop3s_port, "implicit"),
            Protocol::ManageSieve => ("managesieve", up.dovecot.sieve_port, "starttls"),
        };
        let mode = if target.implicit {
            "implicit"
        } else {
            "starttls"
        };
        let proxy = if target.name == "imap" {
            format!("    accept_proxy: [\"{}/32\"]\n", IpAddr::from(BALANCER))
        } else {
            String::new()
        };
        text.push_str(&format!(
            r#"  - name: {name}
    protocol: {protocol}
    listen: "{address}"
    pre_auth_timeout: {timeout}s
    pre_auth_lifetime: {lifetime}s
{proxy}    tls:
      mode: {mode}
      cert_file: "{cert}"
      key_file: "{key}"
    upstream:
      host: 127.0.0.1
      port: {upstream_port}
      tls: {upstream_tls}
      ca_file: "{ca}"
      system_roots: false
"#,
            name = target.name,
            address = target.address,
            timeout = PRE_AUTH_TIMEOUT.as_secs(),
            lifetime = PRE_AUTH_LIFETIME.as_secs(),
            cert = certs.join("tls.crt").display(),
            key = certs.join("tls.key").display(),
        ));
    }
    text.push_str(&format!(
        "tokens:\n  auth_server:\n    url: \"{}\"\nadmin:\n  listen: \"127.0.0.1:{admin}\"\n",
        up.auth.url_with_credentials()
    ));
    text
}

// --- connections ------------------------------------------------------------------------------

/// A TCP connection from `source` (the kernel picks one when `None`), with a small receive
/// buffer when asked.
async fn tcp(
    address: SocketAddr,
    source: Option<[u8; 4]>,
    receive_buffer: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(source) = source {
        socket.bind(SocketAddr::from((source, 0)))?;
    }
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let stream = tokio::time::timeout(STEP_TIMEOUT, socket.connect(address))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn server_name() -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}

async fn tls_over(tls: &Arc<rustls::ClientConfig>, io: BoxedIo) -> std::io::Result<BoxedIo> {
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    let stream = connector.connect(server_name(), io).await?;
    Ok(Box::new(stream))
}

/// A connection to `target`, with TLS done for an implicit-TLS listener.
async fn open(
    target: Target,
    tls: &Arc<rustls::ClientConfig>,
    source: Option<[u8; 4]>,
    receive_buffer: Option<u32>,
) -> std::io::Result<BoxedIo> {
    let io: BoxedIo = Box::new(tcp(target.address, source, receive_buffer).await?);
    if target.implicit {
        tls_over(tls, io).await
    } else {
        Ok(io)
    }
}

/// The first TLS record a client sends: a real ClientHello, as attack material.
fn client_hello(tls: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut connection = rustls::ClientConnection::new(tls.clone(), server_name()).unwrap();
    let mut hello = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut hello).unwrap();
    }
    hello
}

/// A line-oriented client for the good sessions.
struct Lines {
    io: BufReader<BoxedIo>,
}

impl Lines {
    fn new(io: BoxedIo) -> Lines {
        Lines {
            io: BufReader::new(io),
        }
    }

    async fn send(&mut self, text: &str) -> Result<(), String> {
        let write = self.io.get_mut().write_all(text.as_bytes());
        match tokio::time::timeout(STEP_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("sending {text:?}: {error}")),
            Err(_) => Err(format!("sending {text:?}: timed out")),
        }
    }

    async fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match tokio::time::timeout(STEP_TIMEOUT, self.io.read_line(&mut line)).await {
            Ok(Ok(0)) => Err("closed by mailgate".to_owned()),
            Ok(Ok(_)) => Ok(line.trim_end().to_owned()),
            Ok(Err(error)) => Err(format!("reading: {error}")),
            Err(_) => Err("no reply in time".to_owned()),
        }
    }

    /// IMAP: untagged lines, then the line tagged `tag`, which must be OK.
    async fn ok(&mut self, tag: &str) -> Result<Vec<String>, String> {
        let mut untagged = Vec::new();
        loop {
            let line = self.line().await?;
            if let Some(status) = line.strip_prefix(&format!("{tag} ")) {
                if !status.starts_with("OK") {
                    return Err(format!("{line} after {untagged:?}"));
                }
                return Ok(untagged);
            }
            untagged.push(line);
        }
    }

    /// SMTP: one reply, all its lines, which must carry `code`; POP3: one line starting with
    /// `+OK`.
    async fn reply(&mut self, code: &str) -> Result<String, String> {
        let mut all = String::new();
        loop {
            let line = self.line().await?;
            all.push_str(&line);
            all.push('\n');
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        if all.starts_with(code) {
            Ok(all)
        } else {
            Err(format!("expected {code}, got {all}"))
        }
    }

    /// ManageSieve: one response, which must end in `OK` (RFC 5804 4).
    async fn sieve_ok(&mut self) -> Result<Vec<String>, String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await?;
            let status = line.split(' ').next().unwrap_or_default();
            if matches!(status, "OK" | "NO" | "BYE") {
                if status != "OK" {
                    return Err(format!("{line} after {lines:?}"));
                }
                return Ok(lines);
            }
            lines.push(line);
        }
    }

    async fn start_tls(self, tls: &Arc<rustls::ClientConfig>) -> Result<Lines, String> {
        if !self.io.buffer().is_empty() {
            return Err("bytes after the STARTTLS reply".to_owned());
        }
        let io = tls_over(tls, self.io.into_inner())
            .await
            .map_err(|e| format!("handshake after STARTTLS: {e}"))?;
        Ok(Lines::new(io))
    }
}

// --- good sessions ----------------------------------------------------------------------------

fn password(n: usize) -> String {
    format!("good-password-{n:03}-q7")
}

/// Logs in through `target`, lists the folders (INBOX must be there), selects INBOX, logs out;
/// how long the login took from the connect (`pre_auth_lifetime` bounds it).
async fn good_imap(
    target: Target,
    tls: &Arc<rustls::ClientConfig>,
    n: usize,
) -> Result<Duration, String> {
    let started = Instant::now();
    let io = open(target, tls, Some(GOOD_CLIENT), None)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut imap = Lines::new(io);
    let greeting = imap.line().await?;
    if !greeting.starts_with("* OK") {
        return Err(format!("greeting {greeting}"));
    }
    if !target.implicit {
        imap.send("a STARTTLS\r\n").await?;
        imap.ok("a").await?;
        imap = imap.start_tls(tls).await?;
    }
    let account = account(n % ACCOUNTS);
    imap.send(&format!("b LOGIN {account} {}\r\n", password(n)))
        .await?;
    imap.ok("b").await?;
    let login = started.elapsed();
    imap.send("c LIST \"\" \"*\"\r\n").await?;
    let folders = imap.ok("c").await?;
    if !folders.iter().any(|line| line.contains("INBOX")) {
        return Err(format!("no INBOX in {folders:?}"));
    }
    imap.send("d SELECT INBOX\r\n").await?;
    imap.ok("d").await?;
    imap.send("e LOGOUT\r\n").await?;
    imap.ok("e").await?;
    Ok(login)
}

fn subject(n: usize) -> String {
    format!("hostile-input good session {n}")
}

/// Authenticates through `target` and submits one mail with [`subject`]`(n)`; how long the
/// login took from the connect.
async fn good_smtp(
    target: Target,
    tls: &Arc<rustls::ClientConfig>,
    n: usize,
) -> Result<Duration, String> {
    let started = Instant::now();
    let io = open(target, tls, Some(GOOD_CLIENT), None)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut smtp = Lines::new(io);
    smtp.reply("220").await?;
    smtp.send("EHLO good.test\r\n").await?;
    smtp.reply("250").await?;
    if !target.implicit {
        smtp.send("STARTTLS\r\n").await?;
        smtp.reply("220").await?;
        smtp = smtp.start_tls(tls).await?;
        smtp.send("EHLO good.test\r\n").await?;
        smtp.reply("250").await?;
    }
    let k = n % ACCOUNTS;
    let plain = format!("\0{}\0{}", account(k), password(n));
    let plain = base64::engine::general_purpose::STANDARD.encode(plain);
    smtp.send(&format!("AUTH PLAIN {plain}\r\n")).await?;
    smtp.reply("235").await?;
    let login = started.elapsed();
    smtp.send(&format!("MAIL FROM:<{}>\r\n", user(k))).await?;
    smtp.reply("250").await?;
    smtp.send("RCPT TO:<bob@example.test>\r\n").await?;
    smtp.reply("250").await?;
    smtp.send("DATA\r\n").await?;
    smtp.reply("354").await?;
    smtp.send(&format!(
        "Subject: {}\r\n\r\nsent while mailgate was under attack\r\n.\r\n",
        subject(n)
    ))
    .await?;
    smtp.reply("250").await?;
    smtp.send("QUIT\r\n").await?;
    smtp.reply("221").await?;
    Ok(login)
}

/// Logs in through `target` with USER/PASS, asks STAT, quits; how long the login took from
/// the connect.
async fn good_pop3(
    target: Target,
    tls: &Arc<rustls::ClientConfig>,
    n: usize,
) -> Result<Duration, String> {
    let started = Instant::now();
    let io = open(target, tls, Some(GOOD_CLIENT), None)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut pop = Lines::new(io);
    pop.reply("+OK").await?;
    if !target.implicit {
        pop.send("STLS\r\n").await?;
        pop.reply("+OK").await?;
        pop = pop.start_tls(tls).await?;
    }
    let account = account(n % ACCOUNTS);
    pop.send(&format!("USER {account}\r\nPASS {}\r\n", password(n)))
        .await?;
    pop.reply("+OK").await?;
    pop.reply("+OK").await?;
    let login = started.elapsed();
    pop.send("STAT\r\n").await?;
    pop.reply("+OK").await?;
    pop.send("QUIT\r\n").await?;
    pop.reply("+OK").await?;
    Ok(login)
}

/// Authenticates through `target` with AUTHENTICATE "PLAIN", lists the scripts, logs out; how
/// long the login took from the connect.
async fn good_sieve(
    target: Target,
    tls: &Arc<rustls::ClientConfig>,
    n: usize,
) -> Result<Duration, String> {
    let started = Instant::now();
    let io = open(target, tls, Some(GOOD_CLIENT), None)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut sieve = Lines::new(io);
    sieve.sieve_ok().await?;
    if !target.implicit {
        sieve.send("STARTTLS\r\n").await?;
        sieve.sieve_ok().await?;
        sieve = sieve.start_tls(tls).await?;
        // RFC 5804 2.2: the capabilities again after TLS.
        sieve.sieve_ok().await?;
    }
    let plain = format!("\0{}\0{}", account(n % ACCOUNTS), password(n));
    let plain = base64::engine::general_purpose::STANDARD.encode(plain);
    sieve
        .send(&format!("AUTHENTICATE \"PLAIN\" \"{plain}\"\r\n"))
        .await?;
    sieve.sieve_ok().await?;
    let login = started.elapsed();
    sieve.send("LISTSCRIPTS\r\n").await?;
    sieve.sieve_ok().await?;
    sieve.send("LOGOUT\r\n").await?;
    sieve.sieve_ok().await?;
    Ok(login)
}

/// Runs the good sessions, `GOOD_CONCURRENCY` at a time, alternating over every listener;
/// each session's listener, duration and outcome (the time its login took).
async fn good_sessions(
    targets: Targets,
    tls: Arc<rustls::ClientConfig>,
) -> Vec<(&'static str, Duration, Result<Duration, String>)> {
    let permits = Arc::new(Semaphore::new(GOOD_CONCURRENCY));
    let mut sessions = JoinSet::new();
    for n in 0..GOOD_SESSIONS {
        secrets::remember("good session password", &password(n));
        let (permits, tls) = (permits.clone(), tls.clone());
        let target = targets[n % targets.len()];
        sessions.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let started = Instant::now();
            let outcome = match target.protocol {
                Protocol::Imap => good_imap(target, &tls, n).await,
                Protocol::Smtp => good_smtp(target, &tls, n).await,
                Protocol::Pop3 => good_pop3(target, &tls, n).await,
                Protocol::ManageSieve => good_sieve(target, &tls, n).await,
            };
            (n, target.name, started.elapsed(), outcome)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = sessions.join_next().await {
        let (n, name, elapsed, outcome) = joined.unwrap();
        results.push((
            name,
            elapsed,
            outcome.map_err(|e| format!("session {n}: {e}")),
        ));
    }
    results
}

// --- attackers --------------------------------------------------------------------------------

/// A small seeded generator (splitmix64): the same seed, the same attack bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// How one attacking connection ended.
#[derive(Debug)]
struct Shed {
    attack: &'static str,
    target: &'static str,
    /// From the established connection until mailgate closed it; `None`: still open at `limit`.
    closed_after: Option<Duration>,
    limit: Duration,
    /// Something the attack expected to see and did not (a refusal reply).
    missing: Option<String>,
}

/// Writes `chunks` (each followed by its pause) to `io` while reading everything mailgate
/// says, until mailgate closes the connection or `limit` passes; then what it said (the last
/// 64 KiB) and when it closed, if it did. A write failing because mailgate closed counts as
/// the close.
async fn feed(
    io: BoxedIo,
    chunks: impl Iterator<Item = (Vec<u8>, Duration)>,
    limit: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let (mut reader, mut writer) = tokio::io::split(io);
    let mut said = Vec::new();
    let read_all = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    said.extend_from_slice(&buffer[..n]);
                    let excess = said.len().saturating_sub(64 * 1024);
                    said.drain(..excess);
                }
            }
        }
    };
    let write_all = async {
        for (chunk, pause) in chunks {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
        std::future::pending::<()>().await;
    };
    let closed = tokio::time::timeout(limit, async {
        tokio::select! {
            () = read_all => {}
            () = write_all => {}
        }
    })
    .await
    .is_ok();
    (said, closed.then(|| started.elapsed()))
}

fn once(bytes: Vec<u8>) -> std::iter::Once<(Vec<u8>, Duration)> {
    std::iter::once((bytes, Duration::ZERO))
}

/// Repeats `attack` until `stop` is set, `rounds` times at least; the connection under way
/// when it is set runs to its end, so that every connection's close is checked.
async fn repeat<F, Fut>(stop: watch::Receiver<bool>, rounds: usize, mut attack: F) -> Vec<Shed>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Shed>,
{
    let mut sheds = Vec::new();
    loop {
        sheds.push(attack().await);
        if *stop.borrow() && sheds.len() >= rounds {
            return sheds;
        }
    }
}

/// Shorthand for a [`Shed`] from [`feed`]'s outcome.
fn shed(
    attack: &'static str,
    target: Target,
    closed_after: Option<Duration>,
    limit: Duration,
) -> Shed {
    Shed {
        attack,
        target: target.name,
        closed_after,
        limit,
        missing: None,
    }
}

/// An attack that could not even connect: a failure of the test, named as such.
fn unreachable(attack: &'static str, target: Target, error: &std::io::Error) -> Shed {
    Shed {
        missing: Some(format!("no connection: {error}")),
        ..shed(attack, target, None, Duration::ZERO)
    }
}

/// For attackers that only `pre_auth_lifetime` ends: then mailgate may spend
/// `GOODBYE_TIMEOUT` on a goodbye the attacker does not read.
fn lifetime_limit() -> Duration {
    PRE_AUTH_LIFETIME + GOODBYE_TIMEOUT + SLACK
}

/// Random bytes, a ClientHello on a plaintext port, plaintext commands on a TLS port, or
/// random text lines, to a random listener; then waits for mailgate to hang up.
async fn random_input(mut rng: Rng, targets: Targets, hello: Vec<u8>) -> Shed {
    let target = targets[rng.below(targets.len())];
    let bytes = match (rng.below(3), target.implicit) {
        (0, _) => {
            let n = 1 + rng.below(32 * 1024);
            rng.bytes(n)
        }
        (1, false) => {
            let tail = rng.below(512);
            [hello.clone(), rng.bytes(tail)].concat()
        }
        (1, true) => b"a1 LOGIN user pass\r\nEHLO plain.test\r\nGET / HTTP/1.1\r\n\r\n".to_vec(),
        _ => {
            let n = 1 + rng.below(4096);
            rng.bytes(n)
                .into_iter()
                .map(|b| match b % 16 {
                    0 => b'\n',
                    1 => b'\r',
                    _ => b' ' + b % 95,
                })
                .collect()
        }
    };
    let io = match tcp(target.address, None, None).await {
        Ok(io) => io,
        Err(error) => return unreachable("random bytes", target, &error),
    };
    let (_, closed) = feed(Box::new(io), once(bytes), lifetime_limit()).await;
    shed("random bytes", target, closed, lifetime_limit())
}

/// A line of [`LONG_LINE`] bytes without CRLF in 64 KiB chunks, then CRLF: mailgate must
/// refuse it once it ends, holding no more than its line limit meanwhile.
async fn megabyte_line(target: Target, tls: Arc<rustls::ClientConfig>) -> Shed {
    let (start, end, refusal) = match target.protocol {
        Protocol::Imap => ("a NOOP ", "\r\nb LOGOUT\r\n", "a BAD Command too long"),
        Protocol::Smtp => ("NOOP ", "\r\nQUIT\r\n", "500 5.5.2 Line too long"),
        Protocol::Pop3 => ("NOOP ", "\r\nQUIT\r\n", "-ERR Line too long"),
        Protocol::ManageSieve => (
            "NOOP ",
            "\r\nLOGOUT\r\n",
            "NO \"Command too long or malformed\"",
        ),
    };
    let io = match open(target, &tls, None, None).await {
        Ok(io) => io,
        Err(error) => return unreachable("megabyte line", target, &error),
    };
    let chunk = vec![b'x'; 64 * 1024];
    let middle = (0..LONG_LINE / chunk.len()).map(|_| (chunk.clone(), Duration::from_millis(4)));
    let chunks = std::iter::once((start.as_bytes().to_vec(), Duration::ZERO))
        .chain(middle)
        .chain(once(end.as_bytes().to_vec()));
    let (said, closed) = feed(io, chunks, lifetime_limit()).await;
    let said = String::from_utf8_lossy(&said);
    Shed {
        missing: (!said.contains(refusal)).then(|| format!("{refusal:?} in {said:?}")),
        ..shed("megabyte line", target, closed, lifetime_limit())
    }
}

/// An IMAP literal announced as 4 GiB, synchronizing (mailgate must refuse it at once) or not
/// (it cannot), or an SMTP BDAT chunk as large, followed by an endless stream of bytes until
/// `pre_auth_lifetime` ends the session.
async fn endless_literal(
    target: Target,
    tls: Arc<rustls::ClientConfig>,
    synchronizing: bool,
) -> Shed {
    let (announce, refusal) = match (target.protocol, synchronizing) {
        (Protocol::Imap, true) => ("a LOGIN {4294967295}\r\n", Some("a BAD Literal too large")),
        (Protocol::Imap, false) => ("a APPEND INBOX {4294967295+}\r\n", None),
        (Protocol::Smtp, _) => ("BDAT 4294967295 LAST\r\n", None),
        // RFC 5804 4: no continuation for either form, so the client sends at once and only
        // the end of the message (never, here) could bring the refusal.
        (Protocol::ManageSieve, true) => ("AUTHENTICATE \"PLAIN\" {4294967295}\r\n", None),
        (Protocol::ManageSieve, false) => ("PUTSCRIPT \"s\" {4294967295+}\r\n", None),
        // No literals in POP3: its long input is the megabyte line.
        (Protocol::Pop3, _) => unreachable!("POP3 has no literals"),
    };
    let attack = if synchronizing {
        "endless literal"
    } else {
        "endless non-synchronizing literal or BDAT"
    };
    let io = match open(target, &tls, None, None).await {
        Ok(io) => io,
        Err(error) => return unreachable(attack, target, &error),
    };
    let chunk = vec![b'y'; 16 * 1024];
    // About 1.6 MB/s, for the whole lifetime: 13 MB that mailgate must not keep.
    let stream = std::iter::repeat_with(move || (chunk.clone(), Duration::from_millis(10)));
    let chunks = once(announce.as_bytes().to_vec()).chain(stream);
    let (said, closed) = feed(io, chunks, lifetime_limit()).await;
    let said = String::from_utf8_lossy(&said);
    let missing = refusal
        .filter(|refusal| !said.contains(refusal))
        .map(|refusal| format!("{refusal:?} in {said:?}"));
    Shed {
        missing,
        ..shed(attack, target, closed, lifetime_limit())
    }
}

/// One byte a second: a command on a plaintext port (each byte keeps the idle timer from
/// firing, so only `pre_auth_lifetime` ends it), a ClientHello on a TLS port, a PROXY header
/// from the trusted balancer (both held to `pre_auth_timeout`).
async fn slowloris(target: Target, tls: Arc<rustls::ClientConfig>, balancer: bool) -> Shed {
    let (bytes, limit) = if balancer {
        (
            b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 143\r\n".to_vec(),
            PRE_AUTH_TIMEOUT + SLACK,
        )
    } else if target.implicit {
        (client_hello(&tls), PRE_AUTH_TIMEOUT + SLACK)
    } else {
        let command = idle_command(target.protocol);
        (command.repeat(10), lifetime_limit())
    };
    let attack = if balancer {
        "slow PROXY header"
    } else {
        "one byte a second"
    };
    let source = balancer.then_some(BALANCER);
    let io = match tcp(target.address, source, None).await {
        Ok(io) => io,
        Err(error) => return unreachable(attack, target, &error),
    };
    let drip = bytes.into_iter().map(|b| (vec![b], Duration::from_secs(1)));
    let (_, closed) = feed(Box::new(io), drip, limit).await;
    shed(attack, target, closed, limit)
}

/// A command each protocol answers before login without counting it as an error (POP3's
/// NOOP is one outside the TRANSACTION state, RFC 1939 5).
fn idle_command(protocol: Protocol) -> &'static [u8] {
    match protocol {
        Protocol::Imap => b"a NOOP\r\n",
        Protocol::Smtp | Protocol::ManageSieve => b"NOOP\r\n",
        Protocol::Pop3 => b"CAPA\r\n",
    }
}

/// Keeps commands waiting all the time (and reads every reply), so that mailgate never waits
/// for input: `pre_auth_lifetime` must end it all the same (it once did not: the deadline was
/// only on waiting reads). Its goodbye may not arrive: closing a connection with unread
/// commands resets it, and the reset discards what the client had not read yet.
async fn busy_talker(target: Target, tls: Arc<rustls::ClientConfig>) -> Shed {
    let command = idle_command(target.protocol);
    let io = match open(target, &tls, None, None).await {
        Ok(io) => io,
        Err(error) => return unreachable("busy talker", target, &error),
    };
    let burst = command.repeat(1024);
    let chunks = std::iter::repeat_with(move || (burst.clone(), Duration::ZERO));
    let (_, closed) = feed(io, chunks, lifetime_limit()).await;
    shed("busy talker", target, closed, lifetime_limit())
}

/// Pipelines commands that each produce a reply, through a tiny receive buffer, and never
/// reads: once the kernel's buffers are full mailgate's writes stall, and their deadline (or
/// the lifetime, whichever comes first) must free the slot.
async fn never_reads(target: Target, tls: Arc<rustls::ClientConfig>) -> Shed {
    let command: &[u8] = match target.protocol {
        Protocol::Imap => b"a CAPABILITY\r\n",
        Protocol::Smtp => b"EHLO never-reads.test\r\n",
        Protocol::Pop3 => b"CAPA\r\n",
        Protocol::ManageSieve => b"CAPABILITY\r\n",
    };
    let mut io = match open(target, &tls, None, Some(1024)).await {
        Ok(io) => io,
        Err(error) => return unreachable("never reads", target, &error),
    };
    let started = Instant::now();
    let burst = command.repeat(256);
    let mut closed = None;
    while started.elapsed() < lifetime_limit() {
        // A write that cannot finish just waits; one that fails means mailgate hung up.
        let write = tokio::time::timeout(Duration::from_millis(500), io.write_all(&burst));
        if let Ok(Err(_)) = write.await {
            closed = Some(started.elapsed());
            break;
        }
    }
    shed("never reads", target, closed, lifetime_limit())
}

/// The kinds of [`stalled_handshake`].
const STALLED_HANDSHAKES: usize = 11;

/// Handshakes abandoned halfway: half a ClientHello on a TLS port or after STARTTLS, half a
/// PROXY header from the trusted balancer, or a finished TLS handshake and then silence.
async fn stalled_handshake(kind: usize, targets: Targets, tls: Arc<rustls::ClientConfig>) -> Shed {
    let target = |name: &str| *targets.iter().find(|t| t.name == name).unwrap();
    let hello = client_hello(&tls);
    let half_hello = &hello[..hello.len() / 2];
    // The STARTTLS ones give the go-ahead time to arrive before half a ClientHello.
    let pause = Duration::from_millis(300);
    let limit = PRE_AUTH_TIMEOUT + pause + SLACK;
    let (target, source, dialogue): (Target, Option<[u8; 4]>, Vec<&[u8]>) = match kind {
        0 => (target("imaps"), None, vec![half_hello]),
        1 => (target("smtps"), None, vec![half_hello]),
        2 => (target("imap"), None, vec![b"a STARTTLS\r\n", half_hello]),
        3 => (
            target("smtp"),
            None,
            vec![b"EHLO stall.test\r\nSTARTTLS\r\n", half_hello],
        ),
        // PROXY v2: signature, version and command, family, 12 bytes announced, 2 sent.
        4 => (
            target("imap"),
            Some(BALANCER),
            vec![b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x7f\x00"],
        ),
        5 => (target("pop3s"), None, vec![half_hello]),
        6 => (target("sieves"), None, vec![half_hello]),
        7 => (target("pop3"), None, vec![b"STLS\r\n", half_hello]),
        8 => (target("sieve"), None, vec![b"STARTTLS\r\n", half_hello]),
        9 => (target("sieves"), None, vec![]),
        _ => (target("smtps"), None, vec![]),
    };
    let io = match tcp(target.address, source, None).await {
        Ok(io) => Box::new(io) as BoxedIo,
        Err(error) => return unreachable("stalled handshake", target, &error),
    };
    let io = if dialogue.is_empty() {
        match tls_over(&tls, io).await {
            Ok(io) => io,
            Err(error) => return unreachable("stalled handshake", target, &error),
        }
    } else {
        io
    };
    let chunks = dialogue.into_iter().map(|bytes| (bytes.to_vec(), pause));
    let (_, closed) = feed(io, chunks, limit).await;
    shed("stalled handshake", target, closed, limit)
}

/// Connects and closes at once, half of them with a reset; how many.
async fn flood(stop: watch::Receiver<bool>, targets: Targets) -> usize {
    let mut n = 0;
    while !*stop.borrow() {
        let target = targets[n % targets.len()];
        if let Ok(stream) = tcp(target.address, None, None).await
            && n % 2 == 0
        {
            let _ = stream.set_zero_linger();
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    n
}

/// Every attacker, each repeating its attack until told to stop.
struct Attackers {
    stop: watch::Receiver<bool>,
    attacks: JoinSet<Vec<Shed>>,
    floods: JoinSet<usize>,
}

impl Attackers {
    fn new(stop: watch::Receiver<bool>) -> Attackers {
        Attackers {
            stop,
            attacks: JoinSet::new(),
            floods: JoinSet::new(),
        }
    }

    fn spawn<F, Fut>(&mut self, attack: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Shed> + Send + 'static,
    {
        self.attacks.spawn(repeat(self.stop.clone(), 1, attack));
    }

    /// [`Attackers::spawn`] for `attack` on each of the listeners `names` in turns, each at
    /// least once.
    fn spawn_in_turns<F, Fut>(&mut self, s: &Setup, names: &[&str], mut attack: F)
    where
        F: FnMut(Target) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Shed> + Send + 'static,
    {
        let targets: Vec<Target> = names.iter().map(|name| s.target(name)).collect();
        let rounds = targets.len();
        let mut turn = 0;
        let in_turns = move || {
            turn += 1;
            attack(targets[turn % targets.len()])
        };
        self.attacks
            .spawn(repeat(self.stop.clone(), rounds, in_turns));
    }

    fn launch(&mut self, s: &Setup) {
        let hello = client_hello(&s.tls);
        for i in 0..4 {
            let (targets, hello) = (s.targets, hello.clone());
            let mut rng = Rng(SEED + i);
            self.spawn(move || random_input(Rng(rng.next()), targets, hello.clone()));
        }
        // Two attackers per attack, each taking four listeners in turns (for literals, the
        // listeners that have them): every listener gets every attack, and the load stays
        // below what the bounds above were measured with (two cores, four listeners, one
        // attacker each).
        const HALVES: [&[&str]; 2] = [
            &["imap", "imaps", "pop3", "pop3s"],
            &["smtp", "smtps", "sieve", "sieves"],
        ];
        for names in HALVES {
            let tls = s.tls.clone();
            self.spawn_in_turns(s, names, move |t| megabyte_line(t, tls.clone()));
            let tls = s.tls.clone();
            self.spawn_in_turns(s, names, move |t| never_reads(t, tls.clone()));
            let tls = s.tls.clone();
            self.spawn_in_turns(s, names, move |t| slowloris(t, tls.clone(), false));
        }
        const LITERALS: [&str; 4] = ["imap", "imaps", "sieve", "sieves"];
        for names in [&LITERALS[..], &["smtp", "smtps"]] {
            let tls = s.tls.clone();
            self.spawn_in_turns(s, names, move |t| endless_literal(t, tls.clone(), false));
        }
        let tls = s.tls.clone();
        self.spawn_in_turns(s, &LITERALS, move |t| endless_literal(t, tls.clone(), true));
        for names in [["imap", "pop3"], ["smtps", "sieves"]] {
            let tls = s.tls.clone();
            self.spawn_in_turns(s, &names, move |t| busy_talker(t, tls.clone()));
        }
        let (imap, tls) = (s.target("imap"), s.tls.clone());
        self.spawn(move || slowloris(imap, tls.clone(), true));
        for kind in 0..STALLED_HANDSHAKES {
            let (targets, tls) = (s.targets, s.tls.clone());
            self.spawn(move || stalled_handshake(kind, targets, tls.clone()));
        }
        for _ in 0..2 {
            self.floods.spawn(flood(self.stop.clone(), s.targets));
        }
    }

    /// Waits for every attacker to finish its last connection: how each connection ended, and
    /// how many connect-and-close rounds the floods made.
    async fn finish(mut self) -> (Vec<Shed>, usize) {
        let mut sheds = Vec::new();
        while let Some(joined) = self.attacks.join_next().await {
            sheds.extend(joined.unwrap());
        }
        let mut flooded = 0;
        while let Some(joined) = self.floods.join_next().await {
            flooded += joined.unwrap();
        }
        (sheds, flooded)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_sessions_succeed_while_mailgate_is_attacked() {
    with_timeout(Duration::from_secs(150), async {
        let s = Setup::start().await;
        let pid = s.mailgate.pid().unwrap();
        let idle_rss = rss_kib(pid);
        let (stop_tx, stop) = watch::channel(false);

        // Memory, sampled until the attackers are gone.
        let sampler = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut peak = 0;
                loop {
                    peak = peak.max(rss_kib(pid));
                    if *stop.borrow() {
                        return peak;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });

        let mut attackers = Attackers::new(stop.clone());
        attackers.launch(&s);

        // The good sessions, while all of that goes on.
        let attack_started = Instant::now();
        let good = good_sessions(s.targets, s.tls.clone()).await;
        let good_took = attack_started.elapsed();
        tokio::time::sleep(MIN_ATTACK.saturating_sub(attack_started.elapsed())).await;
        stop_tx.send_replace(true);

        let (sheds, flooded) = attackers.finish().await;
        let peak_rss = sampler.await.unwrap();
        let slowest = good.iter().map(|(_, took, _)| *took).max();
        let slowest_login = good
            .iter()
            .filter_map(|(_, _, login)| login.clone().ok())
            .max();
        eprintln!(
            "{GOOD_SESSIONS} good sessions took {good_took:?} (the slowest {slowest:?}, its \
             slowest login {slowest_login:?}) while \
             {} attacking connections and {flooded} connect-and-close rounds ran; RSS idle \
             {idle_rss} KiB, peak {peak_rss} KiB",
            sheds.len()
        );
        let mut summary = std::collections::BTreeMap::<_, (usize, Duration)>::new();
        for shed in &sheds {
            let entry = summary.entry((shed.attack, shed.target)).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(shed.closed_after.unwrap_or(Duration::MAX));
        }
        for ((attack, target), (connections, slowest)) in &summary {
            eprintln!("  {attack} on {target}: {connections}, the last closed after {slowest:?}");
        }
        for target in &s.targets {
            let slowest = good
                .iter()
                .filter(|(name, _, _)| *name == target.name)
                .filter_map(|(_, _, login)| login.clone().ok())
                .max();
            eprintln!("  the slowest good login on {}: {slowest:?}", target.name);
        }

        let failures: Vec<_> = good.iter().filter(|(_, _, r)| r.is_err()).collect();
        assert!(
            failures.is_empty(),
            "{} of {GOOD_SESSIONS} good sessions failed: {failures:#?}",
            failures.len()
        );
        let subjects: Vec<String> = (0..GOOD_SESSIONS)
            .filter(|n| s.targets[n % LISTENERS].protocol == Protocol::Smtp)
            .map(subject)
            .collect();
        let arrived = eventually(Duration::from_secs(20), || async {
            let messages = s.up.sink.messages();
            subjects
                .iter()
                .all(|subject| messages.iter().any(|m| m.data_str().contains(subject)))
        })
        .await;
        assert!(arrived, "not every mail reached the sink");

        let unshed: Vec<_> = sheds
            .iter()
            .filter(|shed| {
                shed.missing.is_some() || shed.closed_after.is_none_or(|after| after > shed.limit)
            })
            .collect();
        assert!(
            unshed.is_empty(),
            "attacks mailgate did not end in time, or not as expected: {unshed:#?}"
        );
        for attack in [
            "random bytes",
            "megabyte line",
            "endless literal",
            "endless non-synchronizing literal or BDAT",
            "one byte a second",
            "slow PROXY header",
            "never reads",
            "busy talker",
            "stalled handshake",
        ] {
            assert!(
                sheds.iter().any(|shed| shed.attack == attack),
                "no {attack} attack ran"
            );
        }
        // Every listener met the attacks every protocol has.
        for target in &s.targets {
            for attack in [
                "megabyte line",
                "never reads",
                "one byte a second",
                "stalled handshake",
            ] {
                assert!(
                    sheds
                        .iter()
                        .any(|shed| shed.attack == attack && shed.target == target.name),
                    "no {attack} attack on {}",
                    target.name
                );
            }
        }

        // The same process, still running and healthy, with every attacker's slot given back.
        assert_eq!(s.mailgate.pid(), Some(pid));
        assert!(is_running(pid), "mailgate is gone\n{}", s.mailgate.output());
        let health = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{}/healthz", s.admin),
        ])
        .await;
        assert_eq!(health.stdout, "200", "{health:?}");
        let drained = eventually(Duration::from_secs(10), || async {
            let metrics = s.metrics().await;
            s.targets.iter().all(|t| {
                metrics.contains(&format!(
                    "mailgate_connections_active{{listener=\"{}\"}} 0\n",
                    t.name
                ))
            })
        })
        .await;
        assert!(drained, "connections still open:\n{}", s.metrics().await);
        assert!(
            peak_rss < RSS_BOUND_KIB,
            "peak RSS {peak_rss} KiB over the bound of {RSS_BOUND_KIB} KiB"
        );
    })
    .await;
}
