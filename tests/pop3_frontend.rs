//! Transcripts of the POP3 front end before authentication, over in-memory streams through
//! `frontend::serve`, STLS included (a real TLS handshake with the test CA's certificate).

mod support;

use std::time::Duration;

use mailgate::frontend::{MailProtocol, Step};
use mailgate::limits::{MAX_ERRORS, MAX_LOGIN_FAILURES};
use mailgate::login::LoginError;
use mailgate::pop3::Pop3;
use support::transcript::{Client, Setup, pair, with_timeout};
use tokio::io::AsyncReadExt;

const GREETING: &str = "+OK mx.test mailgate ready";
const COMPLETION: &str = "+OK Logged in.";
const CAPA_TAIL: [&str; 4] = ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "."];

/// A POP3 listener with the defaults; the stand-in refuses wrong passwords as bad
/// credentials.
fn pop3() -> Setup {
    Setup::new(&Pop3, COMPLETION)
}

/// Starts a session as `setup` says and reads its greeting.
async fn greeted(setup: Setup) -> Client {
    let mut client = Client::start(setup).await;
    client.expect(&[GREETING]).await;
    client
}

/// Ends the session with QUIT, which hands nothing over.
async fn quits(mut client: Client) {
    client
        .exchange("QUIT\r\n", &["+OK mx.test mailgate signing off"])
        .await;
    assert!(client.finish().await.is_none());
}

fn capa(head: &[&str]) -> Vec<&'static str> {
    let mut lines = vec!["+OK Capability list follows"];
    lines.extend(head.iter().map(|line| -> &'static str {
        match *line {
            "USER" => "USER",
            "SASL" => "SASL PLAIN LOGIN",
            "STLS" => "STLS",
            other => panic!("unknown capability {other}"),
        }
    }));
    lines.extend(CAPA_TAIL);
    lines
}

