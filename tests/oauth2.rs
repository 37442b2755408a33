//! End to end with mailgate's own OAuth2 client: a local OAuth2 provider (real HTTP, real
//! grants) issues tokens that the real Dovecot accepts; clients log in to mailgate with plain
//! credentials and mailgate gets, renews, rotates, stores and loses tokens as the provider says.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use support::imap_client::ImapClient;
use support::oauth2::{ClientCredential, OAuthProvider, TestKeys};
use support::process::send_signal;
use support::{Mailgate, TestUpstream, curl, curl_send_mail, eventually, free_port, with_timeout};

const MINUTE: Duration = Duration::from_secs(60);
const CLIENT: &str = "mailgate";
const CLIENT_SECRET: &str = "client-secret-4f1e";
const SCOPE: &str = "mail offline_access";
const ALICE: &str = "alice@example.test";
const BOB: &str = "bob@example.test";
const PRINTER: &str = "printer@example.test";

/// Everything a test needs: the upstream, the provider, a directory for secrets and the
/// store, and mailgate's ports.
struct Setup {
    up: TestUpstream,
    provider: OAuthProvider,
    dir: tempfile::TempDir,
    imap: u16,
    smtp: u16,
    admin: u16,
}

impl Setup {
    async fn start() -> Setup {
        let up = TestUpstream::start().await;
        let provider = OAuthProvider::start(&up.introspection).await;
        provider.add_client(CLIENT, ClientCredential::Secret(CLIENT_SECRET.to_owned()));
        provider.set_mailbox(CLIENT, PRINTER);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("client-secret"), CLIENT_SECRET).unwrap();
        // 32 bytes, base64.
        std::fs::write(
            dir.path().join("store-key"),
            "bWFpbGdhdGUtdGVzdC1zdG9yZS1rZXktMzItYnl0ZXM=\n",
        )
        .unwrap();
        Setup {
            up,
            provider,
            dir,
            imap: free_port(),
            smtp: free_port(),
            admin: free_port(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn imap_address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.imap))
    }

    /// Seeds a refresh token for `user` at the provider, as if they had consented earlier.
    fn consented(&self, user: &str) -> String {
        self.provider.issue_refresh_token(CLIENT, user, SCOPE)
    }

    /// Seeds a refresh token for `user` at the provider and puts it in mailgate's store for
    /// `account` with `mailgate accounts import --no-check` (so the provider has not seen it
    /// used yet).
    async fn onboarded(&self, config: &str, account: &str, user: &str) -> String {
        let token = self.consented(user);
        let (code, out, err) = self.import(config, account, &token, &["--no-check"]).await;
        assert_eq!(code, Some(0), "{out}{err}");
        token
    }

    /// `mailgate accounts import` of `token` for `account`, with `extra` arguments.
    async fn import(
        &self,
        config: &str,
        account: &str,
        token: &str,
        extra: &[&str],
    ) -> (Option<i32>, String, String) {
        let file = self.path(&format!("{account}.rt"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let file = file.display().to_string();
        let mut args = vec![
            "accounts",
            "import",
            "--account",
            account,
            "--refresh-token-file",
            &file,
        ];
        args.extend_from_slice(extra);
        command(config, &args).await
    }

    async fn readyz(&self) -> String {
        curl(&[
            "-w",
            " %{http_code}",
            &format!("http://127.0.0.1:{}/readyz", self.admin),
        ])
        .await
        .stdout
    }

    /// mailgate's config: the test upstream's listeners, an admin endpoint, and an OAuth2
    /// provider `local` whose `extra` lines (indented six spaces) and `accounts` are given.
    fn config(&self, provider_extra: &str, accounts: &str, tail: &str) -> String {
        let listeners = self.up.mailgate_config(self.imap, self.smtp);
        let listeners = listeners.split("tokens:").next().unwrap();
        format!(
            r#"{listeners}admin: {{ listen: "127.0.0.1:{admin}" }}
tokens:
  oauth2:
    timeout: 5s
    store: {{ dir: "{store}", key_file: "{key}" }}
    providers:
      local:
        preset: custom
        token_url: "{token_url}"
        authorize_url: "{authorize_url}"
        device_url: "{device_url}"
        client_id: {CLIENT}
        scope: "{SCOPE}"
{provider_extra}    accounts:
{accounts}{tail}"#,
            admin = self.admin,
            store = self.path("tokens").display(),
            key = self.path("store-key").display(),
            token_url = self.provider.token_url(),
            authorize_url = self.provider.authorize_url(),
            device_url = self.provider.device_url(),
        )
    }

    /// The config most tests use: `alice` as the one `refresh_token` account, the client
    /// secret sent in the form body, and `tail`.
    fn alice_config(&self, tail: &str) -> String {
        self.config(
            &self.secret("post"),
            &account("alice", "refresh_token", ALICE),
            tail,
        )
    }

    /// The provider with a client secret sent as `method`.
    fn secret(&self, method: &str) -> String {
        format!(
            "        client_secret_file: \"{}\"\n        client_auth_method: {method}\n",
            self.path("client-secret").display()
        )
    }

    async fn metrics(&self) -> String {
        curl(&[&format!("http://127.0.0.1:{}/metrics", self.admin)])
            .await
            .stdout
    }
}

fn account(id: &str, grant: &str, user: &str) -> String {
    format!("      {id}: {{ provider: local, grant: {grant}, user: \"{user}\" }}\n")
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn imap_login(
    address: SocketAddr,
    account: &str,
) -> (ImapClient, support::imap_client::Completion) {
    let mut client = ImapClient::connect(address).await;
    let login = client.login(account, "any-password").await;
    (client, login)
}

/// Runs `mailgate ARGS --config FILE` to completion; returns its exit code and stdout.
async fn command(config: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut run = Mailgate::spawn(config, args, &[]);
    let code = run.wait_exit(MINUTE).await;
    (code, run.stdout(), run.stderr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_log_in_over_imap_and_smtp_with_post_and_basic() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        for (method, protocol) in [("post", "imap"), ("basic", "smtp")] {
            let config = s.config(
                &s.secret(method),
                &account("printer", "client_credentials", PRINTER),
                "",
            );
            let mailgate = Mailgate::start_with_env(&config, &[("RUST_LOG", "trace")]).await;
            if protocol == "imap" {
                let (mut client, login) = imap_login(s.imap_address(), "printer").await;
                assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
                assert!(client.command("SELECT INBOX").await.is_ok());
            } else {
                let message = s.path("note.eml");
                std::fs::write(&message, "Subject: from the printer\r\n\r\nscan\r\n").unwrap();
                let smtp = SocketAddr::from(([127, 0, 0, 1], s.smtp));
                let out =
                    curl_send_mail(smtp, "printer:x", PRINTER, "boss@example.test", &message).await;
                assert!(out.success(), "{out:?}\n{}", mailgate.output());
                let received = s.up.sink.wait_for_message(Duration::from_secs(10)).await;
                assert!(received.data_str().contains("from the printer"));
            }
            let request = s.provider.token_requests().pop().unwrap();
            assert_eq!(request.grant_type, "client_credentials");
            assert_eq!(request.client_auth.as_str(), method);
            assert_eq!(request.scope.as_deref(), Some(SCOPE));
            // Nothing secret in the trace-level log.
            mailgate.assert_not_logged(CLIENT_SECRET);
            mailgate.assert_not_logged(request.access_token.as_deref().unwrap());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_assertion_and_a_service_account_get_tokens() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let keys = TestKeys::rsa(s.dir.path()).await;
        s.provider.add_client(
            "cert-app",
            ClientCredential::Certificate {
                cert_der: keys.cert_der_bytes(),
            },
        );
        s.provider.set_mailbox("cert-app", PRINTER);
        let service = "mailer@project.iam.example";
        s.provider
            .add_service_account(service, &keys.public_key_der_bytes());
        let key_file = keys.service_account_json(service, &s.provider.token_url());
        let config = s
            .config(
                &format!(
                    "        client_certificate: {{ cert_file: \"{}\", key_file: \"{}\" }}\n      google-like:\n        preset: custom\n        token_url: \"{}\"\n        service_account_file: \"{}\"\n        scope: \"https://mail.google.com/\"\n",
                    keys.cert_pem.display(),
                    keys.key_pkcs1_pem.display(),
                    s.provider.token_url(),
                    key_file.display()
                ),
                &format!(
                    "{}      delegated: {{ provider: google-like, grant: jwt_bearer, user: \"{BOB}\" }}\n",
                    account("printer", "client_credentials", PRINTER)
                ),
                "",
            )
            .replace("client_id: mailgate", "client_id: cert-app");
        let mailgate = Mailgate::start(&config).await;
        for account in ["printer", "delegated"] {
            let (_client, login) = imap_login(s.imap_address(), account).await;
            assert!(login.is_ok(), "{account}: {login:?}\n{}", mailgate.output());
        }
        let requests = s.provider.token_requests();
        assert_eq!(requests[0].client_auth.as_str(), "assertion");
        assert_eq!(requests[0].client_id.as_deref(), Some("cert-app"));
        assert_eq!(requests[1].grant_type, "urn:ietf:params:oauth:grant-type:jwt-bearer");
        assert_eq!(requests[1].user.as_deref(), Some(BOB));
        assert!(requests.iter().all(|r| r.result == "ok"), "{requests:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_in_use_are_renewed_so_logins_never_wait_on_the_provider() {
    with_timeout(2 * MINUTE, async {
        let s = Setup::start().await;
        s.provider
            .set_access_token_lifetime(Duration::from_secs(20));
        let config = s.alice_config("  cache: { refresh_margin: 10s }\n");
        s.onboarded(&config, "alice", ALICE).await;
        let mailgate = Mailgate::start(&config).await;
        // A login every five seconds for a minute.
        for _ in 0..12 {
            let (_client, login) = imap_login(s.imap_address(), "alice").await;
            assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let text = s.metrics().await;
        // Only the very first login waited for a token; the others found a renewed one.
        assert_eq!(
            metric(&text, "mailgate_token_cache_total{result=\"miss\"}"),
            1.0,
            "{text}"
        );
        assert!(
            metric(&text, "mailgate_token_refreshes_ahead_total{result=\"ok\"}") >= 6.0,
            "{text}"
        );
        assert!(s.provider.count("refresh_token") >= 7);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_survives_a_restart() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let config = s.alice_config("");
        let first = s.onboarded(&config, "alice", ALICE).await;
        let trace = [("RUST_LOG", "trace")];
        let mut mailgate = Mailgate::start_with_env(&config, &trace).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
        let rotated = s.provider.current_refresh_token(ALICE, CLIENT).unwrap();
        let store_key = std::fs::read_to_string(s.path("store-key")).unwrap();
        for secret in [&first, &rotated, store_key.trim(), CLIENT_SECRET] {
            mailgate.assert_not_logged(secret);
        }
        for issued in s.provider.access_tokens_issued(ALICE) {
            mailgate.assert_not_logged(&issued);
        }
        assert_ne!(rotated, first);
        let stored = std::fs::read(s.path("tokens").join("alice.token")).unwrap();
        assert!(
            !String::from_utf8_lossy(&stored).contains(&rotated),
            "stored in clear"
        );
        mailgate.stop();

        let mailgate = Mailgate::start(&config).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
        let last = s.provider.token_requests().pop().unwrap();
        assert_eq!(last.refresh_token.as_deref(), Some(rotated.as_str()));
        assert_eq!(last.result, "ok");
    })
    .await;
}

/// Starts mailgate, has a login's refresh reach the provider (which the caller holds), and
/// kills mailgate there with SIGKILL; the login's task.
async fn killed_during_a_refresh(
    s: &Setup,
    config: &str,
) -> tokio::task::JoinHandle<support::imap_client::Completion> {
    let mut mailgate = Mailgate::start(config).await;
    let address = s.imap_address();
    let login = tokio::spawn(async move { imap_login(address, "alice").await.1 });
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.provider.held_requests() == 1
        })
        .await,
        "the refresh never reached the provider"
    );
    send_signal(mailgate.pid().unwrap(), "KILL");
    mailgate.wait_exit(Duration::from_secs(5)).await;
    login
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_while_the_provider_answers_loses_no_token() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let config = s.alice_config("");
        let first = s.onboarded(&config, "alice", ALICE).await;
        let hold = s.provider.hold();
        let login = killed_during_a_refresh(&s, &config).await;
        // The provider notices the closed connection on its own time: releasing the hold
        // before it has would answer a request nobody reads.
        let abandoned = eventually(Duration::from_secs(10), || async {
            s.provider
                .token_requests()
                .iter()
                .any(|r| r.result == "abandoned")
        })
        .await;
        assert!(abandoned, "the provider never saw the request abandoned");
        drop(hold);
        let _ = login.await;

        let mailgate = Mailgate::start(&config).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
        let requests = s.provider.token_requests();
        let results: Vec<&str> = requests.iter().map(|r| r.result.as_str()).collect();
        assert_eq!(results, ["abandoned", "ok"]);
        assert_eq!(requests[1].refresh_token.as_deref(), Some(first.as_str()));
    })
    .await;
}

/// The window no client can close: the provider rotated the token, and mailgate died before
/// the answer reached it. The account then needs re-authorization, cleanly: said at the next
/// login, in `accounts`, and fixed by authorizing it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_after_the_provider_rotated_needs_reauthorization_cleanly() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let config = s.alice_config("");
        let first = s.onboarded(&config, "alice", ALICE).await;
        let hold = s.provider.hold_answers();
        let login = killed_during_a_refresh(&s, &config).await;
        drop(hold);
        let _ = login.await;
        let requests = s.provider.token_requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(
            requests[0].result, "ok",
            "the provider committed the rotation"
        );
        assert_ne!(
            s.provider.current_refresh_token(ALICE, CLIENT).as_deref(),
            Some(first.as_str()),
            "the provider rotated the token"
        );

        let mailgate = Mailgate::start(&config).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(
            login
                .tagged
                .contains("NO [AUTHENTICATIONFAILED] account needs re-authorization"),
            "{login:?}\n{}",
            mailgate.output()
        );
        assert_eq!(
            account_row(&config, "alice").await["state"],
            "needs_reauthorization"
        );
        s.onboarded(&config, "alice", ALICE).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_ends_that_accounts_sessions_and_spares_the_others() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        // Short tokens, so that renewal (and with it the refusal) comes within seconds.
        s.provider.set_access_token_lifetime(Duration::from_secs(6));
        let accounts =
            account("alice", "refresh_token", ALICE) + &account("bob", "refresh_token", BOB);
        let config = s.config(
            &s.secret("post"),
            &accounts,
            "  cache: { refresh_margin: 2s }\n",
        );
        s.onboarded(&config, "alice", ALICE).await;
        s.onboarded(&config, "bob", BOB).await;
        let mailgate = Mailgate::start(&config).await;
        let (mut alice, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.is_ok(), "{login:?}");
        let (mut bob, login) = imap_login(s.imap_address(), "bob").await;
        assert!(login.is_ok(), "{login:?}");
        assert!(alice.command("SELECT INBOX").await.is_ok());

        s.provider.revoke_refresh_tokens(ALICE);
        let bye = alice.line().await;
        assert_eq!(
            bye,
            "* BYE Access to this account was revoked; log in again\r\n",
            "{}",
            mailgate.output()
        );
        assert!(bob.command("NOOP").await.is_ok(), "bob's session goes on");

        let (_client, again) = imap_login(s.imap_address(), "alice").await;
        assert_eq!(
            again.tagged,
            "t1 NO [AUTHENTICATIONFAILED] account needs re-authorization"
        );
        let (_client, other) = imap_login(s.imap_address(), "bob").await;
        assert!(other.is_ok());
        let text = s.metrics().await;
        assert_eq!(
            metric(&text, "mailgate_sessions_revoked_total"),
            1.0,
            "{text}"
        );
        assert_eq!(
            metric(
                &text,
                "mailgate_oauth2_accounts{state=\"needs_reauthorization\"}"
            ),
            1.0
        );
        assert_eq!(
            metric(
                &text,
                "mailgate_logins_total{listener=\"imap\",result=\"needs_reauthorization\"}"
            ),
            1.0
        );
        assert!(mailgate.output().contains("needs re-authorization"));

        let (code, listing, _) = command(&config, &["accounts"]).await;
        assert_eq!(code, Some(0));
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with("alice") && l.contains("needs re-authorization")),
            "{listing}\n{}\n{:?}",
            mailgate.output(),
            s.provider.token_requests()
        );
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with("bob") && l.contains(" ok")),
            "{listing}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_outage_is_a_temporary_failure_until_it_recovers() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let config = s.alice_config("");
        s.onboarded(&config, "alice", ALICE).await;
        let mailgate = Mailgate::start(&config).await;
        s.provider.fail_next(1, 500, "server_error");
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.tagged.contains("NO [UNAVAILABLE]"), "{login:?}");
        let recovered = eventually(Duration::from_secs(10), || async {
            imap_login(s.imap_address(), "alice").await.1.is_ok()
        })
        .await;
        assert!(recovered, "{}", mailgate.output());
        // The refresh token survived the outage.
        assert!(s.provider.token_requests().iter().any(|r| r.result == "ok"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_store_key_or_a_corrupted_file_fails_that_account_only() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let accounts = account("alice", "refresh_token", ALICE)
            + &account("printer", "client_credentials", PRINTER);
        let config = s.config(&s.secret("post"), &accounts, "");
        let token = s.onboarded(&config, "alice", ALICE).await;

        // Another key: alice's file no longer decrypts; the printer is unaffected.
        std::fs::write(
            s.path("other-key"),
            "b3RoZXItbWFpbGdhdGUtc3RvcmUta2V5LTMyLWJ5dGU=\n",
        )
        .unwrap();
        let wrong = config.replace("store-key", "other-key");
        let mailgate = Mailgate::start(&wrong).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.tagged.contains("NO [UNAVAILABLE]"), "{login:?}");
        let (_client, login) = imap_login(s.imap_address(), "printer").await;
        assert!(login.is_ok());
        assert!(
            mailgate.output().contains("does not decrypt"),
            "{}",
            mailgate.output()
        );
        let (_, listing, _) = command(&wrong, &["accounts"]).await;
        assert!(listing.contains("store error"), "{listing}");
        drop(mailgate);

        std::fs::write(s.path("tokens").join("alice.token"), b"MGT1 garbage").unwrap();
        let mailgate = Mailgate::start(&config).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.tagged.contains("NO [UNAVAILABLE]"), "{login:?}");
        assert!(
            mailgate.output().contains("corrupted"),
            "{}",
            mailgate.output()
        );
        mailgate.assert_not_logged(&token);
    })
    .await;
}

