//! The delegated modes around their checks ([`auth_server`](super::auth_server),
//! [`password_grant`](super::password_grant)): admission (a share per client address, a
//! bounded number at once, waited for with a deadline), the throttle asked again once
//! admitted, one check shared by concurrent logins with the same password, and the memory of
//! verified passwords, kept only as proofs (keyed hashes) for `remember`.
//!
//! Only an accepted password is remembered. An auth server's answer is remembered by proof,
//! protocol and client address (what its request said); a password grant's token lives in
//! the token cache under a key with the proof, so a login with another password never finds it.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use super::admission::{Overloaded, PerAddress, Slots};
use super::auth_server::AuthServerCheck;
use super::password_grant::PasswordGrant;
use super::proof::Prover;
use super::throttle::Throttle;
use super::{Accepted, Attempt, CheckError};
use crate::config::{ClientAuthConfig, Protocol};
use crate::metrics::Metrics;
use crate::token::cache::TokenCache;
use crate::token::{Proof, TokenKey};

/// Verified passwords remembered at once; the least recently used go first.
const MAX_REMEMBERED: u64 = 100_000;

/// The `result` labels of `mailgate_password_checks_total` in these modes.
pub const RESULTS: [&str; 5] = [
    "ok",
    "remembered",
    "wrong_password",
    "unavailable",
    "overloaded",
];

/// Where passwords are checked.
pub enum Check {
    /// An auth server, whose accepting answers (the account id) are remembered.
    AuthServer {
        server: AuthServerCheck,
        remembered: Cache<Remembered, String>,
    },
    /// An identity provider's password grant; its tokens are remembered in the token cache.
    PasswordGrant(PasswordGrant),
}

impl Check {
    pub fn auth_server(server: AuthServerCheck, remember: Duration) -> Self {
        Check::AuthServer {
            server,
            remembered: Cache::builder()
                .max_capacity(MAX_REMEMBERED)
                .time_to_live(remember)
                .build(),
        }
    }
}

/// What an auth server's accepting answer is remembered by: what its request said, with the
/// password as a proof.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Remembered {
    proof: Proof,
    protocol: Protocol,
    client: Option<IpAddr>,
}

pub struct Delegated {
    check: Check,
    per_address: PerAddress,
    slots: Slots,
    prover: Prover,
    remember: Duration,
    metrics: Arc<Metrics>,
}

impl Delegated {
    /// # Errors
    /// No random key could be drawn.
    pub fn new(
        check: Check,
        config: &ClientAuthConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        Ok(Self {
            check,
            per_address: PerAddress::new(config.checks_per_address),
            slots: Slots::new(config.delegated_checks, config.hash_queue_timeout),
            prover: Prover::new()?,
            remember: config.remember,
            metrics,
        })
    }

    /// Whether `attempt`'s password is accepted, remembered or checked now.
    ///
    /// # Errors
    /// See [`CheckError`]; shared by the logins that waited on the same check.
    pub async fn verify(
        &self,
        attempt: &Attempt<'_>,
        throttle: &Throttle,
        tokens: &TokenCache,
    ) -> Result<Accepted, CheckError> {
        let proof = self.prover.proof(attempt.credentials);
        match &self.check {
            Check::AuthServer { server, remembered } => {
                let key = Remembered {
                    proof,
                    protocol: attempt.protocol,
                    client: attempt.client,
                };
                let entry = remembered
                    .entry(key)
                    .or_try_insert_with(self.admitted(attempt, throttle, server.check(attempt)))
                    .await
                    .map_err(|error| (*error).clone())?;
                self.count_unless_checked(entry.is_fresh());
                Ok(Accepted::Account(entry.into_value()))
            }
            Check::PasswordGrant(grant) => {
                let key = TokenKey {
                    proof: Some(proof),
                    ..TokenKey::shared(&attempt.credentials.account, None)
                };
                let granted = self.admitted(attempt, throttle, grant.grant(attempt.credentials));
                let (token, fresh) = tokens
                    .get_or_grant(&key, self.remember, granted)
                    .await
                    .map_err(|error| (*error).clone())?;
                self.count_unless_checked(fresh);
                Ok(Accepted::Granted(key, token))
            }
        }
    }

    /// Runs `check` once admitted: within the client address's share, in a slot free within
    /// the queue timeout, and still not blocked by the throttle. Counts the outcome.
    async fn admitted<T>(
        &self,
        attempt: &Attempt<'_>,
        throttle: &Throttle,
        check: impl Future<Output = Result<T, CheckError>>,
    ) -> Result<T, CheckError> {
        let _turn = self
            .per_address
            .take(attempt.client)
            .map_err(|o| self.overloaded(o))?;
        let _slot = self.slots.take().await.map_err(|o| self.overloaded(o))?;
        // Parallel guesses all passed the throttle before they queued: ask it again.
        throttle
            .check_here(attempt.client, &attempt.credentials.account)
            .map_err(CheckError::Blocked)?;
        let result = check.await;
        let label = match &result {
            Ok(_) => "ok",
            Err(CheckError::Refused) => "wrong_password",
            Err(_) => "unavailable",
        };
        self.metrics.password_check(label);
        result
    }

    fn overloaded(&self, _: Overloaded) -> CheckError {
        self.metrics.password_check("overloaded");
        CheckError::Overloaded
    }

