//! The test OAuth2 provider itself, over real HTTP: every grant, every refusal mailgate must
//! be able to rely on, the hold/abandon behaviour, and that its access tokens open a real
//! Dovecot. Each test reads as a transcript: request, answer, what the provider now holds.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use support::oauth2::{
    CLIENT_ASSERTION_TYPE_JWT, ClientAuthMethod, GRANT_DEVICE_CODE, GRANT_JWT_BEARER,
    hidden_fields, pem_to_der, pkce_s256, sign_jwt_rs256, unix_now,
};
use support::{
    ClientCredential, Dovecot, Introspection, OAuthProvider, SmtpSink, TEST_TIMEOUT, TestCa,
    TestKeys, curl, eventually, with_timeout,
};

const USER: &str = "alice@example.test";
const PASSWORD: &str = "correct horse";
const APP: &str = "app-secret";
/// A secret with every character that `client_secret_basic` must form-urlencode.
const APP_SECRET: &str = "s3cr3t:+/ &=%é";
const CERT_APP: &str = "app-cert";
const PUBLIC_APP: &str = "app-public";
const REDIRECT: &str = "http://127.0.0.1:9/callback";
const SCOPE: &str = "https://outlook.office365.com/.default";
const IMAP_SCOPE: &str = "offline_access https://outlook.office365.com/IMAP.AccessAsUser.All";
const SERVICE_ACCOUNT: &str = "mailer@project.iam.gserviceaccount.test";
const GMAIL_SCOPE: &str = "https://mail.google.com/";
/// A PKCE verifier of the minimum length (RFC 7636 section 4.1: 43 to 128 characters).
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

/// A provider with three clients (secret, certificate, public), a user, and an HTTP client
/// that does not follow redirects.
struct Setup {
    provider: OAuthProvider,
    introspection: Introspection,
    keys: TestKeys,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("temp dir");
        let keys = TestKeys::rsa(dir.path()).await;
        let introspection = Introspection::start().await;
        let provider = OAuthProvider::start(&introspection).await;
        provider.add_client(APP, ClientCredential::Secret(APP_SECRET.into()));
        provider.set_mailbox(APP, USER);
        provider.add_client(
            CERT_APP,
            ClientCredential::Certificate {
                cert_der: keys.cert_der_bytes(),
            },
        );
        provider.set_mailbox(CERT_APP, USER);
        provider.add_client(PUBLIC_APP, ClientCredential::Public);
        provider.add_redirect_uri(PUBLIC_APP, REDIRECT);
        provider.add_user(USER, PASSWORD);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("HTTP client");
        Setup {
            provider,
            introspection,
            keys,
            http,
            dir,
        }
    }

    /// `POST url` with a form body and, optionally, an `Authorization` header.
    async fn post(&self, url: &str, authorization: Option<&str>, params: &[(&str, &str)]) -> Reply {
        let mut request = self
            .http
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(params));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        Reply::read(request.send().await.expect("POST")).await
    }

    async fn token(&self, params: &[(&str, &str)]) -> Reply {
        self.post(&self.provider.token_url(), None, params).await
    }

    async fn get(&self, url: &str) -> Reply {
        Reply::read(self.http.get(url).send().await.expect("GET")).await
    }

    /// A fresh client assertion for `CERT_APP`, before signing: (header, claims).
    fn assertion_parts(&self) -> (Value, Value) {
        let now = unix_now();
        (
            json!({ "alg": "RS256", "typ": "JWT", "x5t#S256": self.keys.x5t_s256() }),
            json!({
                "aud": self.provider.token_url(),
                "iss": CERT_APP,
                "sub": CERT_APP,
                "jti": fresh_jti(),
                "nbf": now,
                "iat": now,
                "exp": now + 300,
            }),
        )
    }

    async fn client_credentials_with_assertion(&self, assertion: &str) -> Reply {
        self.token(&[
            ("grant_type", "client_credentials"),
            ("client_id", CERT_APP),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT),
            ("client_assertion", assertion),
            ("scope", SCOPE),
        ])
        .await
    }

    async fn refresh(&self, refresh_token: &str) -> Reply {
        self.token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", APP),
            ("client_secret", APP_SECRET),
        ])
        .await
    }

    /// Opens the consent page for `PUBLIC_APP` with an S256 challenge of `VERIFIER`.
    async fn open_consent(&self, state: &str) -> Reply {
        let url = url_with(
            &self.provider.authorize_url(),
            &[
                ("response_type", "code"),
                ("client_id", PUBLIC_APP),
                ("redirect_uri", REDIRECT),
                ("scope", IMAP_SCOPE),
                ("state", state),
                ("code_challenge", &pkce_s256(VERIFIER)),
                ("code_challenge_method", "S256"),
            ],
        );
        self.get(&url).await
    }

    /// Posts the consent form of `page` back with `decision` and `extra` fields.
    async fn submit_consent(&self, page: &Reply, decision: &str, extra: &[(&str, &str)]) -> Reply {
        let mut fields = hidden_fields(&page.body);
        fields.push(("decision".into(), decision.into()));
        fields.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let params: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.post(&self.provider.authorize_url(), None, &params)
            .await
    }

    /// Consent as the consenting user, then the code from the redirect.
    async fn code(&self) -> String {
        self.provider.set_consenting_user(USER);
        let page = self.open_consent("xyz").await;
        let redirect = self.submit_consent(&page, "approve", &[]).await;
        redirect.location_param("code").expect("code in redirect")
    }

    async fn exchange_code(&self, code: &str, verifier: &str) -> Reply {
        self.token(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("client_id", PUBLIC_APP),
            ("code_verifier", verifier),
        ])
        .await
    }

    /// The user of `token` according to the Introspection the test Dovecot would ask.
    async fn introspected_user(&self, url: &str, token: &str) -> Option<String> {
        let reply = self.post(url, None, &[("token", token)]).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let body = reply.json();
        (body["active"] == true).then(|| body["email"].as_str().unwrap_or("").to_owned())
    }
}

