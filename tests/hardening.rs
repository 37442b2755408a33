//! Attacks on a running mailgate and the limits that hold against them: parallel password
//! guessing, connection bursts, clients that never read, black-hole upstreams, a stop in the
//! middle of a transfer, and sessions that never logged in when mailgate shuts down.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use argon2::PasswordHasher as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use support::imap_client::{Completion, ImapClient};
use support::process::{rss_kib, send_signal};
use support::{Mailgate, TEST_TIMEOUT, TestUpstream, curl, eventually, free_port, with_timeout};

const ACCOUNT: &str = "acct1";
const USER: &str = "alice@example.test";
const RIGHT: &str = "correct horse";
/// How long an effect of a close may take to show.
const WAIT: Duration = Duration::from_secs(10);

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An argon2id hash with the crate's default (production) parameters: 19 MiB, 2 passes.
fn production_hash(password: &str) -> String {
    let salt = argon2::password_hash::SaltString::from_b64("bWFpbGdhdGUtdGVzdC1zYWx0").unwrap();
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

async fn metrics(admin: u16) -> String {
    curl(&[&format!("http://127.0.0.1:{admin}/metrics")])
        .await
        .stdout
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_password_guessing_is_bounded_and_does_not_lock_others_out() {
    with_timeout(Duration::from_secs(120), async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let config = format!(
            "{}admin: {{ listen: \"127.0.0.1:{admin}\" }}\nclient_auth:\n  mode: static\n  hash_workers: 2\n  throttle: {{ max_failure_delay: 2s }}\n  accounts:\n    {ACCOUNT}: \"{}\"\n",
            up.mailgate_config(imap, smtp),
            production_hash(RIGHT),
        );
        let mailgate = Mailgate::start(&config).await;
        let pid = mailgate.pid().unwrap();
        let idle_rss = rss_kib(pid);

        // Fifty connections from one address, three wrong passwords each, all at once.
        let guesses: Vec<_> = (0..50)
            .map(|n| {
                tokio::spawn(async move {
                    let mut client = ImapClient::connect(localhost(imap)).await;
                    let mut answers = Vec::new();
                    for attempt in 0..3 {
                        answers.push(client.login(ACCOUNT, &format!("guess-{n}-{attempt}")).await);
                    }
                    answers
                })
            })
            .collect();
        let mut peak_rss = 0;
        while !guesses.iter().all(|guess| guess.is_finished()) {
            peak_rss = peak_rss.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for guess in guesses {
            for answer in guess.await.unwrap() {
                assert!(answer.tagged.contains(" NO "), "{answer:?}");
            }
        }
        // At most two checks ran at once, each in its worker's memory: about 2 x 19 MiB.
        assert!(
            peak_rss < idle_rss + 100 * 1024,
            "RSS went from {idle_rss} KiB to {peak_rss} KiB"
        );
        let text = metrics(admin).await;
        assert_eq!(
            metric(&text, "mailgate_login_blocks_total{scope=\"address\"}"),
            1.0,
            "{text}"
        );
        let checked = metric(&text, "mailgate_password_checks_total{result=\"wrong_password\"}");
        assert!(checked <= 12.0, "a blocked address still got {checked} checks");

        // Someone else, from another address, logs in with the right password meanwhile.
        let other = IpAddr::from([127, 0, 0, 2]);
        let mut client = ImapClient::connect_from(localhost(imap), other).await;
        let login = client.login(ACCOUNT, RIGHT).await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
        // The blocked address is refused without a check, as a temporary failure.
        let mut blocked = ImapClient::connect(localhost(imap)).await;
        let refused = blocked.login(ACCOUNT, RIGHT).await;
        assert!(
            refused.tagged.contains("NO [UNAVAILABLE] Too many failed logins"),
            "{refused:?}"
        );
        // Once the guessing is over, the workers give their memory back.
        let released = eventually(Duration::from_secs(60), || async {
            rss_kib(pid) < idle_rss + ARGON2_KIB / 2
        })
        .await;
        assert!(
            released,
            "RSS stayed at {} KiB (idle {idle_rss} KiB, peak {peak_rss} KiB)",
            rss_kib(pid)
        );
    })
    .await;
}

/// Memory of one argon2 check with the production parameters (m=19456 KiB).
const ARGON2_KIB: u64 = 19 * 1024;

/// Ten logins one after another with eight workers: each goes to the worker used last, so
/// one argon2 buffer is in use, not one per worker; and an idle worker frees its buffer, so
/// the resident size falls back to where it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_hash_workers_give_their_memory_back() {
    with_timeout(Duration::from_secs(120), async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp) = (free_port(), free_port());
        let config = format!(
            "{}client_auth:\n  mode: static\n  hash_workers: 8\n  accounts:\n    {ACCOUNT}: \"{}\"\n",
            up.mailgate_config(imap, smtp),
            production_hash(RIGHT),
        );
        let mailgate = Mailgate::start(&config).await;
        let pid = mailgate.pid().unwrap();
        let idle_rss = rss_kib(pid);
        let mut peak_rss = 0;
        for _ in 0..10 {
            let mut client = ImapClient::connect(localhost(imap)).await;
            let login = client.login(ACCOUNT, RIGHT).await;
            assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
            drop(client);
            peak_rss = peak_rss.max(rss_kib(pid));
        }
        assert!(
            peak_rss < idle_rss + 3 * ARGON2_KIB,
            "ten sequential logins took RSS from {idle_rss} KiB to {peak_rss} KiB"
        );
        let released = eventually(Duration::from_secs(60), || async {
            rss_kib(pid) < idle_rss + ARGON2_KIB / 2
        })
        .await;
        assert!(
            released,
            "RSS stayed at {} KiB (idle {idle_rss} KiB, peak {peak_rss} KiB)",
            rss_kib(pid)
        );
    })
    .await;
}

