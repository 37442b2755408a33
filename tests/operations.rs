//! Operating mailgate: metrics that move with real sessions, readiness during drain, a
//! session that finishes its work after SIGTERM, hot reload (broken and valid), JSON logs.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use support::imap_client::ImapClient;
use support::process::send_signal;
use support::{Mailgate, TEST_TIMEOUT, TestUpstream, curl, eventually, free_port, with_timeout};

/// How long an effect of a signal or a close may take to show.
const WAIT: Duration = Duration::from_secs(10);

const ACCOUNT: &str = "acct1";
const USER: &str = "alice@example.test";

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The test upstream's IMAP + SMTP config plus a metrics listener and `extra` top-level keys.
fn config(up: &TestUpstream, imap: u16, smtp: u16, metrics: u16, extra: &str) -> String {
    format!(
        "{}metrics:\n  listen: \"127.0.0.1:{metrics}\"\n{extra}",
        up.mailgate_config(imap, smtp)
    )
}

async fn get(port: u16, path: &str) -> (String, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let out = curl(&["-s", "-o", "-", "-w", "\n%{http_code}", &url]).await;
    let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", ""));
    (code.to_owned(), body.to_owned())
}

/// An SMTP session through mailgate that has said EHLO and authenticated with AUTH PLAIN.
async fn smtp_logged_in(address: SocketAddr) -> BufReader<TcpStream> {
    let mut session = BufReader::new(TcpStream::connect(address).await.unwrap());
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{ACCOUNT}\0pw"));
    session
        .get_mut()
        .write_all(format!("EHLO client.test\r\nAUTH PLAIN {plain}\r\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    while !line.starts_with("235 ") {
        line.clear();
        session.read_line(&mut line).await.unwrap();
        assert!(!line.is_empty() && !line.starts_with('5'), "{line}");
    }
    session
}

/// Whether a reload with `result` was counted within [`WAIT`].
async fn reloaded(admin: u16, result: &str) -> bool {
    let series = format!("mailgate_config_reloads_total{{result=\"{result}\"}}");
    eventually(WAIT, || async {
        metric(&get(admin, "/metrics").await.1, &series) == 1.0
    })
    .await
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_real_session() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let _mailgate = Mailgate::start(&config(&up, imap, smtp, admin, "")).await;

        let mut client = ImapClient::connect(localhost(imap)).await;
        assert!(client.login(ACCOUNT, "pw").await.is_ok());
        assert!(client.command(r#"LIST "" "*""#).await.is_ok());
        let (code, during) = get(admin, "/metrics").await;
        // The harness's readiness check connected once before the client did.
        let connections = r#"mailgate_connections_total{listener="imap"}"#;
        assert_eq!(code, "200");
        assert_eq!(
            metric(&during, r#"mailgate_connections_active{listener="imap"}"#),
            1.0
        );
        assert_eq!(
            metric(
                &during,
                r#"mailgate_logins_total{listener="imap",result="ok"}"#
            ),
            1.0
        );
        assert_eq!(
            metric(
                &during,
                r#"mailgate_token_requests_total{source="auth_server",result="ok"}"#
            ),
            1.0
        );
        assert_eq!(
            metric(&during, r#"mailgate_token_cache_total{result="miss"}"#),
            1.0
        );
        assert!(
            metric(
                &during,
                r#"mailgate_bytes_total{listener="imap",direction="upstream_to_client"}"#
            ) > 0.0
        );
        assert!(during.contains("mailgate_build_info{version="), "{during}");

        let mut second = ImapClient::connect(localhost(imap)).await;
        assert!(second.login(ACCOUNT, "pw").await.is_ok());
        up.auth.set_status("nobody", 404);
        let mut refused = ImapClient::connect(localhost(imap)).await;
        assert!(!refused.login("nobody", "pw").await.is_ok());
        client.command("LOGOUT").await;
        drop(client);
        let active = r#"mailgate_connections_active{listener="imap"}"#;
        assert!(
            eventually(WAIT, || async {
                metric(&get(admin, "/metrics").await.1, active) == 2.0
            })
            .await
        );

        let (_, after) = get(admin, "/metrics").await;
        assert_eq!(
            metric(&after, r#"mailgate_token_cache_total{result="hit"}"#),
            1.0
        );
        assert_eq!(
            metric(
                &after,
                r#"mailgate_logins_total{listener="imap",result="bad_credentials"}"#
            ),
            1.0
        );
        assert_eq!(
            metric(
                &after,
                r#"mailgate_token_requests_total{source="auth_server",result="refused"}"#
            ),
            1.0
        );
        assert_eq!(
            metric(&after, connections) - metric(&during, connections),
            2.0
        );
        assert_eq!(
            metric(&after, r#"mailgate_connections_active{listener="imap"}"#),
            2.0
        );
        assert!(
            metric(
                &after,
                r#"mailgate_session_duration_seconds_count{listener="imap"}"#
            ) >= 1.0
        );
        assert!(
            after.contains("mailgate_upstream_connect_seconds_count{upstream=\"127.0.0.1:"),
            "{after}"
        );
        assert!(
            after.contains("mailgate_upstream_auth_seconds_count{upstream=\"127.0.0.1:"),
            "{after}"
        );
        assert!(
            !after.contains(USER) && !after.contains(ACCOUNT),
            "no account names in labels"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_working_session_then_exits_zero() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let mut mailgate = Mailgate::start(&config(
            &up,
            imap,
            smtp,
            admin,
            "drain_delay: 0s\nshutdown_grace: 20s\n",
        ))
        .await;
        // Ready once the auth server has answered the first probe.
        assert!(eventually(WAIT, || async { get(admin, "/readyz").await.0 == "200" }).await);
        assert_eq!(get(admin, "/healthz").await.0, "200");

        let mut client = ImapClient::connect(localhost(imap)).await;
        assert!(client.login(ACCOUNT, "pw").await.is_ok());
        send_signal(mailgate.pid().unwrap(), "TERM");
        assert!(
            eventually(WAIT, || async { get(admin, "/readyz").await.0 == "503" }).await,
            "not ready while draining"
        );
        assert!(
            tokio::net::TcpStream::connect(localhost(imap))
                .await
                .is_err(),
            "no new connections while draining"
        );

        // The open session still works, then ends by itself and mailgate exits.
        assert!(client.command("SELECT INBOX").await.is_ok());
        assert!(client.command("LOGOUT").await.is_ok());
        drop(client);
        assert_eq!(mailgate.wait_exit(Duration::from_secs(10)).await, Some(0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_left_after_the_grace_period_get_bye() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let mut mailgate = Mailgate::start(&config(
            &up,
            imap,
            smtp,
            admin,
            "drain_delay: 0s\nshutdown_grace: 1s\n",
        ))
        .await;
        let mut client = ImapClient::connect(localhost(imap)).await;
        assert!(client.login(ACCOUNT, "pw").await.is_ok());
        let mut submission = smtp_logged_in(localhost(smtp)).await;
        send_signal(mailgate.pid().unwrap(), "TERM");
        let bye = client.line().await;
        assert!(bye.starts_with("* BYE"), "{bye}");
        let mut goodbye = String::new();
        submission.read_line(&mut goodbye).await.unwrap();
        assert!(goodbye.starts_with("421 4.3.2 "), "{goodbye}");
        assert_eq!(mailgate.wait_exit(Duration::from_secs(10)).await, Some(0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_exits_at_once() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let mut mailgate = Mailgate::start(&config(
            &up,
            imap,
            smtp,
            admin,
            "drain_delay: 0s\nshutdown_grace: 10m\n",
        ))
        .await;
        let mut client = ImapClient::connect(localhost(imap)).await;
        assert!(client.login(ACCOUNT, "pw").await.is_ok());
        let pid = mailgate.pid().unwrap();
        send_signal(pid, "TERM");
        assert!(eventually(WAIT, || async { get(admin, "/readyz").await.0 == "503" }).await);
        send_signal(pid, "INT");
        // Well inside the ten-minute grace: the second signal did not wait for the session.
        assert_eq!(mailgate.wait_exit(Duration::from_secs(10)).await, Some(1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_the_old_config_when_broken_and_adds_listeners_when_valid() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let original = config(&up, imap, smtp, admin, "config_watch_interval: 0s\n");
        let mailgate = Mailgate::start(&original).await;
        let pid = mailgate.pid().unwrap();
        let mut old_session = ImapClient::connect(localhost(imap)).await;
        assert!(old_session.login(ACCOUNT, "pw").await.is_ok());

        std::fs::write(mailgate.config_path(), "listeners: [broken\n").unwrap();
        send_signal(pid, "HUP");
        assert!(reloaded(admin, "invalid").await, "{}", mailgate.output());
        let mut client = ImapClient::connect(localhost(imap)).await;
        assert!(client.login(ACCOUNT, "pw").await.is_ok(), "old config still serves");

        let extra = free_port();
        let added = original.replacen(
            "tokens:",
            &format!(
                "  - name: imap2\n    protocol: imap\n    listen: \"127.0.0.1:{extra}\"\n    upstream: {{ host: 127.0.0.1, port: {}, tls: none }}\ntokens:",
                up.dovecot.imap_port
            ),
            1,
        );
        std::fs::write(mailgate.config_path(), added).unwrap();
        send_signal(pid, "HUP");
        assert!(reloaded(admin, "ok").await, "{}", mailgate.output());
        let mut new_listener = ImapClient::connect(localhost(extra)).await;
        assert!(new_listener.login(ACCOUNT, "pw").await.is_ok(), "{}", mailgate.output());
        assert!(old_session.command("SELECT INBOX").await.is_ok(), "old session untouched");
    })
    .await;
}

/// A client greeted with `* OK` at `address`, once a slot is free (within [`WAIT`]).
async fn admitted(address: SocketAddr) -> ImapClient {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let client = ImapClient::connect(address).await;
        if client.greeting.starts_with("* OK") {
            return client;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            client.greeting
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The listener's connections outlive its name: a session from before the rename still holds
/// its slot, so the one-connection limit refuses the next client until that session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_a_listener_keeps_its_socket_and_its_open_connections() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let original = config(&up, imap, smtp, admin, "config_watch_interval: 0s\n").replacen(
            "    protocol: imap\n",
            "    protocol: imap\n    max_connections: 1\n",
            1,
        );
        let mailgate = Mailgate::start(&original).await;
        // The start-up probe's connection may hold the slot for a moment.
        let mut held = admitted(localhost(imap)).await;
        assert!(held.login(ACCOUNT, "pw").await.is_ok());
        let renamed = original.replacen("- name: imap\n", "- name: mailbox\n", 1);
        std::fs::write(mailgate.config_path(), renamed).unwrap();
        send_signal(mailgate.pid().unwrap(), "HUP");
        assert!(reloaded(admin, "ok").await, "{}", mailgate.output());

        let refused = ImapClient::connect(localhost(imap)).await;
        assert!(
            refused
                .greeting
                .starts_with("* BYE [UNAVAILABLE] Too many connections"),
            "the rename forgot the open session: {}\n{}",
            refused.greeting,
            mailgate.output()
        );
        assert!(held.command("NOOP").await.is_ok(), "old session untouched");
        drop(held);
        let mut client = admitted(localhost(imap)).await;
        assert!(client.login(ACCOUNT, "pw").await.is_ok());
        let (_, text) = get(admin, "/metrics").await;
        let series = r#"mailgate_logins_total{listener="mailbox",result="ok"}"#;
        assert_eq!(metric(&text, series), 1.0, "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_changes_are_picked_up_without_a_signal() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let original = config(&up, imap, smtp, admin, "config_watch_interval: 200ms\n");
        let mailgate = Mailgate::start(&original).await;
        let moved = free_port();
        std::fs::write(
            mailgate.config_path(),
            original.replace(&format!("127.0.0.1:{imap}"), &format!("127.0.0.1:{moved}")),
        )
        .unwrap();
        let listening = support::wait_for_port(localhost(moved), WAIT).await;
        assert!(listening, "{}", mailgate.output());
        let mut client = ImapClient::connect(localhost(moved)).await;
        assert!(client.login(ACCOUNT, "pw").await.is_ok());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_log_level() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let quiet = config(
            &up,
            imap,
            smtp,
            admin,
            "config_watch_interval: 0s\nlog:\n  level: warn\n",
        );
        let mailgate = Mailgate::start(&quiet).await;
        let mut client = ImapClient::connect(localhost(imap)).await;
        assert!(client.login(ACCOUNT, "pw").await.is_ok());
        assert!(
            !mailgate.stderr().contains("logged in"),
            "info is filtered at warn"
        );

        std::fs::write(
            mailgate.config_path(),
            quiet.replace("level: warn", "level: info"),
        )
        .unwrap();
        send_signal(mailgate.pid().unwrap(), "HUP");
        assert!(reloaded(admin, "ok").await, "{}", mailgate.output());
        let mut client = ImapClient::connect(localhost(imap)).await;
        assert!(client.login(ACCOUNT, "pw").await.is_ok());
        assert!(
            eventually(WAIT, || async { mailgate.stderr().contains("logged in") }).await,
            "{}",
            mailgate.stderr()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_session_fields() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let mut mailgate =
            Mailgate::start(&config(&up, imap, smtp, admin, "log:\n  format: json\n")).await;
        let mut client = ImapClient::connect(localhost(imap)).await;
        assert!(client.login(ACCOUNT, "pw").await.is_ok());
        client.command("LOGOUT").await;
        drop(client);
        assert!(
            eventually(WAIT, || async {
                mailgate.stderr().contains(r#""outcome":"closed""#)
            })
            .await
        );
        mailgate.stop();

        let logs = mailgate.stderr();
        let lines: Vec<serde_json::Value> = logs
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        let closing = lines
            .iter()
            .find(|l| l["message"] == "session closed" && l["outcome"] == "closed")
            .unwrap_or_else(|| panic!("no closing line in {logs}"));
        let span = &closing["span"];
        assert_eq!(span["listener"], "imap");
        assert_eq!(span["account"], ACCOUNT);
        assert!(
            span["id"].is_number() && span["client"].is_string(),
            "{closing}"
        );
        assert!(span["upstream"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(closing["bytes_upstream_to_client"].as_u64().unwrap() > 0);
        assert!(closing["duration_ms"].is_number());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_not_ready_at_once_but_accepts_during_the_drain_delay() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let extra = "drain_delay: 3s\nshutdown_grace: 1s\n";
        let mut mailgate = Mailgate::start(&config(&up, imap, smtp, admin, extra)).await;
        send_signal(mailgate.pid().unwrap(), "TERM");
        assert!(
            eventually(WAIT, || async { get(admin, "/readyz").await.0 == "503" }).await,
            "not ready at once"
        );
        // Clients that the load balancer still sends are served meanwhile.
        let mut late = ImapClient::connect(localhost(imap)).await;
        assert!(late.greeting.starts_with("* OK"), "{}", late.greeting);
        assert!(late.login(ACCOUNT, "pw").await.is_ok());
        // After the delay the listener closes.
        let closed = eventually(WAIT, || async {
            tokio::net::TcpStream::connect(localhost(imap))
                .await
                .is_err()
        })
        .await;
        assert!(closed, "still accepting after the drain delay");
        assert_eq!(mailgate.wait_exit(Duration::from_secs(10)).await, Some(0));
        assert!(
            mailgate
                .output()
                .contains("still accepting during the drain delay")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_known_series_is_exported_at_zero_before_any_traffic() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let _mailgate = Mailgate::start(&config(&up, imap, smtp, admin, "")).await;
        let text = get(admin, "/metrics").await.1;
        for series in [
            "mailgate_logins_total{listener=\"imap\",result=\"ok\"} 0",
            "mailgate_logins_total{listener=\"smtp\",result=\"bad_credentials\"} 0",
            "mailgate_logins_total{listener=\"imap\",result=\"upstream_unavailable\"} 0",
            "mailgate_connections_rejected_total{listener=\"smtp\"} 0",
            "mailgate_token_requests_total{source=\"auth_server\",result=\"error\"} 0",
            "mailgate_token_cache_total{result=\"miss\"} 0",
            "mailgate_config_reloads_total{result=\"invalid\"} 0",
            "mailgate_bytes_total{listener=\"imap\",direction=\"upstream_to_client\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_is_picked_up_and_readiness_says_when_the_auth_server_refuses() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let auth = support::AuthServer::start_with_basic_auth(
            Some(&up.introspection),
            "mailgate",
            "new-secret",
        )
        .await;
        auth.grant(ACCOUNT, USER);
        let secrets = tempfile::tempdir().unwrap();
        support::kubernetes_secret(
            secrets.path(),
            "2026_11_24_01",
            &[("password", b"old-secret\n")],
        );
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let text = config(&up, imap, smtp, admin, "config_watch_interval: 200ms\n").replace(
            &format!("url: \"{}\"", up.auth.url_with_credentials()),
            &format!(
                "url: \"http://mailgate@{}/token\"\n    password_file: \"{}\"",
                auth.addr(),
                secrets.path().join("password").display()
            ),
        );
        let mailgate = Mailgate::start(&text).await;
        // Wrong credentials: the auth server answers 401, so mailgate is not ready.
        let refused = eventually(WAIT, || async {
            let (code, body) = get(admin, "/readyz").await;
            code == "503" && body.contains("refuses mailgate's credentials")
        })
        .await;
        assert!(refused, "{}", mailgate.output());
        // A session that started before the rotation.
        let mut before = ImapClient::connect(localhost(imap)).await;

        support::kubernetes_secret(
            secrets.path(),
            "2026_11_24_02",
            &[("password", b"new-secret\n")],
        );
        assert!(
            eventually(WAIT, || async { get(admin, "/readyz").await.0 == "200" }).await,
            "{}",
            mailgate.output()
        );
        assert!(reloaded(admin, "ok").await);
        assert!(
            before.command("NOOP").await.is_ok(),
            "the old session survived the reload"
        );
        assert!(
            before.login(ACCOUNT, "pw").await.is_ok(),
            "{}",
            mailgate.output()
        );
        mailgate.assert_not_logged("new-secret");
    })
    .await;
}