/// Plain HTTP with redirects left to the test.
fn browser() -> reqwest::Client {
    mailgate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Follows the authorization URL through the provider's consent page (approving) and returns
/// where the provider redirects the browser.
async fn consent(url: &str) -> String {
    let browser = browser();
    let page = browser.get(url).send().await.unwrap().text().await.unwrap();
    let mut form = support::oauth2::hidden_fields(&page);
    form.push(("decision".to_owned(), "approve".to_owned()));
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let answer = browser
        .post(url.split('?').next().unwrap())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 302, "{:?}", answer.text().await);
    answer.headers()["location"].to_str().unwrap().to_owned()
}

/// Starts `mailgate authorize` and returns it with the URL it printed.
async fn authorize(config: &str) -> (Mailgate, String) {
    let run = Mailgate::spawn(config, &["authorize", "--account", "alice"], &[]);
    let mut url = None;
    for _ in 0..100 {
        url = run.stdout().lines().find_map(|l| {
            l.trim()
                .strip_prefix("http")
                .map(|rest| format!("http{rest}"))
        });
        if url.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = url.unwrap_or_else(|| panic!("no URL printed:\n{}", run.output()));
    (run, url)
}

/// Issue 13 item 16: a forged redirect used to end the flow (exit 1) and tell the browser
/// it worked; now it gets 400 and the real redirect still completes the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_runs_the_code_flow_with_pkce_and_refuses_a_forged_state() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let redirect = format!("http://127.0.0.1:{}/callback", free_port());
        s.provider
            .add_client("public-app", ClientCredential::Public);
        s.provider.add_redirect_uri("public-app", &redirect);
        s.provider.set_consenting_user(ALICE);
        let config = s
            .config(
                &format!("        redirect_url: \"{redirect}\"\n"),
                &account("alice", "refresh_token", ALICE),
                "",
            )
            .replace("client_id: mailgate", "client_id: public-app");

        let (mut run, url) = authorize(&config).await;
        assert!(
            url.contains("code_challenge_method=S256") && url.contains("state="),
            "{url}"
        );
        let location = consent(&url).await;
        // A forged code, a forged error and an error without state are refused; the run waits on.
        let forged_error = format!("{redirect}?error=access_denied&state=forged");
        let stateless_error = format!("{redirect}?error=access_denied");
        for forged in [
            regex_replace_state(&location, "forged"),
            forged_error,
            stateless_error,
        ] {
            let page = browser().get(&forged).send().await.unwrap();
            assert_eq!(page.status(), 400, "{forged}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            run.wait_exit(Duration::ZERO).await,
            None,
            "{}",
            run.output()
        );
        assert!(!s.path("tokens").join("alice.token").exists());

        // The real redirect completes the flow; alice can then log in through mailgate.
        let page = browser().get(&location).send().await.unwrap();
        assert_eq!(page.status(), 200);
        assert_eq!(
            run.wait_exit(Duration::from_secs(10)).await,
            Some(0),
            "{}",
            run.output()
        );
        let exchange = s.provider.token_requests().pop().unwrap();
        assert_eq!(exchange.grant_type, "authorization_code");
        assert_eq!(exchange.result, "ok");
        let mailgate = Mailgate::start(&config).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
    })
    .await;
}