/// Connects to `address` and reads mailgate's first line; keeps the connection open.
async fn greeted(address: SocketAddr) -> Option<(String, BufReader<TcpStream>)> {
    let stream = TcpStream::connect(address).await.ok()?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut first))
        .await
        .ok()?
        .ok()?;
    Some((first, reader))
}

/// `count` connections at once to `address`, each with its first line.
async fn burst(address: SocketAddr, count: usize) -> Vec<Option<(String, BufReader<TcpStream>)>> {
    let connections: Vec<_> = (0..count).map(|_| tokio::spawn(greeted(address))).collect();
    // Every connection stays open until all have their first line.
    let mut open = Vec::new();
    for connection in connections {
        open.push(connection.await.unwrap());
    }
    open
}

/// Whether `reader` is told to leave (`* BYE [UNAVAILABLE] Too many connections`) within
/// `wait`, its first line `first` included.
async fn told_to_leave(first: &str, reader: &mut BufReader<TcpStream>, wait: Duration) -> bool {
    let bye = "* BYE [UNAVAILABLE] Too many connections";
    if first.starts_with(bye) {
        return true;
    }
    let mut next = String::new();
    let read = tokio::time::timeout(wait, reader.read_line(&mut next)).await;
    matches!(read, Ok(Ok(_))) && next.starts_with(bye)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_burst_never_gets_past_max_connections() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let (imap, smtp) = (free_port(), free_port());
        let config = up.mailgate_config(imap, smtp).replace(
            "    protocol: imap\n",
            "    protocol: imap\n    max_connections: 50\n",
        );
        let mailgate = Mailgate::start(&config).await;
        let open = burst(localhost(imap), 400).await;
        assert!(open.iter().all(Option::is_some), "{}", mailgate.output());
        // Each connection past 50 took the place of the oldest one not logged in: 50 stay.
        let verdicts: Vec<_> = open
            .into_iter()
            .flatten()
            .map(|(first, mut reader)| {
                tokio::spawn(async move {
                    told_to_leave(&first, &mut reader, Duration::from_secs(5)).await
                })
            })
            .collect();
        let mut left = 0;
        for verdict in verdicts {
            left += usize::from(verdict.await.unwrap());
        }
        assert_eq!(400 - left, 50, "{}", mailgate.output());
    })
    .await;
}