/// An HTTP answer read whole.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    async fn read(response: reqwest::Response) -> Reply {
        Reply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.text().await.expect("body"),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn str(&self, field: &str) -> Option<String> {
        self.json()[field].as_str().map(str::to_owned)
    }

    fn error(&self) -> Option<String> {
        self.str("error")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A query parameter of the `Location` header.
    fn location_param(&self, name: &str) -> Option<String> {
        let location = url::Url::parse(self.header("location")?).ok()?;
        location
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// Asserts an RFC 6749 section 5.2 error answer and returns it for more checks.
    #[track_caller]
    fn assert_error(&self, status: u16, code: &str) -> &Reply {
        assert_eq!(
            (self.status, self.error().as_deref()),
            (status, Some(code)),
            "{self:?}"
        );
        assert!(self.str("error_description").is_some(), "{self:?}");
        self
    }

    /// Asserts a token answer and returns its access token.
    #[track_caller]
    fn assert_token(&self) -> String {
        assert_eq!(self.status, 200, "{self:?}");
        assert_eq!(self.json()["token_type"], "Bearer", "{self:?}");
        assert_eq!(self.header("cache-control"), Some("no-store"));
        self.str("access_token").expect("access_token")
    }
}

fn form(params: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

fn url_with(base: &str, params: &[(&str, &str)]) -> String {
    format!("{base}?{}", form(params))
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn basic(id: &str, secret: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("Basic {}", b64.encode(format!("{id}:{secret}")))
}

fn fresh_jti() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "jti-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes member `name` from a JWT header or claims object.
fn drop_claim(object: &mut Value, name: &str) {
    object.as_object_mut().expect("JSON object").remove(name);
}

fn unsigned_jwt(header: &Value, claims: &Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string())
    )
}

async fn wait_held(provider: &OAuthProvider, n: usize) -> bool {
    eventually(Duration::from_secs(10), || {
        let provider = provider.clone();
        async move { provider.held_requests() == n }
    })
    .await
}

// --- client credentials and client authentication -------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_with_secret_post_and_basic() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let url = s.provider.token_url();

        // client_secret_post
        let post = s
            .token(&[
                ("grant_type", "client_credentials"),
                ("client_id", APP),
                ("client_secret", APP_SECRET),
                ("scope", SCOPE),
            ])
            .await;
        let token = post.assert_token();
        assert_eq!(post.json()["expires_in"], 3600);
        assert_eq!(post.str("scope").as_deref(), Some(SCOPE));
        assert!(
            post.str("refresh_token").is_none(),
            "RFC 6749 4.4.3: no refresh token"
        );
        assert!(s.introspection.is_active(&token));
        assert_eq!(
            s.introspected_user(&s.introspection.url(), &token).await,
            Some(USER.into())
        );
        assert_eq!(
            s.introspected_user(&s.provider.introspection_url(), &token)
                .await,
            Some(USER.into())
        );

        // client_secret_basic: id and secret form-urlencoded, then base64 (RFC 6749 2.3.1)
        let encoded = basic(&urlencode(APP), &urlencode(APP_SECRET));
        let params = [("grant_type", "client_credentials"), ("scope", SCOPE)];
        s.post(&url, Some(&encoded), &params).await.assert_token();

        // ... and without the urlencoding the secret does not match
        let raw = s.post(&url, Some(&basic(APP, APP_SECRET)), &params).await;
        raw.assert_error(401, "invalid_client");
        assert!(
            raw.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Basic "))
        );

        let wrong = s
            .token(&[
                ("grant_type", "client_credentials"),
                ("client_id", APP),
                ("client_secret", "wrong"),
                ("scope", SCOPE),
            ])
            .await;
        wrong.assert_error(401, "invalid_client");

        let no_scope = s
            .token(&[
                ("grant_type", "client_credentials"),
                ("client_id", APP),
                ("client_secret", APP_SECRET),
            ])
            .await;
        no_scope.assert_error(400, "invalid_request");

        // RFC 6749 2.3: never two methods in one request
        let both = s
            .post(
                &url,
                Some(&encoded),
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", APP),
                    ("client_secret", APP_SECRET),
                    ("scope", SCOPE),
                ],
            )
            .await;
        both.assert_error(400, "invalid_request");

        // public clients cannot get app-only tokens
        let public = s
            .token(&[
                ("grant_type", "client_credentials"),
                ("client_id", PUBLIC_APP),
                ("scope", SCOPE),
            ])
            .await;
        public.assert_error(400, "unauthorized_client");

        let log = s.provider.token_requests();
        let seen: Vec<(&str, &str)> = log
            .iter()
            .map(|r| (r.client_auth.as_str(), r.result.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                ("post", "ok"),
                ("basic", "ok"),
                ("basic", "invalid_client"),
                ("post", "invalid_client"),
                ("post", "invalid_request"),
                ("several", "invalid_request"),
                ("none", "unauthorized_client"),
            ]
        );
        assert_eq!(log[0].scope.as_deref(), Some(SCOPE));
        assert_eq!(log[0].user.as_deref(), Some(USER));
        assert_eq!(log[1].client_id.as_deref(), Some(APP));
        assert_eq!(s.provider.count("client_credentials"), 7);
        assert_eq!(s.provider.count_ok("client_credentials"), 2);
        assert_eq!(s.provider.access_tokens_issued(USER).len(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_assertion_gets_an_app_only_token() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let (header, claims) = s.assertion_parts();
        let assertion = sign_jwt_rs256(&s.keys.pkcs8_der(), &header, &claims);

        let reply = s.client_credentials_with_assertion(&assertion).await;
        let token = reply.assert_token();
        assert!(s.introspection.is_active(&token));
        let record = s.provider.token_requests().pop().expect("record");
        assert_eq!(record.client_auth, ClientAuthMethod::Assertion);
        assert_eq!(record.client_id.as_deref(), Some(CERT_APP));

        // RFC 7523 3 / Microsoft: the same jti twice is a replay
        s.client_credentials_with_assertion(&assertion)
            .await
            .assert_error(401, "invalid_client");

        // client_id may be left out: the assertion's iss names the client
        let (header, claims) = s.assertion_parts();
        let assertion = sign_jwt_rs256(&s.keys.pkcs8_der(), &header, &claims);
        s.token(&[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT),
            ("client_assertion", &assertion),
            ("scope", SCOPE),
        ])
        .await
        .assert_token();

        // a secret is no way in for a certificate client
        s.token(&[
            ("grant_type", "client_credentials"),
            ("client_id", CERT_APP),
            ("client_secret", "anything"),
            ("scope", SCOPE),
        ])
        .await
        .assert_error(401, "invalid_client");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_assertions_are_refused() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let other_keys = TestKeys::rsa(s.dir.path()).await;
        let now = unix_now();
        type Tamper = fn(&mut Value, &mut Value, i64);
        let cases: [(&str, Tamper); 12] = [
            ("x5t#S256 of another certificate", |h, _, _| {
                h["x5t#S256"] = "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU".into()
            }),
            ("no x5t#S256", |h, _, _| {
                drop_claim(h, "x5t#S256");
            }),
            ("typ not JWT", |h, _, _| h["typ"] = "at+jwt".into()),
            ("expired", |_, c, now| {
                c["iat"] = (now - 600).into();
                c["nbf"] = (now - 600).into();
                c["exp"] = (now - 1).into();
            }),
            ("exp an hour away", |_, c, now| {
                c["exp"] = (now + 3600).into()
            }),
            ("no exp", |_, c, _| {
                drop_claim(c, "exp");
            }),
            ("nbf in the future", |_, c, now| {
                c["nbf"] = (now + 120).into()
            }),
            ("aud another endpoint", |_, c, _| {
                c["aud"] = "https://login.microsoftonline.com/common/oauth2/v2.0/token".into()
            }),
            ("sub another client", |_, c, _| c["sub"] = APP.into()),
            ("no jti", |_, c, _| {
                drop_claim(c, "jti");
            }),
            ("alg HS256", |h, _, _| h["alg"] = "HS256".into()),
            ("an unknown crit extension", |h, _, _| {
                h["crit"] = json!(["exp"])
            }),
        ];
        for (what, tamper) in cases {
            let (mut header, mut claims) = s.assertion_parts();
            tamper(&mut header, &mut claims, now);
            let assertion = sign_jwt_rs256(&s.keys.pkcs8_der(), &header, &claims);
            let reply = s.client_credentials_with_assertion(&assertion).await;
            assert_eq!(reply.status, 401, "{what}: {reply:?}");
            assert_eq!(reply.error().as_deref(), Some("invalid_client"), "{what}");
        }

        // never an unsigned JWT
        let (mut header, claims) = s.assertion_parts();
        header["alg"] = "none".into();
        s.client_credentials_with_assertion(&unsigned_jwt(&header, &claims))
            .await
            .assert_error(401, "invalid_client");

        // the right thumbprint, signed by another key
        let (header, claims) = s.assertion_parts();
        let forged = sign_jwt_rs256(&other_keys.pkcs8_der(), &header, &claims);
        s.client_credentials_with_assertion(&forged)
            .await
            .assert_error(401, "invalid_client");

        // a signature over different claims
        let (header, claims) = s.assertion_parts();
        let good = sign_jwt_rs256(&s.keys.pkcs8_der(), &header, &claims);
        let (_, mut other_claims) = s.assertion_parts();
        other_claims["exp"] = (now + 500).into();
        let other = sign_jwt_rs256(&s.keys.pkcs8_der(), &header, &other_claims);
        let mut parts: Vec<&str> = good.split('.').collect();
        parts[1] = other.split('.').nth(1).unwrap();
        s.client_credentials_with_assertion(&parts.join("."))
            .await
            .assert_error(401, "invalid_client");

        // a wrong client_assertion_type
        s.token(&[
            ("grant_type", "client_credentials"),
            ("client_id", CERT_APP),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
            ),
            ("client_assertion", &good),
            ("scope", SCOPE),
        ])
        .await
        .assert_error(401, "invalid_client");

        assert!(s.provider.access_tokens_issued(USER).is_empty());
        // The refused assertion with a good signature did not burn its jti.
        s.client_credentials_with_assertion(&good)
            .await
            .assert_token();
    })
    .await;
}