/// Issue 13 item 16: without a redirect URL, `authorize` said only "no redirect_url" and
/// exited 1; it says what to add, or to use `--device`, and exits 64 like `check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_without_a_redirect_url_says_what_to_add() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let config = s.config("", &account("alice", "refresh_token", ALICE), "");
        let (code, _, err) = command(&config, &["authorize", "--account", "alice"]).await;
        assert_eq!(code, Some(64), "{err}");
        assert!(
            err.contains("redirect_url: http://localhost:8400/callback")
                && err.contains("tokens.oauth2.providers.local")
                && err.contains("--device"),
            "{err}"
        );
    })
    .await;
}

/// Issue 13 item 16: network errors said only "connection failed"; they name the host and
/// the kind (refused, untrusted certificate, timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_names_the_host_and_kind_of_a_network_error() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cases = [
            (
                format!("http://127.0.0.1:{}/device", free_port()),
                "connection refused",
            ),
            (
                format!("https://localhost:{}/device", s.up.dovecot.imaps_port),
                "certificate not trusted",
            ),
            (
                format!(
                    "http://127.0.0.1:{}/device",
                    silent.local_addr().unwrap().port()
                ),
                "timed out",
            ),
        ];
        for (device_url, kind) in cases {
            let config = s
                .config(
                    &s.secret("post"),
                    &account("alice", "refresh_token", ALICE),
                    "",
                )
                .replace(&s.provider.device_url(), &device_url)
                .replace("timeout: 5s", "timeout: 1s");
            let (code, out, err) =
                command(&config, &["authorize", "--account", "alice", "--device"]).await;
            assert_eq!(code, Some(1), "{out}{err}");
            let host = url::Url::parse(&device_url)
                .unwrap()
                .host_str()
                .unwrap()
                .to_owned();
            assert!(
                err.contains(&format!("{host}: {kind}")),
                "{device_url}: {err}"
            );
        }
    })
    .await;
}