/// A full listener admits a new client by closing its oldest connection that has not logged
/// in, which is told why (as Dovecot's login processes do); a logged-in session is never the
/// one. Before, the newcomer was refused, and idle connections could hold every slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_evicts_its_oldest_connection_before_login_never_a_logged_in_one() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let config = format!(
            "{}admin: {{ listen: \"127.0.0.1:{admin}\" }}\n",
            up.mailgate_config(imap, smtp).replace(
                "    protocol: imap\n",
                "    protocol: imap\n    max_connections: 3\n",
            )
        );
        let mailgate = Mailgate::start(&config).await;
        let active = r#"mailgate_connections_active{listener="imap"}"#;
        // The start-up check's connection is gone.
        assert!(
            eventually(WAIT, || async {
                metric(&metrics(admin).await, active) == 0.0
            })
            .await
        );
        let mut logged_in = ImapClient::connect(localhost(imap)).await;
        assert!(logged_in.login(ACCOUNT, RIGHT).await.is_ok());
        let (_, mut oldest) = greeted(localhost(imap)).await.unwrap();
        let (_, mut older) = greeted(localhost(imap)).await.unwrap();

        let (first, _newcomer) = greeted(localhost(imap)).await.unwrap();
        assert!(first.starts_with("* OK"), "newcomer refused: {first}");
        assert!(
            told_to_leave("", &mut oldest, WAIT).await,
            "{}",
            mailgate.output()
        );
        let mut rest = String::new();
        assert_eq!(
            oldest.read_line(&mut rest).await.unwrap(),
            0,
            "closed after it"
        );
        older.get_mut().write_all(b"a NOOP\r\n").await.unwrap();
        let mut reply = String::new();
        older.read_line(&mut reply).await.unwrap();
        assert!(reply.starts_with("a OK"), "{reply}");
        // The next newcomer takes the older one's place, never the logged-in session's.
        let (first, _second) = greeted(localhost(imap)).await.unwrap();
        assert!(first.starts_with("* OK"), "{first}");
        assert!(told_to_leave("", &mut older, WAIT).await);
        assert!(logged_in.command("NOOP").await.is_ok());
        let series = r#"mailgate_connections_evicted_total{listener="imap"}"#;
        assert_eq!(metric(&metrics(admin).await, series), 2.0);
    })
    .await;
}

/// A sidecar's app is the one client of a loopback listener: the per-client limit meant for
/// strangers on a network (500) does not cap it there (it refused half of 1,000 connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_listener_takes_more_than_500_connections_from_its_one_client() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let (imap, smtp) = (free_port(), free_port());
        let mailgate = Mailgate::start(&up.mailgate_config(imap, smtp)).await;
        let open = burst(localhost(imap), 600).await;
        let refused: Vec<_> = open
            .iter()
            .filter_map(|connection| connection.as_ref().map(|(first, _)| first))
            .filter(|first| !first.starts_with("* OK"))
            .collect();
        let lost = open
            .iter()
            .filter(|connection| connection.is_none())
            .count();
        assert!(
            refused.is_empty() && lost == 0,
            "{lost} lost, {} refused: {:?}\n{}",
            refused.len(),
            refused.first(),
            mailgate.output()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_lose_their_slots() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let (imap, smtp) = (free_port(), free_port());
        let config = up.mailgate_config(imap, smtp).replace(
            "    protocol: imap\n",
            "    protocol: imap\n    max_connections: 5\n    pre_auth_timeout: 2s\n",
        );
        let mailgate = Mailgate::start(&config).await;
        // Five clients with tiny receive buffers pipeline commands and never read a reply.
        let mut stuck = Vec::new();
        for _ in 0..5 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(1024).unwrap();
            let mut stream = socket.connect(localhost(imap)).await.unwrap();
            stuck.push(tokio::spawn(async move {
                let commands = "a CAPABILITY\r\n".repeat(1000);
                for _ in 0..100 {
                    let write = stream.write_all(commands.as_bytes());
                    if !matches!(
                        tokio::time::timeout(Duration::from_secs(1), write).await,
                        Ok(Ok(()))
                    ) {
                        break;
                    }
                }
                // Hold the socket open, unread, for the rest of the test.
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(stream);
            }));
        }
        // Soon the listener is full; within a few write deadlines a slot is free again.
        let greeted = eventually(Duration::from_secs(20), || async {
            let Ok(stream) = TcpStream::connect(localhost(imap)).await else {
                return false;
            };
            let mut first = String::new();
            let mut reader = BufReader::new(stream);
            let _ =
                tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut first)).await;
            first.starts_with("* OK")
        })
        .await;
        assert!(
            greeted,
            "the stuck clients kept every slot\n{}",
            mailgate.output()
        );
        for task in stuck {
            task.abort();
        }
    })
    .await;
}

