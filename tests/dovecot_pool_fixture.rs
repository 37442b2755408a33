//! Proves the Dovecot fixture a backend pool needs (issue 16), without mailgate: three
//! instances at once, each logging only the accounts it served; one killed or stopped (its
//! ports refuse, its sessions end) and started again on the same ports with the same mail;
//! logins by every protocol read from the log, and the open sessions from the instance's anvil.

mod support;

use std::time::Duration;

use base64::Engine as _;
use support::line_client::LineClient;
use support::{Dovecot, DovecotOptions, Introspection, SmtpSink, TEST_TIMEOUT, TestCa};
use support::{eventually, mint_token, with_timeout};

const USERS: [&str; 3] = ["ann@pool.test", "ben@pool.test", "cat@pool.test"];
/// Bound for an effect that follows a client's answer (a log line, anvil's count).
const SETTLE: Duration = Duration::from_secs(10);

/// What the backends share; fields drop in order, the Dovecots first.
struct Backends {
    dovecots: Vec<Dovecot>,
    introspection: Introspection,
    _sink: SmtpSink,
    _ca: TestCa,
}

impl Backends {
    async fn start(count: usize) -> Backends {
        let ca = TestCa::create().await;
        let introspection = Introspection::start().await;
        let sink = SmtpSink::start().await;
        let options = DovecotOptions::default();
        let dovecots =
            Dovecot::start_several(count, &ca, &introspection.url(), sink.addr(), &options).await;
        Backends {
            dovecots,
            introspection,
            _sink: sink,
            _ca: ca,
        }
    }

    /// Logs `user` in to `dovecot` by `protocol` on its plain port with a fresh token (SASL
    /// XOAUTH2 with an initial response) and returns the open session.
    async fn log_in(&self, dovecot: &Dovecot, protocol: Protocol, user: &str) -> LineClient {
        let token = mint_token();
        self.introspection.add_token(&token, user);
        let sasl = base64::engine::general_purpose::STANDARD
            .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
        let (port, ready, command, success): (u16, fn(&str) -> bool, String, &str) = match protocol
        {
            Protocol::Imap => (
                dovecot.imap_port,
                |line| line.starts_with("* OK"),
                format!("a AUTHENTICATE XOAUTH2 {sasl}\r\n"),
                "a OK",
            ),
            Protocol::Pop3 => (
                dovecot.pop3_port,
                |line| line.starts_with("+OK"),
                format!("AUTH XOAUTH2 {sasl}\r\n"),
                "+OK",
            ),
            Protocol::Submission => (
                dovecot.submission_port,
                |line| line.starts_with("220 "),
                format!("EHLO client.test\r\nAUTH XOAUTH2 {sasl}\r\n"),
                "235 ",
            ),
            Protocol::ManageSieve => (
                dovecot.sieve_port,
                |line| line.starts_with("OK"),
                format!("AUTHENTICATE \"XOAUTH2\" \"{sasl}\"\r\n"),
                "OK",
            ),
        };
        let mut client = LineClient::connect(Dovecot::addr(port)).await;
        client.until(ready).await;
        client.send(&command).await;
        // IMAP's untagged lines and SMTP's EHLO answer come before the login's answer.
        let answer = client
            .until(|line| {
                line.starts_with(success) || line.starts_with("a NO") || line.starts_with("NO")
            })
            .await;
        let last = answer.last().expect("an answer");
        assert!(
            last.starts_with(success),
            "{protocol:?} login of {user}: {answer:?}\n{}",
            dovecot.log()
        );
        client
    }
}

#[derive(Debug, Clone, Copy)]
enum Protocol {
    Imap,
    Pop3,
    Submission,
    ManageSieve,
}