/// `location` with its `state` parameter replaced.
fn regex_replace_state(location: &str, state: &str) -> String {
    let mut url = url::Url::parse(location).unwrap();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" {
                state.to_owned()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    url.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_device_waits_through_pending_and_slow_down() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        s.provider.set_device_interval(1);
        let config = s.alice_config("");
        let mut run = Mailgate::spawn(
            &config,
            &["authorize", "--account", "alice", "--device"],
            &[],
        );
        let code = async {
            loop {
                if let Some(code) = s.provider.pending_user_codes().pop() {
                    return code;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let user_code = tokio::time::timeout(Duration::from_secs(10), code)
            .await
            .expect("a device code");
        // Let it poll while pending, then ask it to slow down once.
        assert!(
            eventually(Duration::from_secs(10), || async {
                s.provider
                    .count("urn:ietf:params:oauth:grant-type:device_code")
                    >= 2
            })
            .await
        );
        s.provider.fail_next(1, 400, "slow_down");
        assert!(
            eventually(Duration::from_secs(10), || async {
                s.provider
                    .token_requests()
                    .iter()
                    .any(|r| r.result == "slow_down")
            })
            .await
        );
        assert!(s.provider.approve_device(&user_code, ALICE));
        assert_eq!(
            run.wait_exit(Duration::from_secs(30)).await,
            Some(0),
            "{}",
            run.output()
        );
        assert!(
            run.stdout().contains(&user_code),
            "the code was shown:\n{}",
            run.stdout()
        );
        let results: Vec<String> = s
            .provider
            .token_requests()
            .into_iter()
            .map(|r| r.result)
            .collect();
        assert!(
            results.contains(&"authorization_pending".to_owned()),
            "{results:?}"
        );
        assert_eq!(results.last().map(String::as_str), Some("ok"));
        let mailgate = Mailgate::start(&config).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_test_login_describe_without_secrets() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let accounts = account("alice", "refresh_token", ALICE)
            + &account("printer", "client_credentials", PRINTER)
            + &account("newbie", "refresh_token", BOB);
        let config = s.config(&s.secret("basic"), &accounts, "");
        let token = s.onboarded(&config, "alice", ALICE).await;
        let file = s.path("alice.rt").display().to_string();
        let (code, _, err) = command(
            &config,
            &[
                "accounts",
                "import",
                "--account",
                "printer",
                "--refresh-token-file",
                &file,
            ],
        )
        .await;
        assert_eq!(
            code,
            Some(64),
            "a client_credentials account takes no refresh token: {err}"
        );

        let (code, listing, _) = command(&config, &["accounts"]).await;
        assert_eq!(code, Some(0));
        let line = |id: &str| {
            listing
                .lines()
                .find(|l| l.starts_with(id))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(
            line("alice").contains("oauth2/local") && line("alice").contains("refresh_token"),
            "{listing}"
        );
        assert!(line("printer").contains("client_credentials"), "{listing}");
        assert!(line("newbie").contains("never authorized"), "{listing}");
        let (_, json, _) = command(&config, &["accounts", "--json"]).await;
        let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
        let newbie = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["account"] == "newbie");
        assert_eq!(newbie.unwrap()["state"], "never_authorized", "{json}");

        let (code, report, _) =
            command(&config, &["test-login", "alice", "--listener", "imap"]).await;
        assert_eq!(code, Some(0), "{report}");
        assert!(
            report.contains("1. Token for alice from OAuth2 provider local"),
            "{report}"
        );
        assert!(report.contains(&format!("user {ALICE}")), "{report}");
        assert!(report.contains("upstream capabilities"), "{report}");
        assert!(report.contains("authenticating upstream"), "{report}");
        assert!(report.contains("ok: the upstream answered: OK"), "{report}");
        let (code, report, _) =
            command(&config, &["test-login", "newbie", "--listener", "smtp"]).await;
        assert_eq!(code, Some(1));
        assert!(
            report.contains("mailgate authorize --account newbie"),
            "{report}"
        );
        for output in [&listing, &json, &report] {
            assert!(!output.contains(&token) && !output.contains(CLIENT_SECRET));
        }
        for issued in s.provider.access_tokens_issued(ALICE) {
            assert!(!report.contains(&issued));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_by_another_process_is_picked_up_from_the_store() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        s.provider.set_access_token_lifetime(Duration::from_secs(6));
        let config = s.alice_config("  cache: { refresh_margin: 2s }\n");
        s.onboarded(&config, "alice", ALICE).await;
        let mailgate = Mailgate::start(&config).await;
        let (mut session, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.is_ok(), "{login:?}");
        // A second process redeems (and so rotates) the refresh token the service holds.
        let (code, report, _) =
            command(&config, &["test-login", "alice", "--listener", "imap"]).await;
        assert_eq!(code, Some(0), "{report}");
        let rotated = s.provider.current_refresh_token(ALICE, CLIENT).unwrap();
        // The service's next renewal finds its token used, takes the stored one, and goes on.
        let renewed = eventually(Duration::from_secs(20), || async {
            s.provider.token_requests().last().is_some_and(|last| {
                last.result == "ok" && last.refresh_token.as_deref() == Some(rotated.as_str())
            })
        })
        .await;
        assert!(
            renewed,
            "{:?}\n{}",
            s.provider.token_requests(),
            mailgate.output()
        );
        assert!(
            session.command("NOOP").await.is_ok(),
            "the session was not revoked"
        );
        let (_client, again) = imap_login(s.imap_address(), "alice").await;
        assert!(again.is_ok(), "{again:?}");
    })
    .await;
}

/// Runs `mailgate accounts --json` and returns the row of `id`.
async fn account_row(config: &str, id: &str) -> serde_json::Value {
    let (code, json, err) = command(config, &["accounts", "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|row| row["account"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no {id} in {json}"))
}

/// An account re-authorized by another process while the service runs (here an import) is
/// what the service redeems next; before, the service redeemed the token it held in memory and
/// wrote it back over the new one.
async fn a_reauthorization_is_what_the_service_redeems_next(rotation: bool) {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        s.provider.set_rotation(rotation);
        s.provider.set_access_token_lifetime(Duration::from_secs(5));
        let config = s.alice_config("  cache: { refresh_margin: 2s }\n");
        s.onboarded(&config, "alice", ALICE).await;
        let mailgate = Mailgate::start(&config).await;
        let (mut session, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.is_ok(), "{login:?}");
        let fresh = s.consented(ALICE);
        let (code, out, err) = s.import(&config, "alice", &fresh, &["--no-check"]).await;
        assert_eq!(code, Some(0), "{out}{err}");
        let imported_at = s.provider.token_requests().len();
        // The session keeps the account in use, so its token is renewed ahead of expiry.
        let renewed = eventually(Duration::from_secs(20), || async {
            s.provider.token_requests().len() > imported_at
        })
        .await;
        assert!(renewed, "no renewal\n{}", mailgate.output());
        let next = s.provider.token_requests()[imported_at].clone();
        assert_eq!(
            next.refresh_token.as_deref(),
            Some(fresh.as_str()),
            "the service redeemed its own copy, undoing the import"
        );
        assert_eq!(next.result, "ok");
        assert!(session.command("NOOP").await.is_ok());
        // And the store still holds the new authorization's line: a restart logs in with it.
        drop(mailgate);
        let current = s.provider.current_refresh_token(ALICE, CLIENT).unwrap();
        let _mailgate = Mailgate::start(&config).await;
        let (_client, again) = imap_login(s.imap_address(), "alice").await;
        assert!(again.is_ok(), "{again:?}");
        let last = s.provider.token_requests().pop().unwrap();
        let expected = if rotation { current } else { fresh };
        assert_eq!(last.refresh_token.as_deref(), Some(expected.as_str()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reauthorization_with_rotation_is_not_undone_by_the_running_service() {
    a_reauthorization_is_what_the_service_redeems_next(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reauthorization_without_rotation_is_not_undone_by_the_running_service() {
    a_reauthorization_is_what_the_service_redeems_next(false).await;
}

/// Two processes on one store never redeem the same refresh token: `test-login` waits for
/// the service's refresh (the account's lease) and then redeems the token it rotated to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_waits_for_the_refresh_under_way_and_redeems_the_next_token() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let config = s.alice_config("");
        s.onboarded(&config, "alice", ALICE).await;
        let mailgate = Mailgate::start(&config).await;
        let hold = s.provider.hold();
        let address = s.imap_address();
        let login = tokio::spawn(async move { imap_login(address, "alice").await.1 });
        assert!(
            eventually(Duration::from_secs(10), || async {
                s.provider.held_requests() == 1
            })
            .await
        );
        let test_login = {
            let config = config.clone();
            tokio::spawn(async move {
                command(&config, &["test-login", "alice", "--listener", "imap"]).await
            })
        };
        // test-login waits for the lease: it sends nothing while the service's refresh runs.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(s.provider.held_requests(), 1);
        drop(hold);
        assert!(login.await.unwrap().is_ok(), "{}", mailgate.output());
        let (code, report, err) = test_login.await.unwrap();
        assert_eq!(code, Some(0), "{report}{err}");
        let requests = s.provider.token_requests();
        let redeemed: Vec<_> = requests
            .iter()
            .map(|r| (r.refresh_token.clone(), r.result.as_str()))
            .collect();
        assert_eq!(redeemed.len(), 2, "{redeemed:?}");
        assert_ne!(redeemed[0].0, redeemed[1].0, "one token redeemed twice");
        assert!(
            redeemed.iter().all(|(_, result)| *result == "ok"),
            "{redeemed:?}"
        );
    })
    .await;
}

/// Makes a directory immutable (`chattr +i`: even root cannot create files in it) until
/// dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &std::path::Path) -> Immutable {
        chattr("+i", dir);
        Immutable(dir.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, dir: &std::path::Path) {
    let status = std::process::Command::new("chattr")
        .arg(flag)
        .arg(dir)
        .status()
        .expect("chattr (e2fsprogs)");
    assert!(status.success(), "chattr {flag} {}", dir.display());
}

/// A rotated refresh token the store refused stays in use, is shown (readiness, metrics),
/// is written once the store takes it again, and is written at shutdown: it is never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_store_write_is_retried_shown_and_done_at_shutdown() {
    with_timeout(2 * MINUTE, async {
        let s = Setup::start().await;
        s.provider.set_access_token_lifetime(Duration::from_secs(5));
        let config = s.alice_config("  cache: { refresh_margin: 2s }\n");
        s.onboarded(&config, "alice", ALICE).await;
        let mut mailgate = Mailgate::start(&config).await;
        let unsaved =
            || async { metric(&s.metrics().await, "mailgate_token_store_unsaved_accounts") };
        let failures = || async {
            metric(
                &s.metrics().await,
                "mailgate_token_store_write_failures_total",
            )
        };

        // The store refuses writes; the rotated token serves the login from memory.
        let immutable = Immutable::set(&s.path("tokens"));
        let (mut session, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
        assert_eq!(unsaved().await, 1.0);
        let ready = s.readyz().await;
        assert!(
            ready.ends_with(" 503") && ready.contains("token store"),
            "{ready}"
        );
        // Retried with backoff, and taken once the store is writable again.
        assert!(
            eventually(Duration::from_secs(10), || async {
                failures().await >= 2.0
            })
            .await
        );
        drop(immutable);
        assert!(
            eventually(Duration::from_secs(20), || async { unsaved().await == 0.0 }).await,
            "{}",
            mailgate.output()
        );
        assert!(s.readyz().await.ends_with(" 200"));

        // Refused again at the next renewal; the store becomes writable only as the service
        // stops: the shutdown writes it.
        let immutable = Immutable::set(&s.path("tokens"));
        let before = failures().await;
        assert!(
            eventually(Duration::from_secs(20), || async {
                failures().await >= before + 2.0
            })
            .await,
            "{}",
            mailgate.output()
        );
        assert!(session.command("NOOP").await.is_ok());
        drop(immutable);
        send_signal(mailgate.pid().unwrap(), "TERM");
        mailgate.wait_exit(Duration::from_secs(20)).await;
        drop(session);
        // The last token the provider rotated to, whichever renewal that was.
        let rotated = s.provider.current_refresh_token(ALICE, CLIENT).unwrap();

        let mailgate = Mailgate::start(&config).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
        let last = s.provider.token_requests().pop().unwrap();
        assert_eq!(last.refresh_token.as_deref(), Some(rotated.as_str()));
        assert_eq!(last.result, "ok");
    })
    .await;
}

/// A provider refusing mailgate's own settings is the operator's problem: a permanent
/// failure for the client (no endless retries), `misconfigured` in `accounts`, a metric and
/// a log line with the provider's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_configuration_is_a_permanent_misconfigured_failure() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let accounts = account("printer", "client_credentials", PRINTER)
            + &account("alice", "refresh_token", ALICE);
        std::fs::write(s.path("wrong-secret"), "not-the-client-secret").unwrap();
        let config = s
            .config(&s.secret("post"), &accounts, "")
            .replace("client-secret", "wrong-secret");
        s.onboarded(&config, "alice", ALICE).await;
        let mailgate = Mailgate::start(&config).await;
        let (_client, login) = imap_login(s.imap_address(), "printer").await;
        assert!(
            login.tagged.contains("NO [CONTACTADMIN]"),
            "{login:?}\n{}",
            mailgate.output()
        );
        let reply = smtp_auth_plain(SocketAddr::from(([127, 0, 0, 1], s.smtp)), "printer").await;
        assert!(reply.starts_with("535 5.3.5"), "{reply}");
        // A refresh-token account with a refused client keeps its refresh token.
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(login.tagged.contains("NO [CONTACTADMIN]"), "{login:?}");
        let metrics = s.metrics().await;
        assert_eq!(
            metric(
                &metrics,
                "mailgate_oauth2_accounts{state=\"misconfigured\"}"
            ),
            2.0,
            "{metrics}"
        );
        assert!(
            mailgate
                .output()
                .contains("refuses this account's OAuth2 settings"),
            "{}",
            mailgate.output()
        );
        assert!(mailgate.output().contains("invalid_client"));
        drop(mailgate);

        // Fixed: both log in, alice with the refresh token she had.
        let mailgate = Mailgate::start(&s.config(&s.secret("post"), &accounts, "")).await;
        for id in ["printer", "alice"] {
            let (_client, login) = imap_login(s.imap_address(), id).await;
            assert!(login.is_ok(), "{id}: {login:?}\n{}", mailgate.output());
        }

        // A client-credentials grant refused outright (invalid_grant) is no temporary outage.
        drop(mailgate);
        let config = s.config(&s.secret("post"), &accounts, "");
        let _mailgate = Mailgate::start(&config).await;
        s.provider.fail_next(1, 400, "invalid_grant");
        let (_client, login) = imap_login(s.imap_address(), "printer").await;
        assert!(login.tagged.contains("NO [CONTACTADMIN]"), "{login:?}");
    })
    .await;
}

/// `test-login` redeems the refresh token in its own process, and the provider rotates it
/// there: a store write that fails must not end that process with the rotated token only in
/// its memory (the service would then find the store's token spent). Here the store takes
/// writes again right after the first one failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_login_does_not_exit_with_a_rotated_token_the_store_refused() {
    with_timeout(2 * MINUTE, async {
        let s = Setup::start().await;
        let config = s.alice_config("");
        let first = s.onboarded(&config, "alice", ALICE).await;
        let immutable = Immutable::set(&s.path("tokens"));
        let mut run = Mailgate::spawn(&config, &["test-login", "alice", "--listener", "imap"], &[]);
        let refused = eventually(Duration::from_secs(20), || async {
            run.output().contains("cannot write the token store")
        })
        .await;
        drop(immutable);
        assert!(refused, "the write was not refused:\n{}", run.output());
        let code = run.wait_exit(MINUTE).await;
        assert_ne!(
            s.provider.current_refresh_token(ALICE, CLIENT).as_deref(),
            Some(first.as_str()),
            "the provider rotated the token"
        );

        let mailgate = Mailgate::start(&config).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(
            login.is_ok(),
            "test-login exited with {code:?} and lost the rotated token:\n{}\n{login:?}\n{}",
            run.output(),
            mailgate.output()
        );
    })
    .await;
}

