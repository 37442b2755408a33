//! Brute-force defence across connections: distinct wrong passwords are counted per client
//! address, per network around it and per account; a login whose address or account failed
//! recently waits before its check, the longer the more failures, and past a threshold an
//! address (or its network) is refused for a while. An account is never locked out unless
//! the operator opts in: its failures only make its logins wait, at most `max_failure_delay`.
//!
//! Counts live in bounded caches keyed by an IPv4 address or an IPv6 /64 (one host's usual
//! allocation), by the IPv4 /24 or IPv6 /48 around it, and by a keyed hash of the account id
//! (case and whitespace folded), so a flood of made-up names or addresses cannot grow memory.
//!
//! Replicas (`tokens.shared`) also count in Redis ([`SharedFailures`]), so a guesser spread
//! over them meets one budget. The local caches then hold what Redis answered as well as this
//! replica's own failures: a login from an address known for its account decides here without
//! a round trip, the re-check after a queue decides here, and while Redis does not answer
//! every decision is made here.

mod shared;

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use tokio::time::Instant;

use super::proof::Prover;
use crate::config::ThrottleConfig;
use crate::login::Credentials;
use crate::metrics::Metrics;
use crate::replicas::Redis;
use crate::token::Proof;
use shared::{Counts, Seen, SharedFailures, Subject};

/// Client addresses and accounts tracked at once; the least recently seen go first.
const MAX_TRACKED: u64 = 100_000;
/// How long a successful login makes its address known for that account.
const KNOWN_ADDRESS_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How old Redis's copy of a known pair gets before a login renews it: half its lifetime, so
/// pairs in use stay remembered, and most logins after a rollout find their pair fresh enough
/// to make no second round trip.
const KNOWN_RENEWAL: Duration = Duration::from_secs(15 * 24 * 3600);
/// Label of the key that proves wrong passwords in a throttle shared by replicas.
const PROOFS_LABEL: &str = "throttle proofs";

/// Which limit refused a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Address,
    /// The IPv4 /24 or IPv6 /48 around the address.
    Network,
    Account,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::Address => "address",
            Scope::Network => "network",
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

    /// The network around it: an IPv4 /24, an IPv6 /48 (a site's usual allocation, which
    /// holds 65,536 /64s: one budget each without this tier).
    fn network(self) -> Self {
        match self {
            AddressKey::V4(v4) => AddressKey::V4(v4 & 0xffff_ff00),
            AddressKey::V6(prefix) => AddressKey::V6(prefix & !0xffff),
        }
    }

    /// Its bytes, the family first.
    fn bytes(self) -> Vec<u8> {
        match self {
            AddressKey::V4(v4) => [&[4], v4.to_be_bytes().as_slice()].concat(),
            AddressKey::V6(prefix) => [&[6], prefix.to_be_bytes().as_slice()].concat(),
        }
    }
}

/// An account id as the throttle counts it: whitespace dropped and case folded, so that
/// `Alice`, `ALICE` and `alice ` share one count.
fn folded(account: &str) -> impl Iterator<Item = char> + '_ {
    account
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
}

/// Failures, and until when they count: the window after the last one, or as long as Redis
/// keeps them.
#[derive(Debug, Clone, Copy)]
struct Count {
    failures: u32,
    until: Instant,
}

impl Count {
    fn live(self) -> Option<u32> {
        (self.until > Instant::now()).then_some(self.failures)
    }
}

pub struct Throttle {
    config: ThrottleConfig,
    metrics: Arc<Metrics>,
    hasher: std::collections::hash_map::RandomState,
    prover: Prover,
    /// Wrong passwords already counted, by proof of (folded account, password), so a client
    /// retrying the same one counts once; forgotten `window` after its last try.
    counted: Cache<Proof, ()>,
    /// Failures per address, per network and per account; an entry lives `window` after
    /// its last failure.
    addresses: Cache<AddressKey, Count>,
    networks: Cache<AddressKey, Count>,
    accounts: Cache<u64, Count>,
    /// (account, address) pairs that logged in successfully, with when Redis forgets them
    /// (without Redis: when this process does).
    known: Cache<(u64, AddressKey), Instant>,
    /// The other replicas' counts and pairs, with `tokens.shared`.
    shared: Option<SharedFailures>,
}

