//! Transcripts of the ManageSieve front end before authentication (RFC 5804), run by
//! `frontend::serve` over in-memory streams with a stand-in authenticator.

mod support;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mailgate::config::DEFAULT_MAX_LINE_LENGTH;
use mailgate::limits::{MAX_ERRORS, MAX_LOGIN_FAILURES};
use mailgate::login::LoginError;
use mailgate::managesieve::ManageSieve;
use support::transcript::{Client, Setup, pair, with_timeout};
use tokio::io::AsyncReadExt;

const COMPLETION: &str = "OK \"Logged in.\"";
const NO_UPSTREAM: [&str; 5] = [
    "\"IMPLEMENTATION\" \"mailgate\"",
    "\"SASL\" \"PLAIN LOGIN\"",
    "\"SIEVE\" \"\"",
    "\"VERSION\" \"1.0\"",
    "OK \"mx.test ManageSieve ready\"",
];

/// A ManageSieve listener with the defaults; the stand-in refuses wrong passwords as bad
/// credentials and the upstream announces nothing.
fn managesieve() -> Setup {
    Setup::new(&ManageSieve, COMPLETION)
}

/// Starts a session as `setup` says and reads its greeting (no upstream capabilities).
async fn greeted(setup: Setup) -> Client {
    let mut client = Client::start(setup).await;
    client.expect(&NO_UPSTREAM).await;
    client
}

/// Starts a session offering STARTTLS (`required`: before any login) and reads its greeting,
/// which offers `sasl` as the mechanisms.
async fn offering_tls(required: bool, sasl: &str) -> Client {
    let mut client = Client::start(managesieve().with_tls(required).await).await;
    client
        .expect(&[
            "\"IMPLEMENTATION\" \"mailgate\"",
            &format!("\"SASL\" \"{sasl}\""),
            "\"SIEVE\" \"\"",
            "\"STARTTLS\"",
            "\"VERSION\" \"1.0\"",
            "OK \"mx.test ManageSieve ready\"",
        ])
        .await;
    client
}

/// Runs the handshake after `OK` to STARTTLS and reads the capabilities sent again over TLS
/// (RFC 5804 2.2).
async fn starts_tls(client: &mut Client) {
    client.start_tls().await;
    client.expect(&NO_UPSTREAM[..4]).await;
    client.expect(&["OK \"Capability completed\""]).await;
}

/// AUTHENTICATE PLAIN with `credentials` (`"\0account\0password"`) as a quoted initial
/// response.
fn authenticate_plain(credentials: &str) -> String {
    format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", base64(credentials))
}

fn base64(text: &str) -> String {
    BASE64.encode(text)
}

/// Logs in with a PLAIN initial response sent as `argument` (`"..."` or a literal).
async fn logs_in_with(argument: impl Fn(&str) -> String) {
    let mut client = greeted(managesieve()).await;
    let command = format!(
        "AUTHENTICATE \"PLAIN\" {}\r\n",
        argument(&base64("\0alice\0right"))
    );
    client.exchange(&command, &[COMPLETION]).await;
    assert_eq!(client.seen(), pair("alice", "right"));
    assert!(client.finish().await.is_some());
}