/// A session accepted before SIGTERM may still log in during the grace period; if the store
/// refuses the rotated token that login brought, it must still be written before the process
/// exits (the store takes writes again by the time the session ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_during_the_grace_period_is_written_before_exit() {
    with_timeout(2 * MINUTE, async {
        let s = Setup::start().await;
        let config = s.alice_config("drain_delay: 0s\nshutdown_grace: 20s\n");
        s.onboarded(&config, "alice", ALICE).await;
        let mut mailgate = Mailgate::start(&config).await;
        let mut client = ImapClient::connect(s.imap_address()).await;
        send_signal(mailgate.pid().unwrap(), "TERM");
        assert!(
            eventually(Duration::from_secs(10), || async {
                mailgate.output().contains("draining")
            })
            .await,
            "{}",
            mailgate.output()
        );
        let immutable = Immutable::set(&s.path("tokens"));
        let login = client.login("alice", "any-password").await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
        assert!(
            mailgate.output().contains("cannot write the token store"),
            "{}",
            mailgate.output()
        );
        drop(immutable);
        drop(client);
        mailgate.wait_exit(Duration::from_secs(30)).await;
        let rotated = s.provider.current_refresh_token(ALICE, CLIENT).unwrap();

        let mailgate = Mailgate::start(&config).await;
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        let last = s.provider.token_requests().pop().unwrap();
        assert!(
            login.is_ok() && last.refresh_token.as_deref() == Some(rotated.as_str()),
            "the token rotated during the grace period was lost: {login:?}\n{}",
            mailgate.output()
        );
    })
    .await;
}