impl Throttle {
    /// # Errors
    /// No random key could be drawn for the proofs of wrong passwords.
    pub fn new(config: &ThrottleConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        Ok(Self {
            config: config.clone(),
            metrics,
            hasher: std::collections::hash_map::RandomState::new(),
            prover: Prover::new()?,
            counted: Cache::builder()
                .max_capacity(MAX_TRACKED)
                .time_to_idle(config.window)
                .build(),
            addresses: failure_counts(config.window),
            networks: failure_counts(config.window),
            accounts: failure_counts(config.window),
            known: Cache::builder()
                .max_capacity(MAX_TRACKED)
                .time_to_live(KNOWN_ADDRESS_TTL)
                .build(),
            shared: None,
        })
    }

    /// Counts with the other replicas through `redis`; wrong passwords are proven under a key
    /// they all derive, so a retry on another replica still counts once.
    ///
    /// # Errors
    /// No key could be derived.
    pub fn shared_through(mut self, redis: Arc<Redis>) -> Result<Self, String> {
        self.prover = Prover::keyed(redis.derived_key(PROOFS_LABEL)?);
        self.shared = Some(SharedFailures::new(
            redis,
            self.config.window,
            KNOWN_ADDRESS_TTL,
        )?);
        Ok(self)
    }

    /// Whether a login for `account` from `client` may be checked, and how long it must
    /// wait before: a wait after the answer would end when the client hangs up. With
    /// replicas, asks Redis first (one round trip, within its deadline) unless the address
    /// is known here for the account; without an answer, decides on what this replica holds.
    ///
    /// # Errors
    /// The scope that is blocked.
    pub async fn check(&self, client: Option<IpAddr>, account: &str) -> Result<Duration, Scope> {
        let account_key = self.account_key(account);
        let address = client.map(AddressKey::of);
        if let Some(shared) = &self.shared
            && !address.is_some_and(|address| self.known.contains_key(&(account_key, address)))
        {
            let folded: String = folded(account).collect();
            let subject = subject(shared, &folded, address);
            let reading = if let Some(address) = address.filter(|_| shared.knows(&subject)) {
                // Heard of from another replica: as if Redis had said so.
                self.known
                    .insert((account_key, address), Instant::now() + KNOWN_ADDRESS_TTL);
                None
            } else {
                Some(shared.read(&subject).await)
            };
            match reading {
                None => {}
                Some(Ok(reading)) => {
                    self.learn(account_key, address, &reading.counts);
                    if let (Some(address), Some(lives)) = (address, reading.known) {
                        self.known
                            .insert((account_key, address), Instant::now() + lives);
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "throttle: deciding on this replica's counts")
                }
            }
        }
        self.decide(account_key, address)
    }

    /// [`Throttle::check`] on what this replica holds, without asking Redis: for the check
    /// again after a queue, moments after the first.
    ///
    /// # Errors
    /// The scope that is blocked.
    pub fn check_here(&self, client: Option<IpAddr>, account: &str) -> Result<Duration, Scope> {
        self.decide(self.account_key(account), client.map(AddressKey::of))
    }

