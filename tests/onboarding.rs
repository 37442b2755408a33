//! The admin endpoint's onboarding page and token service, against the local OAuth2 provider
//! and the real Dovecot: authorizing an account over HTTP and in a real browser (headless
//! Chromium: code flow and device flow, screenshots), the refusals that protect it, and one
//! mailgate serving tokens to another.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::imap_client::ImapClient;
use support::oauth2::{ClientCredential, OAuthProvider, hidden_fields};
use support::{Browser, Mailgate, TestUpstream, curl, free_port, with_timeout};

const MINUTE: Duration = Duration::from_secs(60);
const CLIENT: &str = "mailgate";
const CLIENT_SECRET: &str = "client-secret-77a1";
const ADMIN_PASSWORD: &str = "onboarding-pw-3c9";
const SERVICE_PASSWORD: &str = "token-service-pw-51e";
const SCOPE: &str = "mail offline_access";
const ALICE: &str = "alice@example.test";
const PRINTER: &str = "printer@example.test";

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
        provider.set_consenting_user(ALICE);
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [
            ("client-secret", CLIENT_SECRET),
            ("admin-password", ADMIN_PASSWORD),
            ("service-password", SERVICE_PASSWORD),
            ("store-key", "bWFpbGdhdGUtdGVzdC1zdG9yZS1rZXktMzItYnl0ZXM="),
        ] {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let admin = free_port();
        provider.add_redirect_uri(CLIENT, &format!("http://127.0.0.1:{admin}/oauth/callback"));
        Setup {
            up,
            provider,
            dir,
            imap: free_port(),
            smtp: free_port(),
            admin,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }

    /// The upstream's listeners, OAuth2 accounts `alice` (refresh token) and `printer`
    /// (client credentials), the onboarding page and the token service.
    fn config(&self) -> String {
        let listeners = self.up.mailgate_config(self.imap, self.smtp);
        let listeners = listeners.split("tokens:").next().unwrap();
        format!(
            r#"{listeners}admin:
  listen: "127.0.0.1:{admin}"
  onboarding:
    password_file: "{admin_password}"
    redirect_url: "{base}/oauth/callback"
  token_service:
    password_file: "{service_password}"
tokens:
  oauth2:
    store: {{ dir: "{store}", key_file: "{key}" }}
    providers:
      local:
        preset: custom
        token_url: "{token_url}"
        authorize_url: "{authorize_url}"
        device_url: "{device_url}"
        client_id: {CLIENT}
        client_secret_file: "{secret}"
        scope: "{SCOPE}"
    accounts:
      alice: {{ provider: local, grant: refresh_token, user: "{ALICE}" }}
      printer: {{ provider: local, grant: client_credentials, user: "{PRINTER}" }}
"#,
            admin = self.admin,
            base = self.base(),
            admin_password = self.path("admin-password"),
            service_password = self.path("service-password"),
            store = self.path("tokens"),
            key = self.path("store-key"),
            secret = self.path("client-secret"),
            token_url = self.provider.token_url(),
            authorize_url = self.provider.authorize_url(),
            device_url = self.provider.device_url(),
        )
    }
}