/// A TCP server that accepts connections and never says a word.
async fn black_hole() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (port, task)
}

async fn smtp_line(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .expect("a reply within 10 s")
        .unwrap();
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_upstream_holds_up_neither_ehlo_nor_a_login_for_long() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (hole, _task) = black_hole().await;
        let smtp = free_port();
        let config = format!(
            r#"listeners:
  - name: smtp
    protocol: smtp
    listen: "127.0.0.1:{smtp}"
    login_timeout: 2s
    upstream: {{ host: 127.0.0.1, port: {hole}, tls: none }}
tokens:
  auth_server: {{ url: "{}" }}
"#,
            up.auth.url()
        );
        let _mailgate = Mailgate::start(&config).await;
        let mut sessions = Vec::new();
        for _ in 0..2 {
            let mut reader = BufReader::new(TcpStream::connect(localhost(smtp)).await.unwrap());
            assert!(smtp_line(&mut reader).await.starts_with("220 "));
            reader
                .get_mut()
                .write_all(b"EHLO client.test\r\n")
                .await
                .unwrap();
            sessions.push(reader);
        }
        // Both answered at once with what mailgate can vouch for itself.
        for reader in &mut sessions {
            let mut lines = Vec::new();
            loop {
                let line = smtp_line(reader).await;
                let last = line.starts_with("250 ");
                lines.push(line);
                if last {
                    break;
                }
            }
            assert!(lines.iter().any(|l| l.contains("PIPELINING")), "{lines:?}");
            assert_eq!(lines.last().unwrap(), "250 AUTH PLAIN LOGIN\r\n");
        }
        // The login gives up after login_timeout, not after every read's own timeout.
        let reader = &mut sessions[0];
        reader
            .get_mut()
            .write_all(b"AUTH PLAIN AGFjY3QxAHB3\r\n")
            .await
            .unwrap();
        assert_eq!(
            smtp_line(reader).await,
            "454 4.7.0 Temporary authentication failure\r\n"
        );
    })
    .await;
}

/// The IMAP config with an admin endpoint and `shutdown_grace: 1s`.
fn draining_config(up: &TestUpstream, imap: u16, smtp: u16, admin: u16) -> String {
    format!(
        "{}admin: {{ listen: \"127.0.0.1:{admin}\" }}\ndrain_delay: 0s\nshutdown_grace: 1s\n",
        up.mailgate_config(imap, smtp)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_never_logged_in_are_told_goodbye_when_the_grace_ends() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let mut mailgate = Mailgate::start(&draining_config(&up, imap, smtp, admin)).await;
        let mut client = ImapClient::connect(localhost(imap)).await;
        let mut submission = BufReader::new(TcpStream::connect(localhost(smtp)).await.unwrap());
        assert!(smtp_line(&mut submission).await.starts_with("220 "));
        send_signal(mailgate.pid().unwrap(), "TERM");
        assert_eq!(client.line().await, "* BYE Server shutting down\r\n");
        assert!(
            smtp_line(&mut submission)
                .await
                .starts_with("421 4.3.2 mailgate Service shutting down")
        );
        assert_eq!(mailgate.wait_exit(Duration::from_secs(10)).await, Some(0));
        let output = mailgate.output();
        assert!(
            output.contains("not ready") && output.contains("draining for shutdown"),
            "{output}"
        );
        assert!(output.contains("admin endpoint listening"), "{output}");
        assert!(
            !output.contains('\u{1b}'),
            "colour codes in a log file:\n{output}"
        );
    })
    .await;
}