// --- refresh tokens -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotation_invalidates_the_presented_token() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let first = s.provider.issue_refresh_token(APP, USER, IMAP_SCOPE);
        assert_eq!(
            s.provider.current_refresh_token(USER, APP),
            Some(first.clone())
        );

        let reply = s.refresh(&first).await;
        let token = reply.assert_token();
        let second = reply.str("refresh_token").expect("rotated refresh token");
        assert_ne!(second, first);
        assert_eq!(reply.str("scope").as_deref(), Some(IMAP_SCOPE));
        assert_eq!(
            s.introspected_user(&s.introspection.url(), &token).await,
            Some(USER.into())
        );
        assert_eq!(
            s.provider.current_refresh_token(USER, APP),
            Some(second.clone())
        );

        // the old one is spent
        s.refresh(&first).await.assert_error(400, "invalid_grant");
        // the new one works, once
        let third = s
            .refresh(&second)
            .await
            .str("refresh_token")
            .expect("rotated");
        s.refresh(&second).await.assert_error(400, "invalid_grant");

        // a narrower scope is fine, a wider one is not (RFC 6749 section 6)
        let narrow = s
            .token(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", &third),
                ("client_id", APP),
                ("client_secret", APP_SECRET),
                ("scope", "offline_access"),
            ])
            .await;
        narrow.assert_token();
        assert_eq!(narrow.str("scope").as_deref(), Some("offline_access"));
        let fourth = narrow.str("refresh_token").expect("rotated");
        s.token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &fourth),
            ("client_id", APP),
            ("client_secret", APP_SECRET),
            ("scope", "offline_access https://mail.google.com/"),
        ])
        .await
        .assert_error(400, "invalid_scope");

        // a refresh token is bound to its client
        s.provider
            .add_client("other", ClientCredential::Secret("o".into()));
        s.token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &fourth),
            ("client_id", "other"),
            ("client_secret", "o"),
        ])
        .await
        .assert_error(400, "invalid_grant");
        s.refresh("rt-made-up")
            .await
            .assert_error(400, "invalid_grant");

        // revoked by the user
        assert_eq!(s.provider.revoke_refresh_tokens(USER), 1);
        s.refresh(&fourth).await.assert_error(400, "invalid_grant");
        assert_eq!(s.provider.current_refresh_token(USER, APP), None);

        let log = s.provider.token_requests();
        assert_eq!(log[0].refresh_token.as_deref(), Some(first.as_str()));
        assert_eq!(s.provider.count("refresh_token"), 9);
        assert_eq!(s.provider.count_ok("refresh_token"), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rotation_the_refresh_token_stays() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        s.provider.set_rotation(false);
        s.provider
            .set_access_token_lifetime(Duration::from_secs(600));
        let refresh = s.provider.issue_refresh_token(APP, USER, IMAP_SCOPE);
        for _ in 0..2 {
            let reply = s.refresh(&refresh).await;
            reply.assert_token();
            assert_eq!(reply.json()["expires_in"], 600);
            assert!(reply.str("refresh_token").is_none(), "{reply:?}");
        }
        assert_eq!(s.provider.current_refresh_token(USER, APP), Some(refresh));
    })
    .await;
}

