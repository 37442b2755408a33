//! Proves the test harness against the real Dovecot, without mailgate: bearer logins straight
//! to Dovecot with curl, a refused token, mail through submission to the sink, and the auth
//! server's contract; and the secret scan every mailgate run gets.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use support::{TEST_TIMEOUT, TestUpstream, curl, with_timeout};

const USER: &str = "alice@example.test";

fn imaps_list(up: &TestUpstream, user: &str, token: &str) -> Vec<String> {
    vec![
        "--cacert".into(),
        up.ca_path(),
        format!("imaps://127.0.0.1:{}/", up.dovecot.imaps_port),
        "--login-options".into(),
        "AUTH=OAUTHBEARER".into(),
        "-u".into(),
        format!("{user}:"),
        "--oauth2-bearer".into(),
        token.into(),
        "-X".into(),
        r#"LIST "" "*""#.into(),
    ]
}

async fn run_curl(args: &[String]) -> support::CmdOutput {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaps_oauthbearer_login_lists_inbox() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let token = up.auth.grant("acct1", USER);

        let out = run_curl(&imaps_list(&up, USER, &token)).await;
        assert!(out.success(), "curl failed: {out:?}\n{}", up.dovecot.log());
        assert!(out.stdout.contains("INBOX"), "no INBOX in {out:?}");
        assert!(up.introspection.checked_tokens().contains(&token));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_starttls_oauthbearer_login_works() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let token = up.auth.grant("acct1", USER);
        let url = format!("imap://127.0.0.1:{}/", up.dovecot.imap_port);
        let ca = up.ca_path();
        let out = curl(&[
            "--ssl-reqd",
            "--cacert",
            &ca,
            &url,
            "--login-options",
            "AUTH=OAUTHBEARER",
            "-u",
            &format!("{USER}:"),
            "--oauth2-bearer",
            &token,
            "-X",
            r#"LIST "" "*""#,
        ])
        .await;
        assert!(out.success(), "curl failed: {out:?}\n{}", up.dovecot.log());
        assert!(out.stdout.contains("INBOX"), "no INBOX in {out:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_revoked_token_is_refused() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let token = up.auth.grant("acct1", USER);

        let out = run_curl(&imaps_list(&up, USER, "not-a-valid-token")).await;
        assert!(!out.success(), "wrong token accepted: {out:?}");
        assert_eq!(
            out.status,
            Some(67),
            "expected curl's login-denied exit: {out:?}"
        );

        // A valid token for another user is refused too: Dovecot compares the SASL user name.
        let out = run_curl(&imaps_list(&up, "mallory@example.test", &token)).await;
        assert_eq!(
            out.status,
            Some(67),
            "token accepted for the wrong user: {out:?}"
        );

        // Revocation takes effect at once (no auth cache).
        assert!(up.introspection.revoke(&token));
        let out = run_curl(&imaps_list(&up, USER, &token)).await;
        assert_eq!(out.status, Some(67), "revoked token accepted: {out:?}");

        // And a fresh grant works right after the failures (no auth penalty delay).
        let fresh = up.auth.grant("acct1", USER);
        let out = run_curl(&imaps_list(&up, USER, &fresh)).await;
        assert!(
            out.success(),
            "fresh token refused: {out:?}\n{}",
            up.dovecot.log()
        );
        assert!(
            up.dovecot.log().contains("oauth2"),
            "log: {}",
            up.dovecot.log()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submission_relays_to_the_sink() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let token = up.auth.grant("acct1", USER);
        let eml = up.dovecot.dir().join("msg.eml");
        std::fs::write(
            &eml,
            "From: alice@example.test\r\nTo: bob@example.test\r\nSubject: harness smoke\r\n\r\n\
             Hello from the harness.\r\n.leading dot\r\n",
        )
        .unwrap();
        let ca = up.ca_path();
        let user = format!("{USER}:");
        let eml = eml.display().to_string();
        for url in [
            format!("smtps://127.0.0.1:{}", up.dovecot.submissions_port),
            format!("smtp://127.0.0.1:{}", up.dovecot.submission_port),
        ] {
            let out = curl(&[
                &url,
                "--ssl-reqd",
                "--cacert",
                &ca,
                "--mail-from",
                USER,
                "--mail-rcpt",
                "bob@example.test",
                "--upload-file",
                &eml,
                "--login-options",
                "AUTH=OAUTHBEARER",
                "-u",
                &user,
                "--oauth2-bearer",
                &token,
            ])
            .await;
            assert!(
                out.success(),
                "curl {url} failed: {out:?}\n{}",
                up.dovecot.log()
            );
        }

        let messages = up
            .sink
            .wait_for_messages(2, Duration::from_secs(10))
            .await
            .expect("two messages at the sink");
        for message in messages {
            assert_eq!(message.from, USER);
            assert_eq!(message.rcpts, ["bob@example.test"]);
            let data = message.data_str();
            assert!(data.contains("Subject: harness smoke"), "{data}");
            assert!(data.contains("\r\n.leading dot\r\n"), "{data}");
        }
    })
    .await;
}