    /// An address that logged in to `account` before is spared its address's and network's
    /// blocks and waits (one device with a stale password does not shut out everyone behind
    /// the same NAT), but not the account's wait.
    fn decide(&self, account: u64, address: Option<AddressKey>) -> Result<Duration, Scope> {
        let by_account = failures(&self.accounts, &account);
        let (by_address, by_network) = address.map_or((0, 0), |address| {
            (
                failures(&self.addresses, &address),
                failures(&self.networks, &address.network()),
            )
        });
        let config = &self.config;
        let account_blocked = reached(by_account, config.block_account_after);
        // Most logins come from addresses without failures: no lookup of the pair then.
        let suspect = by_address > 0 || by_network > 0 || account_blocked;
        if !suspect || address.is_some_and(|address| self.known.contains_key(&(account, address))) {
            return Ok(self.delay(by_account));
        }
        if reached(by_address, config.block_address_after) {
            Err(Scope::Address)
        } else if reached(by_network, config.block_network_after) {
            Err(Scope::Network)
        } else if account_blocked {
            Err(Scope::Account)
        } else {
            Ok(self.delay(by_account.max(by_address)))
        }
    }

    /// Counts a wrong password for `credentials`' account from `client`, unless this very
    /// password was counted for the account within the window (by any replica): a phone
    /// retrying a stale password is one failure, however often it retries. Without an answer
    /// from Redis, counted here only.
    pub async fn wrong_password(&self, client: Option<IpAddr>, credentials: &Credentials) {
        let account: String = folded(&credentials.account).collect();
        let proof = self
            .prover
            .proof_of(&account, credentials.password.expose());
        let fresh_here = self.counted.entry(proof).or_insert(()).is_fresh();
        if let Some(shared) = &self.shared {
            let address = client.map(AddressKey::of);
            match shared
                .fail(&proof, &subject(shared, &account, address))
                .await
            {
                Ok(Some(counts)) => return self.counted_by_all(&account, address, &counts),
                Ok(None) => return,
                Err(error) => {
                    tracing::debug!(%error, "throttle: counting a failure on this replica only")
                }
            }
        }
        if fresh_here {
            self.failed(client, &account);
        }
    }