    /// A login accepted without a check of its own (remembered, or sharing a concurrent one).
    fn count_unless_checked(&self, checked: bool) {
        if !checked {
            self.metrics.password_check("remembered");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::{AuthServerConfig, ClientAuthMode};
    use crate::login::Credentials;
    use crate::secret::Secret;

    /// An auth server on 127.0.0.1 that accepts the password `right` (answering `account`
    /// `acct-7`), answers `slow` after a second, and refuses others with 403; counts the
    /// requests.
    async fn auth_server(requests: Arc<AtomicUsize>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/check", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                requests.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = vec![0u8; 4096];
                    let n = stream.read(&mut request).await.unwrap();
                    let text = String::from_utf8_lossy(&request[..n]).into_owned();
                    if text.contains(r#""password":"slow""#) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    let answer = if text.contains(r#""password":"right""#) {
                        "200 OK\r\nContent-Length: 20\r\n\r\n{\"account\":\"acct-7\"}"
                    } else {
                        "403 Forbidden\r\nContent-Length: 0\r\n\r\n"
                    };
                    let answer = format!("HTTP/1.1 {answer}");
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        url
    }

    async fn delegated(config: ClientAuthConfig) -> (Delegated, Arc<AtomicUsize>, Arc<Metrics>) {
        crate::tls::install_crypto_provider();
        let requests = Arc::new(AtomicUsize::new(0));
        let section = AuthServerConfig {
            url: Secret::new(auth_server(requests.clone()).await),
            timeout: Duration::from_secs(5),
            password_file: None,
            password_env: None,
            ca_file: None,
        };
        let metrics = Arc::new(Metrics::new());
        let server = AuthServerCheck::new(&section).unwrap();
        let check = Check::auth_server(server, config.remember);
        let delegated = Delegated::new(check, &config, metrics.clone()).unwrap();
        (delegated, requests, metrics)
    }

    fn remembering(remember: Duration) -> ClientAuthConfig {
        ClientAuthConfig {
            mode: ClientAuthMode::AuthServer,
            remember,
            ..ClientAuthConfig::default()
        }
    }

    async fn verify(
        delegated: &Delegated,
        metrics: &Arc<Metrics>,
        password: &str,
    ) -> Result<String, CheckError> {
        verify_from(delegated, metrics, password, "192.0.2.1").await
    }

    async fn verify_from(
        delegated: &Delegated,
        metrics: &Arc<Metrics>,
        password: &str,
        client: &str,
    ) -> Result<String, CheckError> {
        let credentials = Credentials {
            account: "alice".into(),
            password: Secret::new(password.into()),
        };
        let attempt = Attempt {
            credentials: &credentials,
            client: Some(client.parse().unwrap()),
            protocol: Protocol::Imap,
        };
        let throttle = Throttle::new(&Default::default(), metrics.clone()).unwrap();
        match delegated
            .verify(
                &attempt,
                &throttle,
                &TokenCache::without_sources(metrics.clone()),
            )
            .await?
        {
            Accepted::Account(account) => Ok(account),
            Accepted::Granted(..) => unreachable!("an auth server grants no tokens"),
        }
    }

    #[tokio::test]
    async fn only_an_accepted_password_is_remembered() {
        let (delegated, requests, metrics) = delegated(remembering(Duration::from_secs(60))).await;
        assert_eq!(
            verify(&delegated, &metrics, "right").await,
            Ok("acct-7".into())
        );
        assert_eq!(
            verify(&delegated, &metrics, "right").await,
            Ok("acct-7".into())
        );
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        for _ in 0..2 {
            assert_eq!(
                verify(&delegated, &metrics, "wrong").await,
                Err(CheckError::Refused)
            );
        }
        assert_eq!(requests.load(Ordering::SeqCst), 3);
        let text = metrics.encode();
        for expected in [
            "mailgate_password_checks_total{result=\"ok\"} 1",
            "mailgate_password_checks_total{result=\"remembered\"} 1",
            "mailgate_password_checks_total{result=\"wrong_password\"} 2",
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
    }

    #[tokio::test]
    async fn remember_zero_checks_every_login() {
        let (delegated, requests, metrics) = delegated(remembering(Duration::ZERO)).await;
        for _ in 0..3 {
            assert_eq!(
                verify(&delegated, &metrics, "right").await,
                Ok("acct-7".into())
            );
        }
        assert_eq!(requests.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn checks_wait_for_their_share_and_a_slot() {
        let config = ClientAuthConfig {
            checks_per_address: 1,
            delegated_checks: 2,
            hash_queue_timeout: Duration::from_millis(100),
            ..remembering(Duration::ZERO)
        };
        let (delegated, _, metrics) = delegated(config).await;
        let busy = async {
            let (a, b) = tokio::join!(
                verify_from(&delegated, &metrics, "slow", "192.0.2.1"),
                verify_from(&delegated, &metrics, "slow", "192.0.2.2"),
            );
            assert_eq!((a, b), (Err(CheckError::Refused), Err(CheckError::Refused)));
        };
        let squeezed = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            // 192.0.2.1 has its one check running; 192.0.2.3 finds both slots taken.
            let own_address = verify_from(&delegated, &metrics, "right", "192.0.2.1").await;
            let no_slot = verify_from(&delegated, &metrics, "right", "192.0.2.3").await;
            (own_address, no_slot)
        };
        let ((), (own_address, no_slot)) = tokio::join!(busy, squeezed);
        assert_eq!(own_address, Err(CheckError::Overloaded));
        assert_eq!(no_slot, Err(CheckError::Overloaded));
        let text = metrics.encode();
        assert!(
            text.contains("mailgate_password_checks_total{result=\"overloaded\"} 2"),
            "{text}"
        );
        assert_eq!(
            verify(&delegated, &metrics, "right").await,
            Ok("acct-7".into())
        );
    }
}