// --- hold -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_request_is_answered_on_release() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let first = s.provider.issue_refresh_token(APP, USER, IMAP_SCOPE);
        let hold = s.provider.hold();
        let url = s.provider.token_url();
        let http = s.http.clone();
        let body = form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &first),
            ("client_id", APP),
            ("client_secret", APP_SECRET),
        ]);
        let request = tokio::spawn(async move {
            let response = http
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .expect("POST");
            Reply::read(response).await
        });
        assert!(wait_held(&s.provider, 1).await, "the request never arrived");
        // Held: nothing rotated yet, nothing answered.
        assert_eq!(
            s.provider.current_refresh_token(USER, APP),
            Some(first.clone())
        );
        assert!(s.provider.token_requests().is_empty());
        assert!(!request.is_finished());

        hold.release();
        let reply = request.await.expect("request task");
        reply.assert_token();
        let second = reply.str("refresh_token").expect("rotated");
        assert_eq!(s.provider.current_refresh_token(USER, APP), Some(second));
        assert_eq!(s.provider.held_requests(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_request_whose_client_disconnects_issues_nothing() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let first = s.provider.issue_refresh_token(APP, USER, IMAP_SCOPE);
        let hold = s.provider.hold();

        // What a mailgate killed with SIGKILL mid-refresh leaves behind: a request, then a close.
        let body = form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &first),
            ("client_id", APP),
            ("client_secret", APP_SECRET),
        ]);
        let addr: SocketAddr = s.provider.addr();
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "POST /token HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        assert!(wait_held(&s.provider, 1).await, "the request never arrived");
        drop(stream);
        assert!(
            wait_held(&s.provider, 0).await,
            "the disconnect went unnoticed"
        );
        drop(hold);

        // Nothing was issued or rotated; the request is logged as abandoned.
        assert_eq!(
            s.provider.current_refresh_token(USER, APP),
            Some(first.clone())
        );
        assert!(s.provider.access_tokens_issued(USER).is_empty());
        let log = s.provider.token_requests();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].result, "abandoned");
        assert_eq!(log[0].refresh_token.as_deref(), Some(first.as_str()));

        // The restarted client can still use the old refresh token.
        s.refresh(&first).await.assert_token();
    })
    .await;
}