    /// Counts a failure of `account` from `client`; returns how long the next login of the
    /// account or from the address will wait before its check.
    fn failed(&self, client: Option<IpAddr>, account: &str) -> Duration {
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
            self.count(
                &self.networks,
                address.network(),
                self.config.block_network_after,
                Scope::Network,
            );
            failures = failures.max(by_address);
        }
        self.delay(failures)
    }

    /// Takes in the counts after a failure Redis counted: the replica whose failure reached
    /// a threshold announces the block, once for all.
    fn counted_by_all(&self, account: &str, address: Option<AddressKey>, counts: &Counts) {
        let config = &self.config;
        self.announce(
            counts.account.failures,
            config.block_account_after,
            Scope::Account,
        );
        if address.is_some() {
            self.announce(
                counts.address.failures,
                config.block_address_after,
                Scope::Address,
            );
            self.announce(
                counts.network.failures,
                config.block_network_after,
                Scope::Network,
            );
        }
        self.learn(self.account_key(account), address, counts);
    }

    /// Remembers that `client` logged in to `account`; with replicas, in Redis too when the
    /// pair is new here or due for renewal (otherwise no round trip).
    pub async fn succeeded(&self, client: Option<IpAddr>, account: &str) {
        let Some(address) = client.map(AddressKey::of) else {
            return;
        };
        let pair = (self.account_key(account), address);
        let until = match &self.shared {
            None => Instant::now() + KNOWN_ADDRESS_TTL,
            Some(shared) => self.renewed(shared, pair, account).await,
        };
        self.known.insert(pair, until);
    }

    /// Until when Redis remembers `pair` of `account` after a login: as it did, unless the
    /// pair is new here or Redis's copy is more than [`KNOWN_RENEWAL`] old; then written anew.
    async fn renewed(
        &self,
        shared: &SharedFailures,
        pair: (u64, AddressKey),
        account: &str,
    ) -> Instant {
        let now = Instant::now();
        let remembered = now + KNOWN_ADDRESS_TTL;
        let held = self.known.get(&pair);
        if let Some(until) = held
            && until + KNOWN_RENEWAL > remembered
        {
            return until;
        }
        let folded: String = folded(account).collect();
        match shared
            .remember(&subject(shared, &folded, Some(pair.1)))
            .await
        {
            Ok(()) => remembered,
            Err(error) => {
                tracing::debug!(%error, "throttle: a known address is remembered on this replica only");
                held.unwrap_or(now)
            }
        }
    }

    /// How long a login refused by a block waits for its answer: slows a flood, no more.
    pub fn blocked_delay(&self) -> Duration {
        self.config.failure_delay
    }

    /// None without failures; else `failure_delay` doubled for each earlier failure, at
    /// most `max_failure_delay`.
    fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (failures - 1).min(16);
        self.config
            .failure_delay
            .saturating_mul(1 << doublings)
            .min(self.config.max_failure_delay)
    }

    /// Adds one failure under `key` in one step (concurrent failures are all counted, and
    /// a block is announced once); the count after it.
    fn count<K>(&self, cache: &Cache<K, Count>, key: K, block_after: u32, scope: Scope) -> u32
    where
        K: Hash + Eq + Send + Sync + Clone + 'static,
    {
        let until = Instant::now() + self.config.window;
        let failures = cache
            .entry(key)
            .and_upsert_with(|old| Count {
                failures: old
                    .and_then(|old| old.into_value().live())
                    .map_or(1, |old| old.saturating_add(1)),
                until,
            })
            .into_value()
            .failures;
        self.announce(failures, block_after, scope);
        failures
    }

    /// Logs and counts a block when `failures` just reached its threshold.
    fn announce(&self, failures: u32, block_after: u32, scope: Scope) {
        if block_after > 0 && failures == block_after {
            tracing::warn!(
                scope = scope.label(),
                failures,
                "too many failed logins: blocking for the failure window"
            );
            self.metrics.login_block(scope.label());
        }
    }

    /// Takes in the counts Redis holds for a login.
    fn learn(&self, account: u64, address: Option<AddressKey>, counts: &Counts) {
        learn(&self.accounts, account, counts.account);
        if let Some(address) = address {
            learn(&self.addresses, address, counts.address);
            learn(&self.networks, address.network(), counts.network);
        }
    }

    /// Account ids come from clients: keep a keyed hash of the folded id, never the
    /// (possibly huge) name.
    fn account_key(&self, account: &str) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        for c in folded(account) {
            hasher.write_u32(c.into());
        }
        hasher.finish()
    }
}

/// The Redis keys of a login of the `folded` account from `address`.
fn subject(shared: &SharedFailures, folded: &str, address: Option<AddressKey>) -> Subject {
    let bytes = address.map(|address| (address.bytes(), address.network().bytes()));
    shared.subject(
        folded,
        bytes
            .as_ref()
            .map(|(address, network)| (address.as_slice(), network.as_slice())),
    )
}

/// Each entry lives at most `window` after its last write.
fn failure_counts<K>(window: Duration) -> Cache<K, Count>
where
    K: Hash + Eq + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(MAX_TRACKED)
        .time_to_live(window)
        .build()
}

fn failures<K>(cache: &Cache<K, Count>, key: &K) -> u32
where
    K: Hash + Eq + Send + Sync + 'static,
{
    cache.get(key).and_then(Count::live).unwrap_or(0)
}

/// Makes `key`'s count at least what Redis holds, for as long as Redis keeps it; a higher
/// count of this replica's own (failures counted while Redis did not answer) stays.
fn learn<K>(cache: &Cache<K, Count>, key: K, seen: Seen)
where
    K: Hash + Eq + Send + Sync + Clone + 'static,
{
    if seen.failures == 0 {
        return;
    }
    let theirs = Count {
        failures: seen.failures,
        until: Instant::now() + seen.lives,
    };
    cache
        .entry(key)
        .and_upsert_with(|old| match old.map(|old| old.into_value()) {
            Some(ours) if ours.live().is_some_and(|failures| failures > seen.failures) => ours,
            _ => theirs,
        });
}