/// A raw HTTP/1.1 GET on a blocking socket; returns (status, body).
fn http_get(
    addr: std::net::SocketAddr,
    target: &str,
    authorization: Option<&str>,
) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_server_answers_the_contract() {
    with_timeout(TEST_TIMEOUT, async {
        let introspection = support::Introspection::start().await;
        let auth = support::AuthServer::start(Some(&introspection)).await;
        let addr = auth.addr();
        let get = |target: &'static str| {
            tokio::task::spawn_blocking(move || http_get(addr, target, None))
        };

        let token = auth.grant("acct1", USER);
        assert!(introspection.is_active(&token));
        let (status, body) = get("/token?account=acct1&proto=imap").await.unwrap();
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "user": USER, "accessToken": token })
        );

        let token2 = auth.grant_with_expiry("acct1", USER, 3600);
        assert_ne!(token, token2);
        let (_, body) = get("/token?account=acct1&proto=smtp").await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["accessToken"], token2.as_str());
        assert_eq!(json["expiresIn"], 3600);

        assert_eq!(
            get("/token?account=nobody&proto=imap").await.unwrap().0,
            404
        );
        auth.set_status("acct1", 403);
        assert_eq!(get("/token?account=acct1&proto=imap").await.unwrap().0, 403);
        auth.set_status("acct1", 500);
        assert_eq!(get("/token?account=acct1&proto=imap").await.unwrap().0, 500);

        auth.grant("slow", USER);
        auth.set_delay("slow", Some(Duration::from_millis(300)));
        let started = Instant::now();
        assert_eq!(get("/token?account=slow&proto=imap").await.unwrap().0, 200);
        assert!(started.elapsed() >= Duration::from_millis(300));

        assert_eq!(auth.requests("acct1"), 4);
        assert_eq!(auth.requests("nobody"), 1);
        assert_eq!(auth.total_requests(), 6);
        let log = auth.request_log();
        assert_eq!(log[0].proto.as_deref(), Some("imap"));
        assert_eq!(log[1].proto.as_deref(), Some("smtp"));

        // Introspection answers RFC 7662 style (through reqwest, as mailgate would talk HTTP).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let active: serde_json::Value = client
            .post(introspection.url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token2}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(active, serde_json::json!({ "active": true, "email": USER }));
        introspection.revoke(&token2);
        let inactive: serde_json::Value = client
            .post(introspection.url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token2}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(inactive, serde_json::json!({ "active": false }));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_server_basic_auth() {
    with_timeout(TEST_TIMEOUT, async {
        let auth = support::AuthServer::start_with_basic_auth(None, "mailgate", "s3cret").await;
        auth.grant("acct1", USER);
        let addr = auth.addr();
        let target = "/token?account=acct1&proto=imap";
        let (status, _) = tokio::task::spawn_blocking(move || http_get(addr, target, None))
            .await
            .unwrap();
        assert_eq!(status, 401);
        // "mailgate:s3cret" in base64.
        let (status, _) = tokio::task::spawn_blocking(move || {
            http_get(addr, target, Some("Basic bWFpbGdhdGU6czNjcmV0"))
        })
        .await
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            auth.request_log().iter().filter(|r| r.authorized).count(),
            1
        );
        assert!(
            auth.url_with_credentials()
                .contains("mailgate:s3cret@127.0.0.1:")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_stops_without_leftovers() {
    with_timeout(TEST_TIMEOUT, async {
        let mut up = TestUpstream::start().await;
        leave_a_session(&up).await;
        let started = Instant::now();
        up.dovecot.stop();
        eprintln!("dovecot stop took {:?}", started.elapsed());
        assert!(
            up.dovecot.processes().is_empty(),
            "Dovecot processes left behind"
        );
        assert!(
            !support::wait_for_port(
                support::Dovecot::addr(up.dovecot.imaps_port),
                Duration::from_millis(100)
            )
            .await
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailgate_config_helper_is_valid() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let (imap, smtp) = (support::free_port(), support::free_port());
        let yaml = up.mailgate_config(imap, smtp);
        // The library's own loader (the binary's) accepts it, CA file included.
        let path = up.dovecot.dir().join("mailgate.yaml");
        std::fs::write(&path, &yaml).unwrap();
        if let Err(e) = mailgate::config::Config::load(&path) {
            panic!("generated config refused: {e}\n{yaml}");
        }
        let addrs = support::mailgate::listen_addrs(&yaml);
        assert_eq!(
            addrs,
            [support::Dovecot::addr(imap), support::Dovecot::addr(smtp)]
        );
    })
    .await;
}

#[test]
fn the_secret_scan_finds_a_secret_in_every_form_it_may_take() {
    use base64::Engine as _;
    use support::secrets;
    let secret = "scan-me:+/ \u{e9}-42";
    secrets::remember("scan test secret", secret);
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let xoauth2 = b64(format!("user=a@b.test\x01auth=Bearer {secret}\x01\x01").as_bytes());
    let plain = b64(format!("\0acct\0{secret}").as_bytes());
    let written = [
        ("as is", format!("a\nb {secret} c")),
        (
            "percent-encoded",
            "pw=scan-me%3A%2B%2F+%C3%A9-42".to_owned(),
        ),
        (
            "percent-encoded",
            "/scan-me%3A%2B%2F%20%C3%A9-42".to_owned(),
        ),
        ("hex", "7363616e2d6d653a2b2f20c3a92d3432".to_owned()),
        ("as a byte list", format!("{:?}", secret.as_bytes())),
        ("inside base64", format!("AUTHENTICATE XOAUTH2 {xoauth2}")),
        ("inside base64", format!("auth=x{plain}")),
    ];
    for (form, text) in written {
        let leak = secrets::scan(&text).unwrap_or_else(|| panic!("not found: {text}"));
        assert_eq!((leak.kind.as_str(), leak.form), ("scan test secret", form));
    }
    assert_eq!(secrets::scan("a\nb\nsession closed").map(|l| l.kind), None);
    // Constants named *PASSWORD or *SECRET in the test sources are known without a call.
    let known = secrets::scan(support::dovecot::PASSWORD_USER_SECRET).map(|l| l.kind);
    assert_eq!(known.as_deref(), Some("test constant PASSWORD_USER_SECRET"));
    // Short strings and lone words occur by chance: not remembered.
    secrets::remember("short", "pw");
    secrets::remember("word", "password");
    assert_eq!(secrets::scan("pw password").map(|l| l.kind), None);
}

#[test]
#[should_panic(expected = "the secret scan cannot read this mailgate configuration")]
fn the_secret_scan_refuses_a_configuration_it_cannot_read() {
    support::secrets::remember_config("listeners: [ {name: imap\n  password: \"x", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailgate_run_that_logged_a_secret_fails_naming_its_kind_only() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let (imap, smtp) = (support::free_port(), support::free_port());
        let mut run = support::Mailgate::spawn(&up.mailgate_config(imap, smtp), &["check"], &[]);
        assert_eq!(run.wait_exit(Duration::from_secs(10)).await, Some(0));
        let token = up.auth.grant("acct1", USER);
        let stderr = run.stderr_path();
        std::fs::write(&stderr, format!("line one\nGET /token {token}\n")).unwrap();
        let failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run.assert_no_secret_logged();
        }))
        .expect_err("the leak is found");
        let message = failure
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            message.contains("auth-server token") || message.contains("minted token"),
            "{message}"
        );
        assert!(message.contains("stderr.log line 2"), "{message}");
        assert!(!message.contains(&token), "the message shows the secret");
        let kept = message.rsplit("output kept at ").next().unwrap();
        std::fs::remove_dir_all(std::path::Path::new(kept).parent().unwrap()).unwrap();
        // Cleaned, so that the check on drop passes.
        std::fs::write(&stderr, "").unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_graceful_stop_without_leftovers() {
    with_timeout(TEST_TIMEOUT, async {
        let mut up = TestUpstream::start().await;
        leave_a_session(&up).await;
        let started = Instant::now();
        up.dovecot.stop_gracefully();
        eprintln!("dovecot graceful stop took {:?}", started.elapsed());
        assert!(
            up.dovecot.processes().is_empty(),
            "Dovecot processes left behind"
        );
    })
    .await;
}

/// Logs in once so that Dovecot has mail processes to clean up on stop.
async fn leave_a_session(up: &TestUpstream) {
    let token = up.auth.grant("acct1", USER);
    let out = run_curl(&imaps_list(up, USER, &token)).await;
    assert!(out.success(), "{out:?}");
    assert!(!up.dovecot.processes().is_empty());
}