// --- authorization code with PKCE -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_code_with_pkce() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        s.provider.set_consenting_user(USER);

        let page = s.open_consent("state with spaces & symbols").await;
        assert_eq!(page.status, 200, "{page:?}");
        assert!(
            page.header("content-type")
                .is_some_and(|c| c.starts_with("text/html"))
        );
        assert!(
            page.body
                .contains(r#"<button id="approve" type="submit" name="decision" value="approve">"#)
        );
        assert!(
            page.body
                .contains(r#"<form method="post" action="/authorize">"#)
        );
        assert!(!page.body.contains("<script"));

        let redirect = s.submit_consent(&page, "approve", &[]).await;
        assert_eq!(redirect.status, 302, "{redirect:?}");
        assert!(
            redirect
                .header("location")
                .unwrap()
                .starts_with(&format!("{REDIRECT}?code="))
        );
        // The provider echoes state verbatim; checking it is the client's job.
        assert_eq!(
            redirect.location_param("state").as_deref(),
            Some("state with spaces & symbols")
        );
        let code = redirect.location_param("code").expect("code");

        // PKCE: a wrong verifier, a plain verifier (the challenge itself), none at all
        let wrong = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXK";
        s.exchange_code(&code, wrong)
            .await
            .assert_error(400, "invalid_grant");
        s.exchange_code(&code, &pkce_s256(VERIFIER))
            .await
            .assert_error(400, "invalid_grant");
        s.token(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", PUBLIC_APP),
        ])
        .await
        .assert_error(400, "invalid_grant");
        // the redirect URI must be the one of the authorization request
        s.token(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://127.0.0.1:9/other"),
            ("client_id", PUBLIC_APP),
            ("code_verifier", VERIFIER),
        ])
        .await
        .assert_error(400, "invalid_grant");

        let reply = s.exchange_code(&code, VERIFIER).await;
        let token = reply.assert_token();
        let refresh = reply.str("refresh_token").expect("refresh token");
        assert_eq!(reply.str("scope").as_deref(), Some(IMAP_SCOPE));
        assert!(s.introspection.is_active(&token));
        assert_eq!(
            s.provider.current_refresh_token(USER, PUBLIC_APP),
            Some(refresh.clone())
        );

        // Reused: refused, and what the code produced is revoked (RFC 6749 section 4.1.2).
        s.exchange_code(&code, VERIFIER)
            .await
            .assert_error(400, "invalid_grant");
        assert!(!s.introspection.is_active(&token));
        assert!(!s.provider.is_active(&token));
        s.token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", PUBLIC_APP),
        ])
        .await
        .assert_error(400, "invalid_grant");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_refresh_and_expired_code() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let code = s.code().await;
        let reply = s.exchange_code(&code, VERIFIER).await;
        let refresh = reply.str("refresh_token").expect("refresh token");
        // a public client refreshes with its client_id alone
        let refreshed = s
            .token(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh),
                ("client_id", PUBLIC_APP),
            ])
            .await;
        refreshed.assert_token();
        assert_eq!(
            s.provider.token_requests()[1].client_auth,
            ClientAuthMethod::None
        );

        s.provider.set_code_lifetime(Duration::from_millis(200));
        let code = s.code().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.exchange_code(&code, VERIFIER)
            .await
            .assert_error(400, "invalid_grant");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_request_refusals() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let authorize = s.provider.authorize_url();
        let challenge = pkce_s256(VERIFIER);
        let ask = |client: &'static str, redirect: &'static str, method: Option<&'static str>| {
            let mut params = vec![
                ("response_type", "code"),
                ("client_id", client),
                ("redirect_uri", redirect),
                ("state", "s1"),
                ("code_challenge", challenge.as_str()),
            ];
            params.extend(method.map(|m| ("code_challenge_method", m)));
            url_with(&authorize, &params)
        };

        // Unknown client or unregistered redirect URI: a page, never a redirect.
        let page = s.get(&ask("nobody", REDIRECT, Some("S256"))).await;
        assert_eq!((page.status, page.header("location")), (400, None));
        let page = s
            .get(&ask(PUBLIC_APP, "http://127.0.0.1:9/evil", Some("S256")))
            .await;
        assert_eq!((page.status, page.header("location")), (400, None));

        // plain, or no method (which means plain): back to the client with invalid_request
        for method in [Some("plain"), None] {
            let reply = s.get(&ask(PUBLIC_APP, REDIRECT, method)).await;
            assert_eq!(reply.status, 302, "{reply:?}");
            assert_eq!(
                reply.location_param("error").as_deref(),
                Some("invalid_request")
            );
            assert_eq!(reply.location_param("state").as_deref(), Some("s1"));
        }

        // The user denies.
        s.provider.set_consenting_user(USER);
        let page = s.open_consent("s2").await;
        let reply = s.submit_consent(&page, "deny", &[]).await;
        assert_eq!(
            reply.location_param("error").as_deref(),
            Some("access_denied")
        );
        assert_eq!(reply.location_param("state").as_deref(), Some("s2"));
        assert_eq!(reply.location_param("code"), None);
        // The consent request is single use.
        let again = s.submit_consent(&page, "approve", &[]).await;
        assert_eq!((again.status, again.header("location")), (400, None));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_page_with_login_form() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        // No consenting user: the page asks for user name and password.
        let page = s.open_consent("s").await;
        assert!(page.body.contains(r#"id="username""#) && page.body.contains(r#"type="password""#));

        let retry = s
            .submit_consent(
                &page,
                "approve",
                &[("username", USER), ("password", "wrong")],
            )
            .await;
        assert_eq!(retry.status, 200);
        assert!(retry.body.contains("Wrong user name or password."));

        let redirect = s
            .submit_consent(
                &retry,
                "approve",
                &[("username", USER), ("password", PASSWORD)],
            )
            .await;
        let code = redirect.location_param("code").expect("code");
        let reply = s.exchange_code(&code, VERIFIER).await;
        assert_eq!(
            reply.assert_token(),
            s.provider.access_tokens_issued(USER)[0]
        );
    })
    .await;
}

