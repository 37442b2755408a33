//! Checking the password a client presents: `any` (the user name is the account id and the
//! password is not checked) or `static` (argon2 PHC hashes per account, checked in a bounded
//! [`hash_pool`]); and the brute-force defence around every login ([`throttle`]).

pub mod hash_pool;
pub mod throttle;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::config::{ClientAuthConfig, ClientAuthMode};
use crate::login::Credentials;
use crate::metrics::Metrics;
use crate::secret::Secret;
use hash_pool::HashPool;
use throttle::{Scope, Throttle};

/// Why a password was not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotChecked {
    #[error("password checks are overloaded")]
    Overloaded,
    /// The client's address or the account got blocked while the check waited for a worker.
    #[error("blocked after too many failed logins ({})", .0.label())]
    Blocked(Scope),
}

pub enum ClientAuth {
    Any,
    Static {
        accounts: HashMap<String, Secret<String>>,
        /// Checked for unknown accounts, so that they take as long as known ones and the
        /// answer time does not tell which accounts exist.
        decoy: Secret<String>,
        pool: HashPool,
        /// Checks waiting or running per client address (IPv6: per /64), at most `share`.
        per_address: Mutex<HashMap<IpAddr, usize>>,
        share: usize,
        metrics: Arc<Metrics>,
    },
}

/// A check counted against its address; uncounted on drop.
struct AddressTurn<'a> {
    per_address: &'a Mutex<HashMap<IpAddr, usize>>,
    address: IpAddr,
}

impl Drop for AddressTurn<'_> {
    fn drop(&mut self) {
        let mut counts = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// Takes a turn for `client`'s address, or `None` when it has its share already.
fn take_turn(
    per_address: &Mutex<HashMap<IpAddr, usize>>,
    share: usize,
    client: Option<IpAddr>,
) -> Option<Option<AddressTurn<'_>>> {
    let Some(client) = client else {
        return Some(None);
    };
    let address = throttle::address_group(client);
    let mut counts = per_address.lock().unwrap_or_else(|e| e.into_inner());
    let count = counts.entry(address).or_default();
    if *count >= share {
        return None;
    }
    *count += 1;
    Some(Some(AddressTurn {
        per_address,
        address,
    }))
}

impl ClientAuth {
    pub fn new(config: &ClientAuthConfig, metrics: Arc<Metrics>) -> Self {
        match config.mode {
            ClientAuthMode::Any => ClientAuth::Any,
            ClientAuthMode::Static => {
                let accounts: HashMap<_, _> = config
                    .accounts
                    .iter()
                    .map(|(account, hash)| (account.clone(), hash.clone()))
                    .collect();
                // Validation guarantees at least one account; its parameters are the decoy's.
                let decoy = config.accounts.values().next().cloned().unwrap_or_default();
                warn_on_mixed_parameters(config.accounts.values());
                ClientAuth::Static {
                    accounts,
                    decoy,
                    pool: HashPool::new(config.hash_workers(), config.hash_queue_timeout),
                    per_address: Mutex::new(HashMap::new()),
                    share: config.checks_per_address,
                    metrics,
                }
            }
        }
    }

    /// Whether the client at `client` may act as `credentials.account`.
    ///
    /// Parallel guesses all pass a check of the `throttle` made before they queue, so it is
    /// made again once a worker is free: a block reached meanwhile stops the rest unhashed.
    ///
    /// # Errors
    /// [`NotChecked`] when the password could not be checked in time, or the throttle
    /// blocked the client while it waited.
    pub async fn verify(
        &self,
        credentials: &Credentials,
        client: Option<IpAddr>,
        throttle: &Throttle,
    ) -> Result<bool, NotChecked> {
        let ClientAuth::Static {
            accounts,
            decoy,
            pool,
            per_address,
            share,
            metrics,
        } = self
        else {
            return Ok(true);
        };
        let Some(_turn) = take_turn(per_address, *share, client) else {
            metrics.password_check("overloaded");
            return Err(NotChecked::Overloaded);
        };
        let Ok(admitted) = pool.admit().await else {
            metrics.password_check("overloaded");
            return Err(NotChecked::Overloaded);
        };
        throttle
            .check(client, &credentials.account)
            .map_err(NotChecked::Blocked)?;
        let (hash, known) = match accounts.get(&credentials.account) {
            Some(hash) => (hash, true),
            None => (decoy, false),
        };
        let matches = pool
            .verify(admitted, hash, &credentials.password)
            .await
            .map_err(|_| NotChecked::Overloaded)?;
        let label = match (known, matches) {
            (true, true) => "ok",
            (true, false) => "wrong_password",
            (false, _) => "unknown_account",
        };
        metrics.password_check(label);
        Ok(known && matches)
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
        let auth = ClientAuth::new(&config, metrics.clone());
        let throttle = Throttle::new(&config.throttle, metrics.clone());
        let verify = |account: &str, password: &str| {
            let credentials = credentials(account, password);
            let (auth, throttle) = (&auth, &throttle);
            async move { auth.verify(&credentials, None, throttle).await }
        };
        assert_eq!(verify("alice", "right").await, Ok(true));
        assert_eq!(verify("alice", "wrong").await, Ok(false));
        // Unknown accounts cost a check too (so they answer as slowly), against a decoy
        // that is alice's hash but never lets anyone in.
        assert_eq!(verify("bob", "right").await, Ok(false));
        let text = metrics.encode();
        assert!(
            text.contains("mailgate_password_checks_total{result=\"unknown_account\"} 1"),
            "{text}"
        );
        let any = ClientAuth::Any;
        let anyone = credentials("x", "");
        assert_eq!(any.verify(&anyone, None, &throttle).await, Ok(true));
    }
}