/// Appends a message of `size` bytes through mailgate, then FETCHes it with a client whose
/// receive buffer holds `receive_buffer` bytes and who reads nothing until mailgate stopped.
/// Returns everything the client then finds, and the message size as announced.
async fn stopped_mid_fetch(size: usize, receive_buffer: u32) -> Vec<u8> {
    let up = TestUpstream::start().await;
    up.auth.grant(ACCOUNT, USER);
    let (imap, smtp, admin) = (free_port(), free_port(), free_port());
    let mut mailgate = Mailgate::start(&draining_config(&up, imap, smtp, admin)).await;
    let mut writer = ImapClient::connect(localhost(imap)).await;
    assert!(writer.login(ACCOUNT, "pw").await.is_ok());
    let body = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(size));
    writer
        .send_raw(format!("a APPEND INBOX {{{}+}}\r\n", body.len()).as_bytes())
        .await;
    writer.send_raw(body.as_bytes()).await;
    writer.send_raw(b"\r\n").await;
    assert!(writer.until_tagged("a").await.is_ok());
    drop(writer);

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(receive_buffer).unwrap();
    let mut stream = socket.connect(localhost(imap)).await.unwrap();
    let login = b"a LOGIN acct1 pw\r\nb SELECT INBOX\r\nc FETCH 1 BODY[]\r\n";
    stream.write_all(login).await.unwrap();
    // Let the FETCH get under way, then stop mailgate while nobody reads.
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_signal(mailgate.pid().unwrap(), "TERM");
    assert_eq!(mailgate.wait_exit(Duration::from_secs(15)).await, Some(0));
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received))
        .await
        .expect("mailgate closed the connection")
        .unwrap();
    received
}