// --- device flow ----------------------------------------------------------------------------

async fn device_code(s: &Setup) -> Value {
    let reply = s
        .post(
            &s.provider.device_url(),
            None,
            &[("client_id", PUBLIC_APP), ("scope", IMAP_SCOPE)],
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.json()
}

async fn poll(s: &Setup, device_code: &str) -> Reply {
    s.token(&[
        ("grant_type", GRANT_DEVICE_CODE),
        ("device_code", device_code),
        ("client_id", PUBLIC_APP),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_flow_pending_slow_down_then_success() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        s.provider.set_device_interval(1);
        let grant = device_code(&s).await;
        let user_code = grant["user_code"].as_str().unwrap().to_owned();
        let device = grant["device_code"].as_str().unwrap().to_owned();
        assert_eq!(user_code.len(), 9);
        assert_eq!(user_code.as_bytes()[4], b'-');
        assert!(
            user_code
                .chars()
                .filter(|c| *c != '-')
                .all(|c| c.is_ascii_uppercase())
        );
        assert_eq!(grant["interval"], 1);
        assert_eq!(grant["expires_in"], 900);
        assert_eq!(grant["verification_uri"], s.provider.verification_url());
        assert_eq!(
            grant["verification_uri_complete"],
            format!("{}?user_code={user_code}", s.provider.verification_url())
        );
        assert_eq!(
            s.provider.pending_user_codes(),
            std::slice::from_ref(&user_code)
        );

        poll(&s, &device)
            .await
            .assert_error(400, "authorization_pending");
        // polled again at once: slow down, and the interval is now 1 + 5 s (RFC 8628 3.5)
        poll(&s, &device).await.assert_error(400, "slow_down");

        assert!(s.provider.approve_device(&user_code.to_lowercase(), USER));
        assert!(s.provider.pending_user_codes().is_empty());
        tokio::time::sleep(Duration::from_millis(6100)).await;
        let reply = poll(&s, &device).await;
        let token = reply.assert_token();
        assert!(reply.str("refresh_token").is_some());
        assert_eq!(
            s.introspected_user(&s.introspection.url(), &token).await,
            Some(USER.into())
        );

        // a device code is good for one token answer
        poll(&s, &device).await.assert_error(400, "invalid_grant");
        let results: Vec<String> = s
            .provider
            .token_requests()
            .into_iter()
            .map(|r| r.result)
            .collect();
        assert_eq!(
            results,
            ["authorization_pending", "slow_down", "ok", "invalid_grant"]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_flow_denied_expired_and_page() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        s.provider.set_device_interval(1);

        let denied = device_code(&s).await;
        assert!(
            s.provider
                .deny_device(denied["user_code"].as_str().unwrap())
        );
        poll(&s, denied["device_code"].as_str().unwrap())
            .await
            .assert_error(400, "access_denied");

        s.provider.set_device_code_lifetime(Duration::from_secs(1));
        let expiring = device_code(&s).await;
        assert_eq!(expiring["expires_in"], 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(
            !s.provider
                .approve_device(expiring["user_code"].as_str().unwrap(), USER)
        );
        poll(&s, expiring["device_code"].as_str().unwrap())
            .await
            .assert_error(400, "expired_token");

        // Approved on the verification page, with the login form.
        s.provider.set_device_code_lifetime(Duration::from_secs(60));
        let grant = device_code(&s).await;
        let page = s
            .get(grant["verification_uri_complete"].as_str().unwrap())
            .await;
        assert_eq!(page.status, 200);
        let user_code = grant["user_code"].as_str().unwrap();
        assert!(page.body.contains(&format!(r#"value="{user_code}""#)));
        let done = s
            .post(
                &s.provider.verification_url(),
                None,
                &[
                    ("user_code", user_code),
                    ("username", USER),
                    ("password", PASSWORD),
                    ("decision", "approve"),
                ],
            )
            .await;
        assert_eq!(done.status, 200);
        assert!(done.body.contains("Device approved."), "{done:?}");
        poll(&s, grant["device_code"].as_str().unwrap())
            .await
            .assert_token();

        // Unknown clients get no device code.
        let reply = s
            .post(&s.provider.device_url(), None, &[("client_id", "nobody")])
            .await;
        reply.assert_error(401, "invalid_client");
    })
    .await;
}

// --- password and service-account grants ----------------------------------------------------

async fn password_login(s: &Setup, password: &str) -> Reply {
    s.token(&[
        ("grant_type", "password"),
        ("username", USER),
        ("password", password),
        ("client_id", APP),
        ("client_secret", APP_SECRET),
        ("scope", IMAP_SCOPE),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_grant() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let reply = password_login(&s, PASSWORD).await;
        reply.assert_token();
        assert!(reply.str("refresh_token").is_some());
        assert_eq!(reply.str("scope").as_deref(), Some(IMAP_SCOPE));
        password_login(&s, "wrong")
            .await
            .assert_error(400, "invalid_grant");

        // A client may be limited to other grants.
        s.provider.set_allowed_grants(APP, &["client_credentials"]);
        password_login(&s, PASSWORD)
            .await
            .assert_error(400, "unauthorized_client");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_jwt_bearer() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let token_url = s.provider.token_url();
        s.provider
            .add_service_account(SERVICE_ACCOUNT, &s.keys.public_key_der_bytes());

        // Sign the way a Google client library does, from the key file alone.
        let file = s.keys.service_account_json(SERVICE_ACCOUNT, &token_url);
        let key_file: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(key_file["type"], "service_account");
        assert_eq!(key_file["token_uri"], token_url.as_str());
        assert_eq!(key_file["client_email"], SERVICE_ACCOUNT);
        let private_key = key_file["private_key"].as_str().unwrap();
        assert!(private_key.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let pkcs8 = pem_to_der(private_key);
        let now = unix_now();
        let header = json!({ "alg": "RS256", "typ": "JWT", "kid": key_file["private_key_id"] });
        let claims = json!({
            "iss": SERVICE_ACCOUNT,
            "sub": USER,
            "scope": GMAIL_SCOPE,
            "aud": token_url,
            "iat": now,
            "exp": now + 3600,
        });
        let s = &s;
        let grant = |assertion: String| async move {
            s.token(&[("grant_type", GRANT_JWT_BEARER), ("assertion", &assertion)])
                .await
        };

        let reply = grant(sign_jwt_rs256(&pkcs8, &header, &claims)).await;
        let token = reply.assert_token();
        assert!(reply.str("refresh_token").is_none());
        assert_eq!(
            s.introspected_user(&s.introspection.url(), &token).await,
            Some(USER.into())
        );
        let record = s.provider.token_requests().pop().unwrap();
        assert_eq!(record.client_auth, ClientAuthMethod::None);
        assert_eq!(record.client_id.as_deref(), Some(SERVICE_ACCOUNT));
        assert_eq!(record.scope.as_deref(), Some(GMAIL_SCOPE));

        let other_keys = TestKeys::rsa(s.dir.path()).await;
        let tampered = |change: &dyn Fn(&mut Value)| {
            let mut claims = claims.clone();
            change(&mut claims);
            sign_jwt_rs256(&pkcs8, &header, &claims)
        };
        let refusals = [
            (
                "longer than an hour",
                tampered(&|c| c["exp"] = (now + 3601).into()),
                "invalid_grant",
            ),
            (
                "expired",
                tampered(&|c| {
                    c["iat"] = (now - 4000).into();
                    c["exp"] = (now - 400).into();
                }),
                "invalid_grant",
            ),
            (
                "no iat",
                tampered(&|c| {
                    drop_claim(c, "iat");
                }),
                "invalid_grant",
            ),
            (
                "aud elsewhere",
                tampered(&|c| c["aud"] = "https://oauth2.googleapis.com/token".into()),
                "invalid_grant",
            ),
            (
                "unknown account",
                tampered(&|c| c["iss"] = "x@y.test".into()),
                "invalid_grant",
            ),
            (
                "no scope",
                tampered(&|c| {
                    drop_claim(c, "scope");
                }),
                "invalid_scope",
            ),
            (
                "another key",
                sign_jwt_rs256(&other_keys.pkcs8_der(), &header, &claims),
                "invalid_grant",
            ),
            (
                "unsigned",
                unsigned_jwt(&json!({ "alg": "none" }), &claims),
                "invalid_grant",
            ),
        ];
        for (what, assertion, code) in refusals {
            let reply = grant(assertion).await;
            assert_eq!(
                (reply.status, reply.error().as_deref()),
                (400, Some(code)),
                "{what}: {reply:?}"
            );
        }

        // Without sub the token is for the service account itself (Google's behaviour).
        let own = grant(tampered(&|c| {
            drop_claim(c, "sub");
        }))
        .await
        .assert_token();
        assert_eq!(
            s.introspected_user(&s.introspection.url(), &own).await,
            Some(SERVICE_ACCOUNT.into())
        );
    })
    .await;
}

// --- controls and malformed requests --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_failures_and_delay() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let refresh = s.provider.issue_refresh_token(APP, USER, IMAP_SCOPE);

        s.provider.fail_next(2, 500, "server_error");
        s.refresh(&refresh).await.assert_error(500, "server_error");
        s.refresh(&refresh).await.assert_error(500, "server_error");
        s.provider.fail_next(1, 400, "temporarily_unavailable");
        s.refresh(&refresh)
            .await
            .assert_error(400, "temporarily_unavailable");
        // Failures change nothing: the refresh token was not consumed.
        assert_eq!(
            s.provider.current_refresh_token(USER, APP),
            Some(refresh.clone())
        );

        s.provider.set_delay(Duration::from_millis(300));
        let started = std::time::Instant::now();
        s.refresh(&refresh).await.assert_token();
        assert!(started.elapsed() >= Duration::from_millis(300));

        let results: Vec<String> = s
            .provider
            .token_requests()
            .into_iter()
            .map(|r| r.result)
            .collect();
        assert_eq!(
            results,
            [
                "server_error",
                "server_error",
                "temporarily_unavailable",
                "ok"
            ]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_token_requests() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let url = s.provider.token_url();
        let cc = [
            ("grant_type", "client_credentials"),
            ("client_id", APP),
            ("client_secret", APP_SECRET),
            ("scope", SCOPE),
        ];

        let get = s.get(&url).await;
        assert_eq!((get.status, get.header("allow")), (405, Some("POST")));

        let json_body = s
            .http
            .post(&url)
            .json(&json!({ "grant_type": "client_credentials" }))
            .send()
            .await
            .unwrap();
        Reply::read(json_body)
            .await
            .assert_error(400, "invalid_request");

        // credentials in the URI
        let in_query = s.post(&url_with(&url, &cc), None, &cc).await;
        in_query.assert_error(400, "invalid_request");

        // a parameter twice (RFC 6749 section 3.1)
        let twice = format!("{}&scope=again", form(&cc));
        let reply = s
            .http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(twice)
            .send()
            .await
            .unwrap();
        Reply::read(reply)
            .await
            .assert_error(400, "invalid_request");

        s.token(&[("client_id", APP), ("client_secret", APP_SECRET)])
            .await
            .assert_error(400, "invalid_request");
        s.token(&[("grant_type", "implicit"), ("client_id", APP)])
            .await
            .assert_error(400, "unsupported_grant_type");
        // an empty parameter counts as absent (RFC 6749 section 3.1)
        s.token(&[
            ("grant_type", "client_credentials"),
            ("client_id", APP),
            ("client_secret", APP_SECRET),
            ("scope", ""),
        ])
        .await
        .assert_error(400, "invalid_request");

        let nothing = s.get(&format!("{}/nothing", s.provider.base_url())).await;
        assert_eq!(nothing.status, 404);
        assert!(s.provider.access_tokens_issued(USER).is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_expire_and_can_be_revoked() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let cc = [
            ("grant_type", "client_credentials"),
            ("client_id", APP),
            ("client_secret", APP_SECRET),
            ("scope", SCOPE),
        ];
        s.provider.set_access_token_lifetime(Duration::from_secs(1));
        let reply = s.token(&cc).await;
        let short = reply.assert_token();
        assert_eq!(reply.json()["expires_in"], 1);
        let introspected = s
            .post(&s.provider.introspection_url(), None, &[("token", &short)])
            .await
            .json();
        assert_eq!(introspected["client_id"], APP);
        assert_eq!(introspected["scope"], SCOPE);
        assert!(introspected["exp"].as_i64().unwrap() <= unix_now() + 1);
        let expired = eventually(Duration::from_secs(5), || {
            let introspection = s.introspection.clone();
            let short = short.clone();
            async move { !introspection.is_active(&short) }
        })
        .await;
        assert!(expired, "the token outlived its expires_in");
        assert_eq!(
            s.introspected_user(&s.provider.introspection_url(), &short)
                .await,
            None
        );

        s.provider
            .set_access_token_lifetime(Duration::from_secs(3600));
        let one = s.token(&cc).await.assert_token();
        let two = s.token(&cc).await.assert_token();
        assert!(s.provider.revoke_token(&one));
        assert!(!s.introspection.is_active(&one) && s.introspection.is_active(&two));
        assert_eq!(s.provider.revoke_user(USER), 1);
        assert!(!s.introspection.is_active(&two));
        assert_eq!(s.provider.access_tokens_issued(USER), [short, one, two]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_keys_come_in_every_format() {
    with_timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let keys = TestKeys::rsa(dir.path()).await;
        let pem = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
        assert!(pem(&keys.key_pem).starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(pem(&keys.key_pkcs1_pem).starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        assert!(pem(&keys.cert_pem).starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(pem_to_der(&pem(&keys.cert_pem)) == keys.cert_der_bytes());
        assert!(pem_to_der(&pem(&keys.key_pem)) == keys.pkcs8_der());
        assert!(ring::signature::RsaKeyPair::from_pkcs8(&keys.pkcs8_der()).is_ok());
        assert_eq!(keys.key_id().len(), 40);
        let again = TestKeys::rsa(dir.path()).await;
        assert_ne!(again.dir, keys.dir);
        assert_ne!(again.cert_der_bytes(), keys.cert_der_bytes());
    })
    .await;
}

// --- against a real Dovecot -----------------------------------------------------------------

async fn imap_login(dovecot: &Dovecot, ca: &TestCa, user: &str, token: &str) -> support::CmdOutput {
    let url = format!("imaps://127.0.0.1:{}/", dovecot.imaps_port);
    let login = format!("{user}:");
    let cacert = ca.ca_pem().display().to_string();
    curl(&[
        "--cacert",
        &cacert,
        &url,
        "--login-options",
        "AUTH=OAUTHBEARER",
        "-u",
        &login,
        "--oauth2-bearer",
        token,
        "-X",
        r#"LIST "" "*""#,
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_accepts_provider_tokens() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let ca = TestCa::create().await;
        let sink = SmtpSink::start().await;
        // One Dovecot asks the test's Introspection, the other the provider itself.
        let via_introspection = Dovecot::start(&ca, &s.introspection.url(), sink.addr()).await;
        let via_provider = Dovecot::start(&ca, &s.provider.introspection_url(), sink.addr()).await;

        let reply = s
            .token(&[
                ("grant_type", "client_credentials"),
                ("client_id", APP),
                ("client_secret", APP_SECRET),
                ("scope", SCOPE),
            ])
            .await;
        let token = reply.assert_token();
        for dovecot in [&via_introspection, &via_provider] {
            let out = imap_login(dovecot, &ca, USER, &token).await;
            assert!(
                out.success() && out.stdout.contains("INBOX"),
                "{out:?}\n{}",
                dovecot.log()
            );
            // Dovecot checks the SASL user against the token's email.
            let out = imap_login(dovecot, &ca, "bob@example.test", &token).await;
            assert!(!out.success(), "{out:?}");
        }

        assert_eq!(s.provider.revoke_user(USER), 1);
        for dovecot in [&via_introspection, &via_provider] {
            let out = imap_login(dovecot, &ca, USER, &token).await;
            assert!(!out.success(), "a revoked token still works: {out:?}");
        }
    })
    .await;
}