/// Whether nothing accepts on any of `ports` (each refuses at once).
async fn all_refuse(ports: [u16; 10]) -> bool {
    for port in ports {
        if support::wait_for_port(Dovecot::addr(port), Duration::ZERO).await {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dovecots_each_log_only_their_own_users() {
    with_timeout(TEST_TIMEOUT, async {
        let pool = Backends::start(3).await;
        let [a, b, c] = &pool.dovecots[..] else {
            panic!("three Dovecots")
        };
        let ports: Vec<u16> = pool.dovecots.iter().flat_map(|d| d.ports()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "shared ports: {ports:?}");
        for (one, other) in [(a, b), (b, c), (a, c)] {
            assert_ne!(one.instance_name(), other.instance_name());
            assert!(
                one.processes()
                    .iter()
                    .all(|p| !other.processes().contains(p)),
                "process lists overlap"
            );
        }

        for (dovecot, user) in pool.dovecots.iter().zip(USERS) {
            pool.log_in(dovecot, Protocol::Imap, user).await;
        }
        for (dovecot, user) in pool.dovecots.iter().zip(USERS) {
            assert!(
                eventually(SETTLE, async || dovecot.logins() == [user]).await,
                "{user} on {}: {:?}",
                dovecot.instance_name(),
                dovecot.logins()
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_dovecot_refuses_then_starts_again_on_its_ports_with_its_mail() {
    with_timeout(TEST_TIMEOUT, async {
        let mut pool = Backends::start(3).await;
        let user = USERS[1];
        let ports = pool.dovecots[1].ports();
        let mut session = pool.log_in(&pool.dovecots[1], Protocol::Imap, user).await;
        pool.dovecots[1]
            .deliver(user, "Subject: kept\r\n\r\nacross a restart\r\n")
            .await;

        pool.dovecots[1].stop();
        assert!(
            all_refuse(ports).await,
            "a port of the stopped Dovecot accepts"
        );
        assert!(session.closed().await, "the session outlived its server");
        assert!(pool.dovecots[1].processes().is_empty());
        for other in [&pool.dovecots[0], &pool.dovecots[2]] {
            pool.log_in(other, Protocol::Imap, user).await;
        }

        pool.dovecots[1].start_again().await;
        assert_eq!(pool.dovecots[1].ports(), ports);
        pool.log_in(&pool.dovecots[1], Protocol::Imap, user).await;
        let mut pop3 = pool.log_in(&pool.dovecots[1], Protocol::Pop3, user).await;
        pop3.send("STAT\r\n").await;
        let stat = pop3.line().await;
        assert!(
            stat.starts_with("+OK 1 "),
            "the mail did not survive: {stat}"
        );
        let dovecot = &pool.dovecots[1];
        assert!(
            eventually(SETTLE, async || dovecot.logins() == [user; 3]).await,
            "{:?}",
            dovecot.logins()
        );
        for other in [&pool.dovecots[0], &pool.dovecots[2]] {
            assert!(eventually(SETTLE, async || other.logins() == [user]).await);
        }

        // Dovecot's own shutdown (SIGTERM) frees the same ports for another start.
        pool.dovecots[1].stop_gracefully();
        let goodbye = pop3.line().await;
        assert!(goodbye.contains("shutting down"), "{goodbye}");
        assert!(pop3.closed().await, "the session outlived its server");
        assert!(all_refuse(ports).await);
        pool.dovecots[1].start_again().await;
        pool.log_in(&pool.dovecots[1], Protocol::Imap, user).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_and_sessions_by_every_protocol() {
    with_timeout(TEST_TIMEOUT, async {
        let pool = Backends::start(1).await;
        let dovecot = &pool.dovecots[0];
        let user = USERS[0];
        let mut sessions = Vec::new();
        for protocol in [
            Protocol::Imap,
            Protocol::Pop3,
            Protocol::Submission,
            Protocol::ManageSieve,
        ] {
            sessions.push(pool.log_in(dovecot, protocol, user).await);
        }
        assert!(
            eventually(SETTLE, async || dovecot.logins() == [user; 4]).await,
            "{:?}",
            dovecot.logins()
        );
        let open = async || {
            let mut protocols = dovecot.sessions(user).await;
            protocols.sort();
            protocols
        };
        assert!(
            eventually(SETTLE, async || open().await
                == ["imap", "pop3", "sieve", "submission"])
            .await,
            "{:?}",
            open().await
        );
        assert!(dovecot.sessions(USERS[1]).await.is_empty());

        drop(sessions);
        assert!(
            eventually(SETTLE, async || open().await.is_empty()).await,
            "{:?}",
            open().await
        );
    })
    .await;
}