/// Where the FETCH literal ends in `received`, if its announcement arrived.
fn literal_end(received: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(received);
    let fetch = text.find("BODY[] {")?;
    let open = fetch + "BODY[] {".len();
    let close = open + text[open..].find('}')?;
    let size: usize = text[open..close].parse().ok()?;
    Some(close + "}\r\n".len() + size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_never_puts_a_goodbye_inside_a_response() {
    with_timeout(Duration::from_secs(120), async {
        // The whole response fits the client's buffers: it is delivered, then the goodbye.
        let received = stopped_mid_fetch(64 * 1024, 1024 * 1024).await;
        let text = String::from_utf8_lossy(&received);
        let bye = text.find("* BYE Server shutting down").expect("a goodbye");
        let end = literal_end(&received).unwrap_or_else(|| {
            panic!(
                "no FETCH response in {:?}",
                String::from_utf8_lossy(&received[..received.len().min(2000)])
            )
        });
        assert!(
            bye > end,
            "goodbye at {bye}, inside the literal ending at {end}"
        );
        assert!(
            text.contains("c OK"),
            "the FETCH completed before the goodbye"
        );

        // A large response to a client that does not read: cut off, with no goodbye inside.
        let received = stopped_mid_fetch(16 * 1024 * 1024, 16 * 1024).await;
        let text = String::from_utf8_lossy(&received);
        let end = literal_end(&received).expect("the FETCH response began");
        assert!(received.len() < end, "the whole literal arrived after all");
        assert!(!text.contains("* BYE"), "a goodbye inside a literal");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_own_smtp_completion_reaches_the_client() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp) = (free_port(), free_port());
        let _mailgate = Mailgate::start(&up.mailgate_config(imap, smtp)).await;
        let mut reader = BufReader::new(TcpStream::connect(localhost(smtp)).await.unwrap());
        assert!(smtp_line(&mut reader).await.starts_with("220 "));
        reader
            .get_mut()
            .write_all(b"EHLO client.test\r\nAUTH PLAIN AGFjY3QxAHB3\r\n")
            .await
            .unwrap();
        let mut line = smtp_line(&mut reader).await;
        while line.starts_with("250") {
            line = smtp_line(&mut reader).await;
        }
        // Dovecot's words, not mailgate's.
        assert_eq!(line, "235 2.7.0 Logged in.\r\n");
    })
    .await;
}

/// An argon2id hash cheap enough for tests that log in dozens of times.
fn quick_hash(password: &str) -> String {
    let params = argon2::Params::new(64, 1, 1, None).unwrap();
    let salt = argon2::password_hash::SaltString::from_b64("bWFpbGdhdGUtdGVzdC1zYWx0").unwrap();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// mailgate in `static` mode with `accounts` (account, mailbox, password), each granted
/// its mailbox at the real Dovecot, and `throttle` as the throttle's flow mapping. Returns
/// it and its IMAP port.
async fn static_mailgate(
    up: &TestUpstream,
    accounts: &[(&str, &str, &str)],
    throttle: &str,
) -> (Mailgate, u16) {
    let (imap, smtp) = (free_port(), free_port());
    let mut config = format!(
        "{}client_auth:\n  mode: static\n  throttle: {throttle}\n  accounts:\n",
        up.mailgate_config(imap, smtp)
    );
    for (account, mailbox, password) in accounts {
        up.auth.grant(account, mailbox);
        config.push_str(&format!("    {account}: \"{}\"\n", quick_hash(password)));
    }
    (Mailgate::start(&config).await, imap)
}

/// One IMAP login on a new connection from 127.0.0.`host`.
async fn login_from(imap: u16, host: u8, account: &str, password: &str) -> Completion {
    let from = IpAddr::from([127, 0, 0, host]);
    let mut client = ImapClient::connect_from(localhost(imap), from).await;
    client.login(account, password).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_from_three_addresses_do_not_lock_the_owner_out() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let throttle = "{ failure_delay: 10ms, max_failure_delay: 50ms }";
        let (mailgate, imap) = static_mailgate(&up, &[(ACCOUNT, USER, RIGHT)], throttle).await;
        for stranger in 2..=4 {
            for guess in 0..10 {
                let password = format!("guess-{stranger}-{guess}");
                let refused = login_from(imap, stranger, ACCOUNT, &password).await;
                assert!(refused.tagged.contains(" NO "), "{refused:?}");
            }
        }
        // The owner, from an address mailgate never saw, logs in through to Dovecot.
        let owner = login_from(imap, 5, ACCOUNT, RIGHT).await;
        assert!(owner.is_ok(), "{owner:?}\n{}", mailgate.output());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_password_retried_behind_a_nat_blocks_nobody_else() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let accounts = [
            (ACCOUNT, USER, RIGHT),
            ("acct2", "bob@example.test", "bob's new password"),
        ];
        let throttle = "{ failure_delay: 10ms, max_failure_delay: 50ms }";
        let (mailgate, imap) = static_mailgate(&up, &accounts, throttle).await;
        // Bob's phone behind the office NAT (127.0.0.2) retries his old password.
        for _ in 0..15 {
            let retry = login_from(imap, 2, "acct2", "bob's old password").await;
            assert!(retry.tagged.contains(" NO "), "{retry:?}");
        }
        // Alice, behind the same NAT, is not blocked by it.
        let colleague = login_from(imap, 2, ACCOUNT, RIGHT).await;
        assert!(colleague.is_ok(), "{colleague:?}\n{}", mailgate.output());
        // Bob tries ten other passwords: now the address is blocked, for all but Alice,
        // who logged in from it.
        for variant in 0..10 {
            let guess = login_from(imap, 2, "acct2", &format!("bob's guess {variant}")).await;
            assert!(guess.tagged.contains(" NO "), "{guess:?}");
        }
        let bob = login_from(imap, 2, "acct2", "bob's new password").await;
        assert!(bob.tagged.contains("NO [UNAVAILABLE]"), "{bob:?}");
        let colleague = login_from(imap, 2, ACCOUNT, RIGHT).await;
        assert!(colleague.is_ok(), "{colleague:?}\n{}", mailgate.output());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_for_recent_failures_comes_before_the_check_on_a_new_connection() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let throttle = "{ failure_delay: 3s, max_failure_delay: 3s }";
        let (mailgate, imap) = static_mailgate(&up, &[(ACCOUNT, USER, RIGHT)], throttle).await;
        let refused = login_from(imap, 6, ACCOUNT, "a guess").await;
        assert!(refused.tagged.contains(" NO "), "{refused:?}");
        // Hanging up and calling again does not skip the wait: it comes before the check.
        let started = tokio::time::Instant::now();
        let again = login_from(imap, 6, ACCOUNT, RIGHT).await;
        let waited = started.elapsed();
        assert!(again.is_ok(), "{again:?}\n{}", mailgate.output());
        assert!(
            waited >= Duration::from_millis(2500),
            "answered after {waited:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_timeout_bounds_a_password_check_that_never_answers() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (hole, _task) = black_hole().await;
        let (imap, smtp) = (free_port(), free_port());
        let config = format!(
            "{}client_auth:\n  mode: auth_server\n  auth_server: {{ url: \"http://127.0.0.1:{hole}/check\", timeout: 25s }}\n",
            up.mailgate_config(imap, smtp)
                .replace("    upstream:\n", "    login_timeout: 2s\n    upstream:\n")
        );
        let mailgate = Mailgate::start(&config).await;
        let started = tokio::time::Instant::now();
        let mut client = ImapClient::connect(localhost(imap)).await;
        let login = client.login(ACCOUNT, RIGHT).await;
        let waited = started.elapsed();
        assert!(login.tagged.contains("NO [UNAVAILABLE]"), "{login:?}");
        // login_timeout (2 s) ended it, not the auth server's own timeout (25 s).
        assert!(waited < Duration::from_secs(15), "answered after {waited:?}");
        drop(mailgate);
    })
    .await;
}

/// Connects to the admin endpoint from `source`, sends a POST's headers, then one byte of its
/// body a second; returns the status line it was answered with (empty: closed unanswered).
async fn slow_body(admin: u16, source: [u8; 4], sent: tokio::sync::mpsc::Sender<()>) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.into(), 0)).unwrap();
    let mut stream = socket.connect(localhost(admin)).await.unwrap();
    let head = "POST /token HTTP/1.1\r\nHost: admin\r\nContent-Length: 1000\r\n\r\n";
    let written = stream.write_all(head.as_bytes()).await;
    let _ = sent.send(()).await;
    if written.is_err() {
        return String::new();
    }
    let mut answer = [0u8; 64];
    loop {
        tokio::select! {
            read = stream.read(&mut answer) => {
                let n = read.unwrap_or(0);
                let text = String::from_utf8_lossy(&answer[..n]);
                return text.lines().next().unwrap_or_default().to_owned();
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if stream.write_all(b"x").await.is_err() {
                    return String::new();
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_answered_while_slow_clients_hold_the_admin_endpoint() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let config = format!(
            "{}admin: {{ listen: \"127.0.0.1:{admin}\" }}\n",
            up.mailgate_config(imap, smtp)
        );
        let mailgate = Mailgate::start(&config).await;

        // Eighty clients from five addresses send a body one byte a second.
        let (sent, mut all_sent) = tokio::sync::mpsc::channel(100);
        let holders: Vec<_> = (0..80u8)
            .map(|n| tokio::spawn(slow_body(admin, [127, 0, 0, 2 + n % 5], sent.clone())))
            .collect();
        for _ in 0..80 {
            all_sent.recv().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        // The liveness probe still gets its answers, one connection each.
        mailgate::tls::install_crypto_provider();
        let probe = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut answered = 0;
        for _ in 0..20 {
            let status = probe
                .get(format!("http://127.0.0.1:{admin}/healthz"))
                .send()
                .await
                .map(|response| response.status().as_u16());
            if status.as_ref().is_ok_and(|status| *status == 200) {
                answered += 1;
            }
        }
        assert_eq!(answered, 20, "{}", mailgate.output());

        // The body deadline ends the slow requests (408); those beyond the shared connections
        // were told the endpoint serves probes only (503), or closed at once.
        let mut timed_out = 0;
        for holder in holders {
            let status = holder.await.unwrap();
            assert!(
                status.is_empty() || status.contains(" 408 ") || status.contains(" 503 "),
                "{status}"
            );
            timed_out += usize::from(status.contains(" 408 "));
        }
        assert!(timed_out >= 60, "{timed_out} answered 408");
        let text = metrics(admin).await;
        assert!(
            metric(
                &text,
                "mailgate_admin_connections_limited_total{reason=\"probes_only\"}"
            ) >= 16.0,
            "{text}"
        );
        assert!(
            mailgate
                .output()
                .contains("admin endpoint connection limit reached"),
            "{}",
            mailgate.output()
        );
    })
    .await;
}

/// A client that pipelines commands through a small receive window and reads nothing yet:
/// mailgate's replies wait in its send queue, the last error ends the session, and input the
/// client sent after it is still unread. Closing at once would reset the connection and throw
/// away the queued replies, goodbye included (the client got 1 KiB, then a reset); a lingering
/// close lets everything arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_unread_input_still_reads_the_whole_goodbye() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let (imap, smtp) = (free_port(), free_port());
        let mailgate = Mailgate::start(&up.mailgate_config(imap, smtp)).await;
        let cases = [
            (
                imap,
                "a NOOP\r\n",
                "a BOGUS\r\n",
                "* BYE Too many invalid commands",
            ),
            (smtp, "NOOP\r\n", "BOGUS\r\n", "421 4.7.0"),
        ];
        for (port, filler, error, goodbye) in cases {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(1024).unwrap();
            let stream = socket.connect(localhost(port)).await.unwrap();
            let (mut reader, mut writer) = stream.into_split();
            let input = [filler.repeat(300), error.repeat(10), "x".repeat(64 * 1024)].concat();
            let sender = tokio::spawn(async move {
                let _ = writer.write_all(input.as_bytes()).await;
                writer
            });
            // mailgate answers and closes meanwhile; only then does the client read.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut said = Vec::new();
            let read = reader.read_to_end(&mut said).await;
            let said = String::from_utf8_lossy(&said);
            let last = said.lines().last().unwrap_or_default();
            assert!(
                read.is_ok() && last.starts_with(goodbye) && said.ends_with("\r\n"),
                "{read:?} after {} bytes ending {last:?}\n{}",
                said.len(),
                mailgate.output()
            );
            drop(sender.await.unwrap());
        }
    })
    .await;
}