fn reached(failures: u32, block_after: u32) -> bool {
    block_after > 0 && failures >= block_after
}

#[cfg(test)]
mod shared_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn throttle_with(config: ThrottleConfig) -> Throttle {
        Throttle::new(&config, Arc::new(Metrics::new())).unwrap()
    }

    fn throttle(address_after: u32, account_after: u32) -> Throttle {
        throttle_with(ThrottleConfig {
            block_address_after: address_after,
            block_account_after: account_after,
            block_network_after: 0,
            ..ThrottleConfig::default()
        })
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    fn credentials(account: &str, password: &str) -> Credentials {
        Credentials {
            account: account.into(),
            password: Secret::new(password.into()),
        }
    }

    #[test]
    fn delay_doubles_up_to_the_cap() {
        let throttle = throttle(0, 0);
        assert_eq!(
            throttle.check_here(ip("192.0.2.1"), "alice"),
            Ok(Duration::ZERO)
        );
        let delays: Vec<u64> = (0..6)
            .map(|_| throttle.failed(ip("192.0.2.1"), "alice").as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 15, 15]);
    }

    #[tokio::test]
    async fn a_login_after_recent_failures_waits_before_its_check() {
        let throttle = throttle(0, 0);
        throttle
            .wrong_password(ip("192.0.2.1"), &credentials("alice", "guess"))
            .await;
        let second = Duration::from_secs(1);
        // Whatever the account from that address, and from anywhere for that account.
        assert_eq!(throttle.check_here(ip("192.0.2.1"), "bob"), Ok(second));
        assert_eq!(throttle.check_here(ip("198.51.100.7"), "alice"), Ok(second));
        assert_eq!(
            throttle.check_here(ip("198.51.100.7"), "bob"),
            Ok(Duration::ZERO)
        );
    }

    #[test]
    fn an_address_is_blocked_after_its_failures_whatever_the_account() {
        let throttle = throttle(3, 0);
        for account in ["a", "b", "c"] {
            assert!(throttle.check_here(ip("192.0.2.1"), account).is_ok());
            throttle.failed(ip("192.0.2.1"), account);
        }
        assert_eq!(
            throttle.check_here(ip("192.0.2.1"), "d"),
            Err(Scope::Address)
        );
        assert!(throttle.check_here(ip("192.0.2.2"), "d").is_ok());
    }

    #[test]
    fn ipv6_neighbours_in_one_slash_64_share_a_count() {
        let throttle = throttle(2, 0);
        throttle.failed(ip("2001:db8::1"), "a");
        throttle.failed(ip("2001:db8::ffff"), "a");
        assert_eq!(
            throttle.check_here(ip("2001:db8::2"), "a"),
            Err(Scope::Address)
        );
        assert!(throttle.check_here(ip("2001:db8:0:1::2"), "a").is_ok());
    }

    #[tokio::test]
    async fn a_retried_wrong_password_counts_once() {
        let throttle = throttle(2, 0);
        let stale = credentials("bob", "last year's password");
        for _ in 0..10 {
            throttle.wrong_password(ip("192.0.2.1"), &stale).await;
        }
        assert!(throttle.check_here(ip("192.0.2.1"), "alice").is_ok());
        throttle
            .wrong_password(ip("192.0.2.1"), &credentials("bob", "another"))
            .await;
        assert_eq!(
            throttle.check_here(ip("192.0.2.1"), "alice"),
            Err(Scope::Address)
        );
    }

    #[tokio::test]
    async fn case_and_whitespace_variants_of_an_account_share_one_count() {
        let throttle = throttle(0, 3);
        for (account, password) in [("Alice", "one"), ("ALICE", "two"), (" alice ", "two")] {
            throttle
                .wrong_password(ip("192.0.2.1"), &credentials(account, password))
                .await;
        }
        // " alice " repeated ALICE's guess: two failures so far.
        assert!(throttle.check_here(ip("192.0.2.9"), "alice").is_ok());
        throttle
            .wrong_password(ip("192.0.2.2"), &credentials("aLiCe\t", "three"))
            .await;
        assert_eq!(
            throttle.check_here(ip("192.0.2.9"), "ALICE "),
            Err(Scope::Account)
        );
    }

    #[tokio::test]
    async fn an_accounts_failures_make_it_wait_but_never_lock_it_by_default() {
        let throttle = throttle_with(ThrottleConfig::default());
        for n in 0..100u8 {
            let guess = credentials("alice", &format!("guess {n}"));
            throttle
                .wrong_password(ip(&format!("10.{n}.0.1")), &guess)
                .await;
        }
        assert_eq!(
            throttle.check_here(ip("198.51.100.7"), "alice"),
            Ok(ThrottleConfig::default().max_failure_delay)
        );
    }

    #[tokio::test]
    async fn an_opted_in_account_block_spares_addresses_that_logged_in_before() {
        let throttle = throttle(0, 2);
        throttle.succeeded(ip("198.51.100.7"), "alice").await;
        throttle.failed(ip("192.0.2.1"), "alice");
        throttle.failed(ip("192.0.2.2"), "alice");
        assert_eq!(
            throttle.check_here(ip("192.0.2.3"), "alice"),
            Err(Scope::Account)
        );
        assert!(throttle.check_here(ip("198.51.100.7"), "alice").is_ok());
        assert!(throttle.check_here(ip("192.0.2.3"), "bob").is_ok());
    }

    #[tokio::test]
    async fn an_address_block_spares_accounts_that_logged_in_from_it() {
        let throttle = throttle(3, 0);
        throttle.succeeded(ip("192.0.2.1"), "Alice").await;
        for n in 0..3 {
            throttle
                .wrong_password(ip("192.0.2.1"), &credentials("bob", &format!("{n}")))
                .await;
        }
        assert_eq!(
            throttle.check_here(ip("192.0.2.1"), "carol"),
            Err(Scope::Address)
        );
        // Neither blocked nor made to wait for bob's failures.
        assert_eq!(
            throttle.check_here(ip("192.0.2.1"), "alice"),
            Ok(Duration::ZERO)
        );
    }

    #[test]
    fn a_slash_24_and_a_slash_48_are_blocked_after_their_own_threshold() {
        let throttle = throttle_with(ThrottleConfig {
            block_address_after: 10,
            block_network_after: 20,
            ..ThrottleConfig::default()
        });
        for host in 1..=20 {
            throttle.failed(ip(&format!("192.0.2.{host}")), "alice");
            throttle.failed(ip(&format!("2001:db8:7:{host:x}::1")), "alice");
        }
        for (inside, outside) in [
            ("192.0.2.200", "192.0.3.1"),
            ("2001:db8:7:ffff::1", "2001:db8:8::1"),
        ] {
            assert_eq!(throttle.check_here(ip(inside), "bob"), Err(Scope::Network));
            assert!(throttle.check_here(ip(outside), "bob").is_ok());
        }
    }

    #[test]
    fn concurrent_failures_are_all_counted_and_block_once() {
        const THREADS: u32 = 8;
        const EACH: u32 = 500;
        let metrics = Arc::new(Metrics::new());
        let config = ThrottleConfig {
            block_address_after: THREADS * EACH,
            ..ThrottleConfig::default()
        };
        let throttle = Throttle::new(&config, metrics.clone()).unwrap();
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                scope.spawn(|| {
                    for _ in 0..EACH {
                        throttle.failed(ip("192.0.2.1"), "alice");
                    }
                });
            }
        });
        assert_eq!(
            throttle.check_here(ip("192.0.2.1"), "bob"),
            Err(Scope::Address)
        );
        let text = metrics.encode();
        assert!(
            text.contains("mailgate_login_blocks_total{scope=\"address\"} 1\n"),
            "{text}"
        );
    }
}
