//! Checking the password a client presents: `any` (the user name is the account id and the
//! password is not checked), `static` (argon2 PHC hashes per account, checked in a bounded
//! [`hash_pool`]), or delegated to an [`auth_server`] or an identity provider's
//! [`password_grant`] ([`delegated`]); and the brute-force defence around every login
//! ([`throttle`]). Every check is admitted first ([`admission`]).

pub mod admission;
pub mod auth_server;
pub mod delegated;
pub mod hash_pool;
pub mod password_grant;
pub mod proof;
pub mod throttle;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{ClientAuthConfig, ClientAuthMode, Protocol};
use crate::login::{Credentials, LoginError};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::token::TokenKey;
use crate::token::cache::{Cached, TokenCache};
use admission::{Overloaded, PerAddress};
use delegated::{Check, Delegated};
use hash_pool::HashPool;
use throttle::{Scope, Throttle};

/// `mailgate_password_checks_total{result}` labels of mode `static`.
const STATIC_RESULTS: [&str; 4] = ["ok", "wrong_password", "unknown_account", "overloaded"];

/// One login as the client check sees it.
pub struct Attempt<'a> {
    pub credentials: &'a Credentials,
    /// The client's address; `None` over in-memory streams.
    pub client: Option<IpAddr>,
    pub protocol: Protocol,
}

/// A password accepted, and where the session's token comes from.
#[derive(Clone)]
pub enum Accepted {
    /// From the token sources, for this account id.
    Account(String),
    /// From the password grant that checked it, kept in the token cache under this key.
    Granted(TokenKey, Arc<Cached>),
}

/// Why a password was not accepted. Classified once in [`CheckError::login_error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// A wrong password or an unknown account: a failed login.
    #[error("wrong password or unknown account")]
    Refused,
    #[error("password checks are overloaded")]
    Overloaded,
    /// The client's address or the account got blocked while the check waited for its turn.
    #[error("blocked after too many failed logins ({})", .0.label())]
    Blocked(Scope),
    /// The auth server or identity provider gave no usable answer; the text holds no secret.
    #[error("password check unavailable: {0}")]
    Unavailable(String),
}

impl CheckError {
    pub fn login_error(&self) -> LoginError {
        match self {
            CheckError::Refused => LoginError::BadCredentials,
            CheckError::Overloaded => LoginError::Overloaded,
            CheckError::Blocked(_) => LoginError::Throttled,
            CheckError::Unavailable(_) => LoginError::CheckUnavailable,
        }
    }
}

impl From<Overloaded> for CheckError {
    fn from(_: Overloaded) -> Self {
        CheckError::Overloaded
    }
}

pub enum ClientAuth {
    Any,
    Static(Hashes),
    Delegated(Box<Delegated>),
}

/// Mode `static`.
pub struct Hashes {
    accounts: HashMap<String, Secret<String>>,
    /// Checked for unknown accounts, so that they take as long as known ones and the answer
    /// time does not tell which accounts exist.
    decoy: Secret<String>,
    pool: HashPool,
    per_address: PerAddress,
    metrics: Arc<Metrics>,
}

impl ClientAuth {
    /// The check `config` describes, its `mailgate_password_checks_total` series at 0.
    ///
    /// # Errors
    /// An HTTP client cannot be built, or no random key drawn.
    pub fn new(config: &ClientAuthConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let (auth, results): (_, &[&str]) = match config.mode {
            ClientAuthMode::Any => (ClientAuth::Any, &[]),
            ClientAuthMode::Static => (
                ClientAuth::Static(Hashes::new(config, metrics.clone())),
                &STATIC_RESULTS,
            ),
            ClientAuthMode::AuthServer => {
                let section = config.auth_server.as_ref().ok_or(MISSING_SECTION)?;
                let server = auth_server::AuthServerCheck::new(section)?;
                let check = Check::auth_server(server, config.remember);
                let delegated = Delegated::new(check, config, metrics.clone())?;
                (
                    ClientAuth::Delegated(Box::new(delegated)),
                    &delegated::RESULTS,
                )
            }
            ClientAuthMode::OAuth2Password => {
                let section = config.oauth2_password.as_ref().ok_or(MISSING_SECTION)?;
                let check = Check::PasswordGrant(password_grant::PasswordGrant::new(section)?);
                let delegated = Delegated::new(check, config, metrics.clone())?;
                (
                    ClientAuth::Delegated(Box::new(delegated)),
                    &delegated::RESULTS,
                )
            }
        };
        for result in results {
            metrics.export_password_check(result);
        }
        Ok(auth)
    }