/// How many descriptors process `pid` has open.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Each refused connection lingered for up to 2 s whatever their number: one address at its
/// limit held its connect rate times 2 s of descriptors (every one of a flood here). Lingering
/// is capped process-wide; past the cap a refusal closes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_connections_lingers_on_no_more_than_the_cap() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp) = (free_port(), free_port());
        let config = up.mailgate_config(imap, smtp).replace(
            "    protocol: imap\n",
            "    protocol: imap\n    max_connections: 1\n",
        );
        let mailgate = Mailgate::start(&config).await;
        let pid = mailgate.pid().unwrap();
        // The one slot is logged in, so every newcomer is refused.
        let mut logged_in = ImapClient::connect(localhost(imap)).await;
        assert!(logged_in.login(ACCOUNT, RIGHT).await.is_ok());
        let before = descriptors(pid);
        // Refused clients that read their goodbye but never close: each refusal lingers, and
        // with every goodbye read none is still on its way to lingering.
        let flood = burst(localhost(imap), 3 * mailgate::io::MAX_LINGERING).await;
        let during = descriptors(pid);
        let refused = flood
            .iter()
            .flatten()
            .filter(|(first, _)| first.starts_with("* BYE [UNAVAILABLE] Too many connections"))
            .count();
        assert_eq!(refused, flood.len(), "{}", mailgate.output());
        let bound = before + mailgate::io::MAX_LINGERING + 32;
        assert!(
            during <= bound,
            "{during} descriptors open during the flood, {before} before"
        );
        drop(flood);
        assert!(logged_in.command("NOOP").await.is_ok());
    })
    .await;
}