fn http() -> reqwest::Client {
    mailgate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The value of the hidden `csrf` field of the accounts page.
async fn csrf_token(s: &Setup) -> String {
    let page = http()
        .get(format!("{}/accounts", s.base()))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    hidden_fields(&page)
        .into_iter()
        .find(|(name, _)| name == "csrf")
        .map(|(_, value)| value)
        .expect("a CSRF token in the page")
}

async fn post_form(s: &Setup, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    http()
        .post(format!("{}{path}", s.base()))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Consents at the provider's page and returns where it sends the browser.
async fn consent(url: &str) -> String {
    let page = http().get(url).send().await.unwrap().text().await.unwrap();
    let mut form = hidden_fields(&page);
    form.push(("decision".to_owned(), "approve".to_owned()));
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let answer = http()
        .post(url.split('?').next().unwrap())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 302);
    answer.headers()["location"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_authorizes_an_account_and_refuses_what_it_did_not_start() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let mailgate = Mailgate::start(&s.config()).await;
        let accounts = format!("{}/accounts", s.base());

        // Without the password: 401 with a challenge.
        let anonymous = http().get(&accounts).send().await.unwrap();
        assert_eq!(anonymous.status(), 401);
        assert!(
            anonymous.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Basic")
        );

        let page = http()
            .get(&accounts)
            .basic_auth("admin", Some(ADMIN_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(page.headers()["cache-control"], "no-store");
        let policy = page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            policy.contains("default-src 'none'") && policy.contains("form-action 'self'"),
            "{policy}"
        );
        let text = page.text().await.unwrap();
        assert!(text.contains("never authorized"), "{text}");

        // A form without the CSRF token is refused.
        let forged = post_form(&s, "/accounts/connect", &[("account", "alice")]).await;
        assert_eq!(forged.status(), 403);

        let csrf = csrf_token(&s).await;
        let started = post_form(
            &s,
            "/accounts/connect",
            &[("account", "alice"), ("csrf", &csrf)],
        )
        .await;
        assert_eq!(started.status(), 303);
        let to_provider = started.headers()["location"].to_str().unwrap().to_owned();
        assert!(
            to_provider.starts_with(&s.provider.authorize_url()),
            "{to_provider}"
        );
        let back = consent(&to_provider).await;

        // A redirect whose state this mailgate never sent is refused; nothing is stored.
        let mut forged = url::Url::parse(&back).unwrap();
        let pairs: Vec<(String, String)> = forged
            .query_pairs()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    if k == "state" {
                        "forged".to_owned()
                    } else {
                        v.to_string()
                    },
                )
            })
            .collect();
        forged.query_pairs_mut().clear().extend_pairs(pairs);
        let refused = http()
            .get(forged.as_str())
            .basic_auth("admin", Some(ADMIN_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 400);

        let landed = http()
            .get(&back)
            .basic_auth("admin", Some(ADMIN_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(landed.status(), 303, "{:?}", landed.text().await);
        let list = landed.headers()["location"].to_str().unwrap().to_owned();
        assert_eq!(list, "/accounts?authorized=alice");
        let text = http()
            .get(format!("{}{list}", s.base()))
            .basic_auth("admin", Some(ADMIN_PASSWORD))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains("Authorized") && text.contains("ok"), "{text}");

        // Alice logs in through mailgate with the token the page obtained.
        let mut client = ImapClient::connect(SocketAddr::from(([127, 0, 0, 1], s.imap))).await;
        assert!(
            client.login("alice", "x").await.is_ok(),
            "{}",
            mailgate.output()
        );

        // No secret in any page or log line.
        let refresh = s.provider.current_refresh_token(ALICE, CLIENT).unwrap();
        for secret in [refresh.as_str(), CLIENT_SECRET, ADMIN_PASSWORD] {
            assert!(!text.contains(secret));
            mailgate.assert_not_logged(secret);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mailgate_serves_tokens_to_another_with_one_request_for_fifty_logins() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let central = Mailgate::start(&s.config()).await;
        // Wrong password: 401.
        let refused = curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", "mailgate:wrong", &format!("{}/token?account=printer&proto=imap", s.base())]).await;
        assert_eq!(refused.stdout, "401");

        // The sidecar: its auth server is the central mailgate's token service.
        let (imap, smtp) = (free_port(), free_port());
        let listeners = s.up.mailgate_config(imap, smtp);
        let listeners = listeners.split("tokens:").next().unwrap();
        let sidecar_config = format!(
            "{listeners}tokens:\n  auth_server:\n    url: \"http://mailgate@127.0.0.1:{}/token\"\n    password_file: \"{}\"\n",
            s.admin,
            s.path("service-password")
        );
        let sidecar = Mailgate::start(&sidecar_config).await;
        let address = SocketAddr::from(([127, 0, 0, 1], imap));
        let logins: Vec<_> = (0..50)
            .map(|_| {
                tokio::spawn(async move {
                    let mut client = ImapClient::connect(address).await;
                    client.login("printer", "x").await
                })
            })
            .collect();
        for login in logins {
            let login = login.await.unwrap();
            assert!(login.is_ok(), "{login:?}\n{}\n{}", sidecar.output(), central.output());
        }
        let metrics = curl(&[&format!("{}/metrics", s.base())]).await.stdout;
        assert!(
            metrics.contains("mailgate_token_service_requests_total{result=\"ok\"} 1"),
            "{metrics}"
        );
        assert_eq!(s.provider.count("client_credentials"), 1);
        // An account the central mailgate does not hold is refused, as an auth server would.
        let unknown = curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", &format!("mailgate:{SERVICE_PASSWORD}"), &format!("{}/token?account=nobody", s.base())]).await;
        assert_eq!(unknown.stdout, "404");
        central.assert_not_logged(SERVICE_PASSWORD);
    })
    .await;
}

/// Where the browser test leaves its screenshots (the docs' images come from here).
fn screenshot_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("onboarding-screenshots")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_connects_accounts_in_a_browser_with_both_flows() {
    with_timeout(2 * MINUTE, async {
        let s = Setup::start().await;
        s.provider.set_device_interval(1);
        let mailgate = Mailgate::start(&s.config()).await;
        let shots = screenshot_dir();
        let browser = Browser::start().await;
        let accounts = format!("{}/accounts", s.base());

        // Without the password the page shows nothing (the browser cancels the prompt).
        browser.goto(&accounts).await;
        assert!(browser.try_find("#connect-alice").await.is_none());
        browser.console_errors().await;

        browser.set_basic_auth("admin", ADMIN_PASSWORD).await;
        browser.goto(&accounts).await;
        assert!(browser.page_source().await.contains("never authorized"));
        browser.screenshot(&shots.join("accounts-before.png")).await;

        // The code flow: Connect, consent at the provider, back on the list.
        browser.find("#connect-alice").await.click().await;
        let approve = browser.wait_for("#approve", MINUTE).await;
        browser.screenshot(&shots.join("provider-consent.png")).await;
        approve.click().await;
        let landed = browser
            .wait_until_url(|url| url.contains("/accounts?authorized=alice"), MINUTE)
            .await;
        assert!(landed.starts_with(&s.base()), "{landed}");
        let page = browser.page_source().await;
        assert!(page.contains("Authorized") && page.contains("state ok"), "{page}");
        browser.screenshot(&shots.join("accounts-after.png")).await;
        let mut client = ImapClient::connect(SocketAddr::from(([127, 0, 0, 1], s.imap))).await;
        assert!(client.login("alice", "x").await.is_ok(), "{}", mailgate.output());

        // The device flow re-authorizes the same account: a code on mailgate's page, entered
        // at the provider's.
        browser.find("#device-alice").await.click().await;
        let code = browser.wait_for("#user-code", MINUTE).await.text().await;
        browser.screenshot(&shots.join("device-code.png")).await;
        let verification = browser.find("main a[href^='http']").await;
        let device_page = browser.current_url().await;
        verification.click().await;
        browser.wait_for("#user_code", MINUTE).await;
        browser.fill("#user_code", &code).await;
        browser.find("#approve").await.click().await;
        // A navigation started now would cancel the approval's form submission.
        browser.wait_for("#result", MINUTE).await;
        browser.goto(&device_page).await;
        browser.wait_for("#device-done", MINUTE).await;
        assert_eq!(s.provider.count_ok("urn:ietf:params:oauth:grant-type:device_code"), 1);

        // No CSP violation or failed load on mailgate's pages (the refusals below log their
        // status; the provider's pages are not mailgate's).
        let errors = browser.console_errors().await;
        let ours: Vec<_> = errors.iter().filter(|e| e.contains(&s.base())).collect();
        assert!(ours.is_empty(), "{ours:?}");

        // A redirect this mailgate never started is refused, and a form without its CSRF
        // token (removed through DevTools, as a forged form would lack it) too.
        browser
            .goto(&format!("{}/oauth/callback?state=forged&code=x", s.base()))
            .await;
        assert!(browser.page_source().await.contains("was not started here"));
        browser.goto(&accounts).await;
        browser
            .cdp(
                "Runtime.evaluate",
                serde_json::json!({
                    "expression": "document.querySelectorAll('input[name=csrf]').forEach(e => e.remove())"
                }),
            )
            .await;
        browser.find("#connect-alice").await.click().await;
        // The click returns before the navigation ends: wait for the refusal's page.
        browser
            .wait_until_url(|url| url.ends_with("/accounts/connect"), MINUTE)
            .await;
        let refused = browser.page_source().await;
        assert!(refused.contains("missing or wrong CSRF token"), "{refused}");
        assert!(!refused.contains("Approve"), "{refused}");
        mailgate.assert_not_logged(ADMIN_PASSWORD);
        mailgate.assert_not_logged(CLIENT_SECRET);
    })
    .await;
}

/// A client of the admin endpoint from `source`, another loopback address (127.0.0.2 ...).
fn http_from(source: [u8; 4]) -> reqwest::Client {
    mailgate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(source))
        .build()
        .unwrap()
}

