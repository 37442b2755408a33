//! Brute-force defence across connections: failed logins are counted per client address and
//! per account; each failure is answered later the more there were, and past a threshold the
//! address (or the account, from addresses that never logged in to it) is blocked for a while.
//!
//! Counts live in bounded caches keyed by an IPv4 address or an IPv6 /64 (one host's usual
//! allocation) and by a keyed hash of the account id, so a flood of made-up names or addresses
//! cannot grow memory.

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::config::ThrottleConfig;
use crate::metrics::Metrics;

/// Client addresses and accounts tracked at once; the least recently seen go first.
const MAX_TRACKED: u64 = 100_000;
/// How long a successful login makes its address known for that account.
const KNOWN_ADDRESS_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Which limit refused a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Address,
    Account,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::Address => "address",
            Scope::Account => "account",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AddressKey {
    V4(u32),
    /// The /64 prefix.
    V6(u64),
}

/// The address that stands for `address` in per-address counts: itself for IPv4 (an
/// IPv4-mapped IPv6 address included), its /64 for IPv6.
pub fn address_group(address: IpAddr) -> IpAddr {
    match AddressKey::of(address) {
        AddressKey::V4(v4) => IpAddr::V4(v4.into()),
        AddressKey::V6(prefix) => IpAddr::V6((u128::from(prefix) << 64).into()),
    }
}

impl AddressKey {
    fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(v4) => AddressKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(v4.into()),
                None => AddressKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

pub struct Throttle {
    config: ThrottleConfig,
    metrics: Arc<Metrics>,
    hasher: std::collections::hash_map::RandomState,
    /// Failures per address; an entry lives `window` after its last failure.
    addresses: Cache<AddressKey, u32>,
    accounts: Cache<u64, u32>,
    /// (account, address) pairs that logged in successfully.
    known: Cache<(u64, AddressKey), ()>,
}

impl Throttle {
    pub fn new(config: &ThrottleConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            config: config.clone(),
            metrics,
            hasher: std::collections::hash_map::RandomState::new(),
            addresses: failure_counts(config.window),
            accounts: failure_counts(config.window),
            known: Cache::builder()
                .max_capacity(MAX_TRACKED)
                .time_to_live(KNOWN_ADDRESS_TTL)
                .build(),
        }
    }

    /// Whether a login for `account` from `client` may be tried at all.
    ///
    /// # Errors
    /// The scope that is blocked. An account block does not apply to addresses that logged
    /// in to it before, so that guessing from elsewhere cannot lock its owner out.
    pub fn check(&self, client: Option<IpAddr>, account: &str) -> Result<(), Scope> {
        let address = client.map(AddressKey::of);
        if let Some(address) = address
            && reached(
                self.addresses.get(&address),
                self.config.block_address_after,
            )
        {
            return Err(Scope::Address);
        }
        let account = self.account_key(account);
        let known = address.is_some_and(|address| self.known.contains_key(&(account, address)));
        if !known && reached(self.accounts.get(&account), self.config.block_account_after) {
            return Err(Scope::Account);
        }
        Ok(())
    }

    /// Counts a failed login and returns how long to wait before answering it.
    pub fn failed(&self, client: Option<IpAddr>, account: &str) -> Duration {
        let mut failures = self.count(
            &self.accounts,
            self.account_key(account),
            self.config.block_account_after,
            Scope::Account,
        );
        if let Some(address) = client.map(AddressKey::of) {
            let by_address = self.count(
                &self.addresses,
                address,
                self.config.block_address_after,
                Scope::Address,
            );
            failures = failures.max(by_address);
        }
        self.delay(failures)
    }

    /// Remembers that `client` logged in to `account`.
    pub fn succeeded(&self, client: Option<IpAddr>, account: &str) {
        if let Some(address) = client.map(AddressKey::of) {
            self.known.insert((self.account_key(account), address), ());
        }
    }

    /// How long a login refused by a block waits for its answer: slows a flood, no more.
    pub fn blocked_delay(&self) -> Duration {
        self.config.failure_delay
    }

    /// `failure_delay` doubled for each earlier failure, at most `max_failure_delay`.
    fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.config
            .failure_delay
            .saturating_mul(1 << doublings)
            .min(self.config.max_failure_delay)
    }

    fn count<K>(&self, cache: &Cache<K, u32>, key: K, block_after: u32, scope: Scope) -> u32
    where
        K: Hash + Eq + Send + Sync + Clone + 'static,
    {
        let failures: u32 = cache.get(&key).unwrap_or(0).saturating_add(1);
        cache.insert(key, failures);
        if block_after > 0 && failures == block_after {
            tracing::warn!(
                scope = scope.label(),
                failures,
                "too many failed logins: blocking for the failure window"
            );
            self.metrics.login_block(scope.label());
        }
        failures
    }

    /// Account ids come from clients: keep a keyed hash, never the (possibly huge) name.
    fn account_key(&self, account: &str) -> u64 {
        self.hasher.hash_one(account)
    }
}

/// Each entry lives `window` after its last failure (every failure re-inserts it).
fn failure_counts<K>(window: Duration) -> Cache<K, u32>
where
    K: Hash + Eq + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(MAX_TRACKED)
        .time_to_live(window)
        .build()
}

fn reached(failures: Option<u32>, block_after: u32) -> bool {
    block_after > 0 && failures.is_some_and(|failures| failures >= block_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(address_after: u32, account_after: u32) -> Throttle {
        let config = ThrottleConfig {
            block_address_after: address_after,
            block_account_after: account_after,
            ..ThrottleConfig::default()
        };
        Throttle::new(&config, Arc::new(Metrics::new()))
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn delay_doubles_up_to_the_cap() {
        let throttle = throttle(0, 0);
        let delays: Vec<u64> = (0..6)
            .map(|_| throttle.failed(ip("192.0.2.1"), "alice").as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 15, 15]);
    }

    #[test]
    fn an_address_is_blocked_after_its_failures_whatever_the_account() {
        let throttle = throttle(3, 0);
        for account in ["a", "b", "c"] {
            assert_eq!(throttle.check(ip("192.0.2.1"), account), Ok(()));
            throttle.failed(ip("192.0.2.1"), account);
        }
        assert_eq!(throttle.check(ip("192.0.2.1"), "d"), Err(Scope::Address));
        assert_eq!(throttle.check(ip("192.0.2.2"), "d"), Ok(()));
    }

    #[test]
    fn ipv6_neighbours_in_one_slash_64_share_a_count() {
        let throttle = throttle(2, 0);
        throttle.failed(ip("2001:db8::1"), "a");
        throttle.failed(ip("2001:db8::ffff"), "a");
        assert_eq!(throttle.check(ip("2001:db8::2"), "a"), Err(Scope::Address));
        assert_eq!(throttle.check(ip("2001:db8:0:1::2"), "a"), Ok(()));
    }

    #[test]
    fn an_account_block_spares_addresses_that_logged_in_before() {
        let throttle = throttle(0, 2);
        throttle.succeeded(ip("198.51.100.7"), "alice");
        throttle.failed(ip("192.0.2.1"), "alice");
        throttle.failed(ip("192.0.2.2"), "alice");
        assert_eq!(
            throttle.check(ip("192.0.2.3"), "alice"),
            Err(Scope::Account)
        );
        assert_eq!(throttle.check(ip("198.51.100.7"), "alice"), Ok(()));
        assert_eq!(throttle.check(ip("192.0.2.3"), "bob"), Ok(()));
    }
}