/// A full listener evicted its oldest connection before login even while that one's password
/// check was under way: whoever reconnected in a loop cut everyone's logins off in turn. Now
/// an idle newer connection goes instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_under_way_is_not_evicted_for_a_newcomer() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        // An auth server that takes the check and never answers; says when it has it.
        let checks = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hole = checks.local_addr().unwrap().port();
        let (taken, mut checking) = tokio::sync::mpsc::unbounded_channel();
        let _auth = tokio::spawn(async move {
            while let Ok((stream, _)) = checks.accept().await {
                let _ = taken.send(stream);
            }
        });
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let config = format!(
            "{}client_auth:\n  mode: auth_server\n  auth_server: {{ url: \"http://127.0.0.1:{hole}/check\", timeout: 25s }}\nadmin: {{ listen: \"127.0.0.1:{admin}\" }}\n",
            up.mailgate_config(imap, smtp).replace(
                "    protocol: imap\n",
                "    protocol: imap\n    max_connections: 2\n    login_timeout: 20s\n",
            )
        );
        let mailgate = Mailgate::start(&config).await;
        let active = r#"mailgate_connections_active{listener="imap"}"#;
        assert!(
            eventually(WAIT, || async {
                metric(&metrics(admin).await, active) == 0.0
            })
            .await
        );
        let (_, mut logging_in) = greeted(localhost(imap)).await.unwrap();
        let login = format!("a LOGIN {ACCOUNT} \"{RIGHT}\"\r\n");
        logging_in.get_mut().write_all(login.as_bytes()).await.unwrap();
        let _check = checking.recv().await.unwrap();
        let (_, mut idle) = greeted(localhost(imap)).await.unwrap();

        let (first, _newcomer) = greeted(localhost(imap)).await.unwrap();
        assert!(first.starts_with("* OK"), "newcomer refused: {first}");
        assert!(
            told_to_leave("", &mut idle, WAIT).await,
            "{}",
            mailgate.output()
        );
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(1), logging_in.read_line(&mut line));
        assert!(read.await.is_err(), "the login under way was told {line:?}");
    })
    .await;
}