async fn token_status(
    s: &Setup,
    source: [u8; 4],
    user: &str,
    password: &str,
    account: &str,
) -> u16 {
    http_from(source)
        .get(format!("{}/token?account={account}&proto=imap", s.base()))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// An argon2id hash with the crate's default parameters, for a static account.
fn password_hash(password: &str) -> String {
    use argon2::PasswordHasher as _;
    let salt = argon2::password_hash::SaltString::from_b64("bWFpbGdhdGUtdGVzdC1zYWx0").unwrap();
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_admin_logins_block_only_their_address_and_mail_logins_none() {
    with_timeout(2 * MINUTE, async {
        let s = Setup::start().await;
        let config = format!(
            "{}client_auth:\n  mode: static\n  throttle: {{ failure_delay: 10ms, max_failure_delay: 20ms, block_account_after: 30 }}\n  accounts:\n    alice: \"{}\"\n",
            s.config(),
            password_hash("alice-mail-password")
        );
        let mailgate = Mailgate::start(&config).await;

        // Failed IMAP logins with the name the admin endpoint used to count under, from four
        // addresses: past the mail throttle's account block (opted in above).
        let imap = SocketAddr::from(([127, 0, 0, 1], s.imap));
        for source in 2..6u8 {
            for guess in 0..8 {
                let mut client = ImapClient::connect_from(imap, [127, 0, 0, source].into()).await;
                let login = client
                    .login("(admin endpoint)", &format!("guess-{source}-{guess}"))
                    .await;
                assert!(!login.is_ok(), "{login:?}");
            }
        }
        let status = token_status(&s, [127, 0, 0, 6], "mailgate", SERVICE_PASSWORD, "printer").await;
        assert_eq!(status, 200, "{}", mailgate.output());

        // Ten wrong passwords from each of three addresses, at once.
        let guesses: Vec<_> = (7..10u8)
            .flat_map(|source| (0..10).map(move |_| source))
            .map(|source| {
                let s_base = s.base();
                tokio::spawn(async move {
                    http_from([127, 0, 0, source])
                        .get(format!("{s_base}/token?account=printer&proto=imap"))
                        .basic_auth("mailgate", Some("wrong-password"))
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        for guess in guesses {
            assert_eq!(guess.await.unwrap(), 401);
        }
        // A guessing address is blocked, even with the right password ...
        let status = token_status(&s, [127, 0, 0, 7], "mailgate", SERVICE_PASSWORD, "printer").await;
        assert_eq!(status, 429);
        // ... and no other: the token service and the page still answer a fourth address.
        let status = token_status(&s, [127, 0, 0, 10], "mailgate", SERVICE_PASSWORD, "printer").await;
        assert_eq!(status, 200, "{}", mailgate.output());
        let page = http_from([127, 0, 0, 10])
            .get(format!("{}/accounts", s.base()))
            .basic_auth("admin", Some(ADMIN_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);

        // An address that logged in is not blocked by its own later failures (a pod left with
        // an old password beside one with the new).
        let retries: Vec<_> = (0..12)
            .map(|_| {
                let base = s.base();
                tokio::spawn(async move {
                    http_from([127, 0, 0, 10])
                        .get(format!("{base}/token?account=printer&proto=imap"))
                        .basic_auth("mailgate", Some("old-password"))
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        for retry in retries {
            assert_eq!(retry.await.unwrap(), 401);
        }
        let status = token_status(&s, [127, 0, 0, 10], "mailgate", SERVICE_PASSWORD, "printer").await;
        assert_eq!(status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_service_client_gets_only_its_own_accounts() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let printer_password = "printer-sidecar-pw-0d4";
        let all_password = "all-accounts-pw-9e2c";
        std::fs::write(s.dir.path().join("printer-sidecar"), printer_password).unwrap();
        std::fs::write(s.dir.path().join("all-accounts"), all_password).unwrap();
        let config = s.config().replace(
            "  token_service:\n",
            &format!(
                "  token_service:\n    clients:\n      printer-sidecar: {{ password_file: \"{}\", accounts: [printer] }}\n      everything: {{ password_file: \"{}\", accounts: [\"*\"] }}\n",
                s.path("printer-sidecar"),
                s.path("all-accounts"),
            ),
        );
        let mailgate = Mailgate::start(&config).await;
        let local = [127, 0, 0, 1];

        // The printer's sidecar gets the printer's token, and alice's account does not exist
        // for it.
        let status = token_status(&s, local, "printer-sidecar", printer_password, "printer").await;
        assert_eq!(status, 200, "{}", mailgate.output());
        let status = token_status(&s, local, "printer-sidecar", printer_password, "alice").await;
        assert_eq!(status, 404);
        // Its password is its own: not another client's.
        let status = token_status(&s, local, "everything", printer_password, "printer").await;
        assert_eq!(status, 401);

        // `*` may ask for every account: alice's is found (never authorized, so refused 403).
        let status = token_status(&s, local, "everything", all_password, "printer").await;
        assert_eq!(status, 200);
        let status = token_status(&s, local, "everything", all_password, "alice").await;
        assert_eq!(status, 403);
        // The single password of before is still a client that may fetch every account.
        let status = token_status(&s, local, "mailgate", SERVICE_PASSWORD, "printer").await;
        assert_eq!(status, 200);

        // A sidecar with the printer's credentials logs the printer in, and not alice.
        let (imap, smtp) = (free_port(), free_port());
        let listeners = s.up.mailgate_config(imap, smtp);
        let listeners = listeners.split("tokens:").next().unwrap();
        let sidecar = Mailgate::start(&format!(
            "{listeners}tokens:\n  auth_server:\n    url: \"http://printer-sidecar@127.0.0.1:{}/token\"\n    password_file: \"{}\"\n",
            s.admin,
            s.path("printer-sidecar")
        ))
        .await;
        let address = SocketAddr::from(([127, 0, 0, 1], imap));
        let mut client = ImapClient::connect(address).await;
        let login = client.login("printer", "x").await;
        assert!(login.is_ok(), "{login:?}\n{}", sidecar.output());
        let mut client = ImapClient::connect(address).await;
        let login = client.login("alice", "x").await;
        assert!(!login.is_ok(), "{login:?}");
        mailgate.assert_not_logged(printer_password);
    })
    .await;
}