#[tokio::test]
async fn greeting_capability_noop_logout() {
    with_timeout(async {
        let mut client = greeted(managesieve()).await;
        client.send("capability\r\n").await;
        client.expect(&NO_UPSTREAM[..4]).await;
        client.expect(&["OK \"Capability completed\""]).await;
        client
            .exchange("NOOP\r\n", &["OK \"NOOP completed\""])
            .await;
        client
            .exchange(
                "NOOP {3+}\r\na\"b\r\n",
                &["OK (TAG \"a\\\"b\") \"NOOP completed\""],
            )
            .await;
        client
            .exchange(
                "PUTSCRIPT \"s\" {5+}\r\nkeep;\r\n",
                &["NO \"Authenticate first\""],
            )
            .await;
        client
            .exchange("XYZZY\r\n", &["NO \"Unknown command\""])
            .await;
        client
            .exchange("Logout\r\n", &["OK \"Logout completed\""])
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn greeting_relays_the_upstream_capabilities_validated() {
    with_timeout(async {
        let capabilities = [
            "\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"",
            "\"SASL\" \"XOAUTH2 OAUTHBEARER\"",
            "\"SIEVE\" \"fileinto reject envelope\"",
            "\"NOTIFY\" \"mailto\"\r\nOK \"forged\"",
            "\"MAXREDIRECTS\" \"4\"",
            "\"UNAUTHENTICATE\"",
            "\"VERSION\" \"1.0\"",
        ];
        let setup = Setup {
            capabilities: capabilities.iter().map(|line| line.to_string()).collect(),
            ..managesieve()
        };
        let mut client = Client::start(setup).await;
        client
            .expect(&[
                "\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"",
                "\"SASL\" \"PLAIN LOGIN\"",
                "\"SIEVE\" \"fileinto reject envelope\"",
                "\"MAXREDIRECTS\" \"4\"",
                "\"VERSION\" \"1.0\"",
                "OK \"mx.test ManageSieve ready\"",
            ])
            .await;
    })
    .await;
}

#[tokio::test]
async fn authenticate_plain_with_a_quoted_initial_response() {
    with_timeout(logs_in_with(|encoded| format!("\"{encoded}\""))).await;
}

#[tokio::test]
async fn authenticate_plain_with_a_non_synchronizing_literal() {
    with_timeout(logs_in_with(|encoded| {
        format!("{{{}+}}\r\n{encoded}", encoded.len())
    }))
    .await;
}

#[tokio::test]
async fn authenticate_plain_with_a_synchronizing_literal_gets_no_continuation() {
    with_timeout(logs_in_with(|encoded| {
        format!("{{{}}}\r\n{encoded}", encoded.len())
    }))
    .await;
}

#[tokio::test]
async fn authenticate_login_with_string_responses() {
    with_timeout(async {
        let mut client = greeted(managesieve()).await;
        client
            .exchange("AUTHENTICATE \"login\"\r\n", &["\"VXNlcm5hbWU6\""])
            .await;
        client
            .exchange(&format!("\"{}\"\r\n", base64("bob")), &["\"UGFzc3dvcmQ6\""])
            .await;
        let password = base64("right");
        client
            .exchange(
                &format!("{{{}+}}\r\n{password}\r\n", password.len()),
                &[COMPLETION],
            )
            .await;
        assert_eq!(client.seen(), pair("bob", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn cancelled_authentication_leaves_the_session_usable() {
    with_timeout(async {
        let mut client = greeted(managesieve()).await;
        client
            .exchange("AUTHENTICATE \"PLAIN\"\r\n", &["\"\""])
            .await;
        client
            .exchange("\"*\"\r\n", &["NO \"Authentication cancelled\""])
            .await;
        client
            .exchange(
                "AUTHENTICATE \"CRAM-MD5\"\r\n",
                &["NO \"Unsupported mechanism\""],
            )
            .await;
        client
            .exchange(
                "AUTHENTICATE \"PLAIN\" \"not base64!\"\r\n",
                &["NO \"Invalid SASL response\""],
            )
            .await;
        client
            .exchange("NOOP\r\n", &["OK \"NOOP completed\""])
            .await;
        assert!(client.seen().is_empty());
    })
    .await;
}

#[tokio::test]
async fn failed_logins_are_mapped_and_close_the_session_at_the_limit() {
    with_timeout(async {
        let mut client = greeted(managesieve()).await;
        let wrong = authenticate_plain("\0alice\0wrong");
        for _ in 1..MAX_LOGIN_FAILURES {
            client
                .exchange(&wrong, &["NO \"Authentication failed\""])
                .await;
        }
        client
            .exchange(
                &wrong,
                &[
                    "NO \"Authentication failed\"",
                    "BYE \"Too many failed logins\"",
                ],
            )
            .await;
        assert!(client.finish().await.is_none());

        let mut client = greeted(Setup {
            failure: LoginError::TokenUnavailable,
            ..managesieve()
        })
        .await;
        client
            .exchange(
                &wrong,
                &["NO (TRYLATER) \"Temporary failure, try again later\""],
            )
            .await;
    })
    .await;
}

#[tokio::test]
async fn a_literal_too_large_is_read_past_and_refused() {
    with_timeout(async {
        let mut client = greeted(Setup {
            max_literal_size: 16,
            ..managesieve()
        })
        .await;
        // The literal's bytes look like commands; none of them is run.
        let literal = "LOGOUT\r\nLOGOUT\r\nLOGOUT\r\n";
        for announcement in ["+}", "}"] {
            let command = format!("NOOP {{{}{announcement}\r\n{literal}\r\n", literal.len());
            client
                .exchange(&command, &["NO \"Command too long or malformed\""])
                .await;
        }
        let long = format!("NOOP \"{}\"\r\n", "a".repeat(DEFAULT_MAX_LINE_LENGTH));
        client
            .exchange(&long, &["NO \"Command too long or malformed\""])
            .await;
        client
            .exchange("NOOP\r\n", &["OK \"NOOP completed\""])
            .await;
    })
    .await;
}

#[tokio::test]
async fn too_many_errors_close_the_session() {
    with_timeout(async {
        let mut client = greeted(managesieve()).await;
        for _ in 1..MAX_ERRORS {
            client
                .exchange("HAVESPACE \"s\" \"1\"\r\n", &["NO \"Authenticate first\""])
                .await;
        }
        client
            .exchange(
                "\"not a command\"\r\n",
                &[
                    "NO \"Invalid command\"",
                    "BYE \"Too many invalid commands\"",
                ],
            )
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn starttls_sends_the_capabilities_again_and_drops_injected_commands() {
    with_timeout(async {
        let mut client = offering_tls(false, "PLAIN LOGIN").await;
        // Sent in the clear with STARTTLS: must not be acted on after the handshake.
        client
            .exchange(
                "STARTTLS\r\nLOGOUT\r\n",
                &["OK \"Begin TLS negotiation now\""],
            )
            .await;
        starts_tls(&mut client).await;
        client
            .exchange("NOOP\r\n", &["OK \"NOOP completed\""])
            .await;
        client
            .exchange("STARTTLS\r\n", &["NO \"STARTTLS not available\""])
            .await;
        logs_in_over(&mut client).await;
    })
    .await;
}

async fn logs_in_over(client: &mut Client) {
    let command = authenticate_plain("\0alice\0right");
    client.exchange(&command, &[COMPLETION]).await;
}

#[tokio::test]
async fn required_tls_refuses_logins_before_it() {
    with_timeout(async {
        let mut client = offering_tls(true, "").await;
        let command = authenticate_plain("\0alice\0right");
        client
            .exchange(&command, &["NO (ENCRYPT-NEEDED) \"Log in after STARTTLS\""])
            .await;
        assert!(client.seen().is_empty());
        client
            .exchange("STARTTLS\r\n", &["OK \"Begin TLS negotiation now\""])
            .await;
        starts_tls(&mut client).await;
        logs_in_over(&mut client).await;
        assert_eq!(client.seen(), pair("alice", "right"));
    })
    .await;
}

#[tokio::test]
async fn pipelined_commands_after_login_reach_the_upstream() {
    with_timeout(async {
        let mut client = greeted(managesieve()).await;
        let pipelined = "LISTSCRIPTS\r\nPUTSCRIPT \"s\" {5+}\r\nkeep;\r\n";
        let command = format!("{}{pipelined}", authenticate_plain("\0alice\0right"));
        client.exchange(&command, &[COMPLETION]).await;
        let mut handoff = client.finish().await.unwrap();
        let mut replayed = vec![0u8; pipelined.len()];
        handoff.client.read_exact(&mut replayed).await.unwrap();
        assert_eq!(replayed, pipelined.as_bytes());
    })
    .await;
}

#[tokio::test]
async fn shutting_down_says_bye_trylater() {
    with_timeout(async {
        let mut client = greeted(managesieve()).await;
        client.shut_down();
        client
            .expect(&["BYE (TRYLATER) \"Server shutting down\""])
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

/// A client that floods CAPABILITY and never reads its replies cannot hold the session: the
/// pending replies are given up at the idle deadline, not the (longer) lifetime.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_is_let_go_at_the_idle_deadline() {
    // Twice the harness's 60 s `pre_auth_timeout`, well before its 300 s lifetime.
    let client = Client::start(managesieve()).await;
    let outcome = client
        .flood_unread("CAPABILITY\r\n", Duration::from_secs(120))
        .await;
    let outcome = outcome.expect("the session outlived its idle deadline");
    assert!(!matches!(outcome, Ok(Some(_))), "no login happened");
}