    /// Whether the client may log in with `attempt`'s credentials, and as which account.
    ///
    /// # Errors
    /// See [`CheckError`].
    pub async fn verify(
        &self,
        attempt: &Attempt<'_>,
        throttle: &Throttle,
        tokens: &TokenCache,
    ) -> Result<Accepted, CheckError> {
        match self {
            ClientAuth::Any => Ok(Accepted::Account(attempt.credentials.account.clone())),
            ClientAuth::Static(hashes) => hashes.verify(attempt, throttle).await,
            ClientAuth::Delegated(delegated) => delegated.verify(attempt, throttle, tokens).await,
        }
    }
}

/// Configuration checks refuse a delegated mode without its section first.
const MISSING_SECTION: &str = "client_auth: the mode's section is missing";

impl Hashes {
    fn new(config: &ClientAuthConfig, metrics: Arc<Metrics>) -> Self {
        let accounts: HashMap<_, _> = config
            .accounts
            .iter()
            .map(|(account, hash)| (account.clone(), hash.clone()))
            .collect();
        // Validation guarantees at least one account; its parameters are the decoy's.
        let decoy = config.accounts.values().next().cloned().unwrap_or_default();
        warn_on_mixed_parameters(config.accounts.values());
        Self {
            accounts,
            decoy,
            pool: HashPool::new(config.hash_workers(), config.hash_queue_timeout),
            per_address: PerAddress::new(config.checks_per_address),
            metrics,
        }
    }

    /// Parallel guesses all pass a check of the `throttle` made before they queue, so it is
    /// made again once a worker is free: a block reached meanwhile stops the rest unhashed.
    async fn verify(
        &self,
        attempt: &Attempt<'_>,
        throttle: &Throttle,
    ) -> Result<Accepted, CheckError> {
        let credentials = attempt.credentials;
        let overloaded = |_| {
            self.metrics.password_check("overloaded");
            CheckError::Overloaded
        };
        let _turn = self.per_address.take(attempt.client).map_err(overloaded)?;
        let admitted = self.pool.admit().await.map_err(overloaded)?;
        throttle
            .check_here(attempt.client, &credentials.account)
            .map_err(CheckError::Blocked)?;
        let (hash, known) = match self.accounts.get(&credentials.account) {
            Some(hash) => (hash, true),
            None => (&self.decoy, false),
        };
        let matches = self
            .pool
            .verify(admitted, hash, &credentials.password)
            .await?;
        let label = match (known, matches) {
            (true, true) => "ok",
            (true, false) => "wrong_password",
            (false, _) => "unknown_account",
        };
        self.metrics.password_check(label);
        if known && matches {
            Ok(Accepted::Account(credentials.account.clone()))
        } else {
            Err(CheckError::Refused)
        }
    }
}