/// The operator fixes a refused client setting and reloads: the fix applies at once, not
/// after the backoff the wrong setting earned (that backoff lives in the grant state kept
/// across reloads, and logins meanwhile get a permanent failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_client_setting_applies_at_the_reload() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let accounts = account("printer", "client_credentials", PRINTER);
        std::fs::write(s.path("wrong-secret"), "not-the-client-secret").unwrap();
        let config = s
            .config(&s.secret("post"), &accounts, "")
            .replace("client-secret", "wrong-secret");
        let mailgate = Mailgate::start(&config).await;
        // Four refusals: the next try is about 8 s away.
        let mut wait = Duration::from_secs(1);
        for attempt in 0..4 {
            if attempt > 0 {
                tokio::time::sleep(wait.mul_f64(1.25)).await;
                wait *= 2;
            }
            let (_client, login) = imap_login(s.imap_address(), "printer").await;
            assert!(login.tagged.contains("NO [CONTACTADMIN]"), "{login:?}");
        }
        assert_eq!(s.provider.count("client_credentials"), 4);
        std::fs::write(s.path("wrong-secret"), CLIENT_SECRET).unwrap();
        send_signal(mailgate.pid().unwrap(), "HUP");
        assert!(
            eventually(Duration::from_secs(10), || async {
                mailgate.output().contains("configuration reloaded")
            })
            .await,
            "{}",
            mailgate.output()
        );
        let (_client, login) = imap_login(s.imap_address(), "printer").await;
        assert!(
            login.is_ok(),
            "the fixed setting did not apply at the reload ({} client_credentials requests, 4 before it): {login:?}\n{}",
            s.provider.count("client_credentials"),
            mailgate.output()
        );
    })
    .await;
}