#[tokio::test]
async fn capa_transaction_commands_and_quit() {
    with_timeout(async {
        let mut client = greeted(pop3()).await;
        client.exchange("CAPA\r\n", &capa(&["USER", "SASL"])).await;
        client.exchange("NOOP\r\n", &["-ERR Not logged in"]).await;
        client.exchange("stat\r\n", &["-ERR Not logged in"]).await;
        client
            .exchange("XYZZY\r\n", &["-ERR Unknown command"])
            .await;
        client
            .exchange("STLS\r\n", &["-ERR STLS not available"])
            .await;
        client
            .exchange("QUIT\r\n", &["+OK mx.test mailgate signing off"])
            .await;
        assert!(client.seen().is_empty());
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn user_pass_logs_in_and_pipelined_commands_reach_the_handoff() {
    with_timeout(async {
        let mut client = greeted(pop3()).await;
        client
            .exchange("USER alice@example.org\r\n", &["+OK Send PASS"])
            .await;
        // PASS keeps its spaces (RFC 1939 7); the commands after it wait for the upstream.
        client
            .exchange("PASS right\r\nSTAT\r\nLIST\r\n", &[COMPLETION])
            .await;
        assert_eq!(client.seen(), pair("alice@example.org", "right"));
        let mut handoff = client.finish().await.unwrap();
        assert_eq!(handoff.account, "alice@example.org");
        let mut replayed = [0u8; 12];
        handoff.client.read_exact(&mut replayed).await.unwrap();
        assert_eq!(&replayed, b"STAT\r\nLIST\r\n");
        assert!(handoff.client.prefix_consumed());
    })
    .await;
}

#[tokio::test]
async fn pass_comes_right_after_user() {
    with_timeout(async {
        let mut client = greeted(pop3()).await;
        client
            .exchange("PASS right\r\n", &["-ERR USER first"])
            .await;
        client.exchange("USER bob\r\n", &["+OK Send PASS"]).await;
        client.exchange("CAPA\r\n", &capa(&["USER", "SASL"])).await;
        client
            .exchange("PASS right\r\n", &["-ERR USER first"])
            .await;
        client.exchange("USER bob\r\n", &["+OK Send PASS"]).await;
        client
            .exchange("PASS two words\r\n", &["-ERR [AUTH] Authentication failed"])
            .await;
        assert_eq!(client.seen(), pair("bob", "two words"));
        quits(client).await;
    })
    .await;
}

#[tokio::test]
async fn auth_plain_with_and_without_an_initial_response() {
    with_timeout(async {
        let mut client = greeted(pop3()).await;
        // "\0alice\0wrong", then "\0alice\0right".
        client
            .exchange(
                "AUTH PLAIN AGFsaWNlAHdyb25n\r\n",
                &["-ERR [AUTH] Authentication failed"],
            )
            .await;
        client
            .exchange("AUTH PLAIN =\r\n", &["-ERR Malformed SASL message"])
            .await;
        client.exchange("auth plain\r\n", &["+ "]).await;
        client.exchange("AGFsaWNlAHJpZ2h0\r\n", &[COMPLETION]).await;
        assert_eq!(
            client.seen(),
            [pair("alice", "wrong"), pair("alice", "right")].concat()
        );
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn auth_login_after_challenges() {
    with_timeout(async {
        let mut client = greeted(pop3()).await;
        client.exchange("AUTH LOGIN\r\n", &["+ VXNlcm5hbWU6"]).await;
        client.exchange("YWxpY2U=\r\n", &["+ UGFzc3dvcmQ6"]).await;
        client.exchange("cmlnaHQ=\r\n", &[COMPLETION]).await;
        assert_eq!(client.seen(), pair("alice", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn cancel_bare_auth_unknown_mechanisms_and_apop() {
    with_timeout(async {
        let mut client = greeted(pop3()).await;
        client.exchange("AUTH PLAIN\r\n", &["+ "]).await;
        client
            .exchange("*\r\n", &["-ERR Authentication cancelled"])
            .await;
        client
            .exchange("AUTH\r\n", &["+OK", "PLAIN", "LOGIN", "."])
            .await;
        client
            .exchange(
                "AUTH XOAUTH2 dG9r\r\n",
                &["-ERR Unsupported authentication mechanism"],
            )
            .await;
        client
            .exchange(
                "APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n",
                &["-ERR APOP not supported; use USER/PASS or AUTH"],
            )
            .await;
        assert!(client.seen().is_empty());
        quits(client).await;
    })
    .await;
}

#[tokio::test]
async fn temporary_failures_are_sys_temp_and_failed_logins_close_the_session() {
    with_timeout(async {
        let mut client = greeted(Setup {
            failure: LoginError::TokenUnavailable,
            ..pop3()
        })
        .await;
        // The last failure allowed is answered, then the session ends.
        for _ in 0..MAX_LOGIN_FAILURES {
            client.exchange("USER alice\r\n", &["+OK Send PASS"]).await;
            client
                .exchange(
                    "PASS wrong\r\n",
                    &["-ERR [SYS/TEMP] Temporary authentication failure"],
                )
                .await;
        }
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn a_too_long_line_is_refused_and_skipped_to_its_end() {
    with_timeout(async {
        let mut client = greeted(Setup {
            max_line_length: 64,
            ..pop3()
        })
        .await;
        let long = format!("USER {}", "a".repeat(100));
        client.send(&long).await;
        client.send(&long).await;
        client
            .exchange("\r\nCAPA\r\n", &["-ERR Line too long"])
            .await;
        client.expect(&capa(&["USER", "SASL"])).await;
        // A long line also ends an exchange in progress.
        client.exchange("AUTH LOGIN\r\n", &["+ VXNlcm5hbWU6"]).await;
        client
            .exchange(&format!("{long}\r\n"), &["-ERR Line too long"])
            .await;
        client
            .exchange("cmlnaHQ=\r\n", &["-ERR Unknown command"])
            .await;
        assert!(client.seen().is_empty());
        quits(client).await;
    })
    .await;
}

#[tokio::test]
async fn too_many_errors_close_the_session() {
    with_timeout(async {
        let mut client = greeted(pop3()).await;
        for _ in 1..MAX_ERRORS {
            client
                .exchange("BOGUS\r\n", &["-ERR Unknown command"])
                .await;
        }
        client
            .exchange(
                "BOGUS\r\n",
                &["-ERR [SYS/TEMP] Too many errors, closing connection"],
            )
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn shutting_down_says_goodbye() {
    with_timeout(async {
        let mut client = greeted(pop3()).await;
        client.exchange("USER alice\r\n", &["+OK Send PASS"]).await;
        client.shut_down();
        client
            .expect(&["-ERR [SYS/TEMP] mx.test Service shutting down"])
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn stls_offered_drops_what_was_pipelined_in_the_clear() {
    with_timeout(async {
        let mut client = greeted(pop3().with_tls(false).await).await;
        client
            .exchange("CAPA\r\n", &capa(&["USER", "SASL", "STLS"]))
            .await;
        // An injected USER after STLS, in the same packet, must never count.
        client
            .exchange("STLS\r\nUSER mallory\r\n", &["+OK Begin TLS negotiation"])
            .await;
        client.start_tls().await;
        client.exchange("CAPA\r\n", &capa(&["USER", "SASL"])).await;
        client
            .exchange("PASS right\r\n", &["-ERR USER first"])
            .await;
        client
            .exchange("STLS\r\n", &["-ERR TLS already active"])
            .await;
        client.exchange("USER alice\r\n", &["+OK Send PASS"]).await;
        client.exchange("PASS right\r\n", &[COMPLETION]).await;
        assert_eq!(client.seen(), pair("alice", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn stls_required_refuses_logins_before_tls() {
    with_timeout(async {
        let mut client = greeted(pop3().with_tls(true).await).await;
        client.exchange("CAPA\r\n", &capa(&["STLS"])).await;
        let refusal = "-ERR [AUTH] Plaintext authentication disallowed before STLS; use STLS first";
        client.exchange("USER alice\r\n", &[refusal]).await;
        client.exchange("PASS right\r\n", &[refusal]).await;
        client
            .exchange("AUTH PLAIN AGFsaWNlAHJpZ2h0\r\n", &[refusal])
            .await;
        client.exchange("AUTH\r\n", &[refusal]).await;
        client
            .exchange("STLS\r\n", &["+OK Begin TLS negotiation"])
            .await;
        client.start_tls().await;
        client.exchange("CAPA\r\n", &capa(&["USER", "SASL"])).await;
        client
            .exchange("AUTH PLAIN AGFsaWNlAHJpZ2h0\r\n", &[COMPLETION])
            .await;
        assert_eq!(client.seen(), pair("alice", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

/// Pseudo-random bytes, biased towards command words and line ends, straight into the
/// dialogue (no I/O): it never panics, every reply is whole lines, and it closes in time.
#[test]
fn hostile_bytes_never_panic_and_every_reply_is_whole_lines() {
    const PIECES: [&[u8]; 12] = [
        b"USER ", b"PASS ", b"AUTH ", b"PLAIN", b"LOGIN", b"CAPA", b"STLS", b"*", b"=", b"\r\n",
        b"\n", b"\0\xff ",
    ];
    let settings = Setup {
        max_line_length: 64,
        ..pop3()
    }
    .settings();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let nothing = || Vec::new();
    for _ in 0..200 {
        let mut dialogue = Pop3.dialogue(&settings);
        let mut closed = false;
        for _ in 0..200 {
            let piece = PIECES[(next() % PIECES.len() as u64) as usize];
            let random = next().to_le_bytes();
            dialogue.push(if next() % 4 == 0 { &random } else { piece });
            while let Some(step) = dialogue.next_step(&nothing) {
                let bytes = match step {
                    Step::Reply(bytes) | Step::StartTls(bytes) => bytes,
                    Step::Close(bytes) => {
                        closed = true;
                        bytes
                    }
                    Step::LogIn { .. } => match dialogue.login_failed(LoginError::BadCredentials) {
                        Step::Reply(bytes) => bytes,
                        Step::Close(bytes) => {
                            closed = true;
                            bytes
                        }
                        other => panic!("{other:?} after a failed login"),
                    },
                };
                assert!(bytes.ends_with(b"\r\n"), "{bytes:?}");
                assert!(!bytes[..bytes.len() - 2].contains(&b'\0'));
                if closed {
                    break;
                }
            }
            if closed {
                break;
            }
        }
    }
}

/// A client that floods CAPA and never reads its replies cannot hold the session: the
/// pending replies are given up at the idle deadline, not the (longer) lifetime.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_is_let_go_at_the_idle_deadline() {
    // Twice the harness's 60 s `pre_auth_timeout`, well before its 300 s lifetime.
    let client = Client::start(pop3()).await;
    let outcome = client
        .flood_unread("CAPA\r\n", Duration::from_secs(120))
        .await;
    let outcome = outcome.expect("the session outlived its idle deadline");
    assert!(!matches!(outcome, Ok(Some(_))), "no login happened");
}