/// An unknown account is checked against one decoy, so it answers as fast as accounts with
/// the decoy's parameters and no others: say so when the hashes differ.
fn warn_on_mixed_parameters<'a>(hashes: impl Iterator<Item = &'a Secret<String>>) {
    let mut parameters: Vec<String> = hashes
        .filter_map(|hash| {
            let parsed = argon2::PasswordHash::new(hash.expose()).ok()?;
            Some(format!("{}${}", parsed.algorithm, parsed.params))
        })
        .collect();
    parameters.sort();
    parameters.dedup();
    if parameters.len() > 1 {
        tracing::warn!(
            kinds = parameters.len(),
            "client_auth accounts use different argon2 parameters: answer times can tell which accounts exist; hash them all with the same parameters"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hash_pool::tests::test_hash;

    fn credentials(account: &str, password: &str) -> Credentials {
        Credentials {
            account: account.into(),
            password: Secret::new(password.into()),
        }
    }

    #[tokio::test]
    async fn static_mode_checks_the_hash() {
        let config = ClientAuthConfig {
            mode: ClientAuthMode::Static,
            accounts: [("alice".to_owned(), test_hash("right"))].into(),
            ..ClientAuthConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let auth = ClientAuth::new(&config, metrics.clone()).unwrap();
        let throttle = Throttle::new(&config.throttle, metrics.clone()).unwrap();
        let tokens = TokenCache::without_sources(metrics.clone());
        let verify = |account: &'static str, password: &str| {
            let credentials = credentials(account, password);
            let (auth, throttle, tokens) = (&auth, &throttle, &tokens);
            async move {
                let attempt = Attempt {
                    credentials: &credentials,
                    client: None,
                    protocol: Protocol::Imap,
                };
                let verified = auth.verify(&attempt, throttle, tokens).await;
                verified.map(|accepted| matches!(accepted, Accepted::Account(a) if a == account))
            }
        };
        assert_eq!(verify("alice", "right").await, Ok(true));
        assert_eq!(verify("alice", "wrong").await, Err(CheckError::Refused));
        // Unknown accounts are checked against a decoy that is alice's hash but never lets
        // anyone in (that they answer as slowly is the next test's).
        assert_eq!(verify("bob", "right").await, Err(CheckError::Refused));
        let text = metrics.encode();
        assert!(
            text.contains("mailgate_password_checks_total{result=\"unknown_account\"} 1"),
            "{text}"
        );
        let any = ClientAuth::Any;
        let anyone = credentials("x", "");
        let attempt = Attempt {
            credentials: &anyone,
            client: None,
            protocol: Protocol::Smtp,
        };
        assert!(any.verify(&attempt, &throttle, &tokens).await.is_ok());
    }

    /// A hash costly enough (8 MiB, two passes) that its time stands out of scheduling noise.
    fn costly_hash(password: &str) -> Secret<String> {
        use argon2::PasswordHasher as _;
        let params = argon2::Params::new(8 * 1024, 2, 1, None).unwrap();
        let argon2 =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = argon2::password_hash::SaltString::from_b64("c29tZXNhbHRzb21lc2FsdA").unwrap();
        Secret::new(
            argon2
                .hash_password(password.as_bytes(), &salt)
                .unwrap()
                .to_string(),
        )
    }

    fn median(mut times: Vec<std::time::Duration>) -> std::time::Duration {
        times.sort();
        times[times.len() / 2]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unknown_account_takes_as_long_as_a_wrong_password() {
        let config = ClientAuthConfig {
            mode: ClientAuthMode::Static,
            hash_workers: Some(1),
            accounts: [("alice".to_owned(), costly_hash("right"))].into(),
            ..ClientAuthConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let auth = ClientAuth::new(&config, metrics.clone()).unwrap();
        let throttle = Throttle::new(&config.throttle, metrics.clone()).unwrap();
        let tokens = TokenCache::without_sources(metrics);
        let refused_after = |account: &'static str| {
            let (auth, throttle, tokens) = (&auth, &throttle, &tokens);
            async move {
                let credentials = credentials(account, "wrong");
                let attempt = Attempt {
                    credentials: &credentials,
                    client: None,
                    protocol: Protocol::Imap,
                };
                let started = tokio::time::Instant::now();
                let verified = auth.verify(&attempt, throttle, tokens).await;
                assert!(matches!(verified, Err(CheckError::Refused)));
                started.elapsed()
            }
        };
        // The worker's first check allocates its memory: not part of either answer.
        refused_after("alice").await;
        let (mut known, mut unknown) = (Vec::new(), Vec::new());
        // Interleaved, so that load from elsewhere slows both alike.
        for _ in 0..9 {
            known.push(refused_after("alice").await);
            unknown.push(refused_after("mallory").await);
        }
        let (known, unknown) = (median(known), median(unknown));
        // Generous: without the decoy an unknown account answers hundreds of times sooner.
        assert!(
            unknown * 3 > known && unknown < known * 3,
            "unknown account refused after {unknown:?}, a known one's wrong password after {known:?}"
        );
    }
}