/// A login that gives up (`login_timeout`) while the provider answers its refresh must not
/// take the refresh with it: the provider has rotated the token, and its answer is still on
/// the way (here it arrives within `tokens.oauth2.timeout`). No crash, no kill: only a slow
/// password check or a lease wait before the refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_times_out_during_a_refresh_loses_no_token() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let config = s
            .config(
                &s.secret("post"),
                &account("alice", "refresh_token", ALICE),
                "",
            )
            .replacen(
                "    protocol: imap\n",
                "    protocol: imap\n    login_timeout: 2s\n",
                1,
            );
        s.onboarded(&config, "alice", ALICE).await;
        let mailgate = Mailgate::start(&config).await;
        let hold = s.provider.hold_answers();
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(!login.is_ok(), "{login:?}");
        assert_eq!(s.provider.token_requests().len(), 1);
        // The answer comes 2 s into the provider's 5 s timeout.
        drop(hold);
        let (_client, login) = imap_login(s.imap_address(), "alice").await;
        assert!(
            login.is_ok(),
            "the token the provider rotated during a timed-out login was lost: {login:?}\n{}",
            mailgate.output()
        );
    })
    .await;
}

/// Accounts never tried say so (not `ok`), and an import redeems the token once, so a used or
/// wrong one shows at once, not at the first login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untried_accounts_say_so_and_an_import_is_checked() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let accounts = account("alice", "refresh_token", ALICE)
            + &account("printer", "client_credentials", PRINTER);
        let config = s.config(&s.secret("post"), &accounts, "");
        assert_eq!(
            account_row(&config, "printer").await["state"],
            "not_yet_tried"
        );

        let unchecked = s.consented(ALICE);
        let (code, out, err) = s
            .import(&config, "alice", &unchecked, &["--no-check"])
            .await;
        assert_eq!(code, Some(0), "{out}{err}");
        assert_eq!(
            account_row(&config, "alice").await["state"],
            "not_yet_tried"
        );
        assert_eq!(s.provider.count("refresh_token"), 0);

        let checked = s.consented(ALICE);
        let (code, out, err) = s.import(&config, "alice", &checked, &[]).await;
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(out.contains("the provider accepted it"), "{out}");
        let requests = s.provider.token_requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].refresh_token.as_deref(), Some(checked.as_str()));
        assert_eq!(account_row(&config, "alice").await["state"], "ok");

        // A token the provider no longer honours is refused at import.
        assert!(s.provider.revoke_token(&unchecked));
        let (code, _, err) = s.import(&config, "alice", &unchecked, &[]).await;
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("refused the refresh token"), "{err}");
        assert_eq!(
            account_row(&config, "alice").await["state"],
            "needs_reauthorization"
        );
    })
    .await;
}

/// `AUTH PLAIN` as `account` over plain SMTP; the reply line.
async fn smtp_auth_plain(address: SocketAddr, account: &str) -> String {
    use base64::Engine as _;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    // The greeting, then EHLO's lines up to the last (`250 `).
    let _greeting = lines.next_line().await.unwrap();
    write.write_all(b"EHLO client.test\r\n").await.unwrap();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.starts_with("250 ") {
            break;
        }
    }
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{account}\0any-password"));
    write
        .write_all(format!("AUTH PLAIN {credentials}\r\n").as_bytes())
        .await
        .unwrap();
    lines.next_line().await.unwrap().unwrap_or_default()
}
