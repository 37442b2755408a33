//! Failed basic-auth logins at the admin endpoint, counted per client address (IPv6: /64) in
//! counts of their own: mail logins cannot touch them, and one address's failures block that
//! address only. An address that logged in successfully is never blocked, so that a sidecar
//! left with an old password cannot lock out its neighbours behind the same address.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::client_auth::throttle::address_group;
use crate::metrics::Metrics;

/// Failures an address may have within [`WINDOW`] before it is blocked for the rest of it:
/// a person mistyping or a pod with a stale password, not a guesser.
const BLOCK_AFTER: u32 = 10;
/// An address's failures are forgotten this long after its last one.
const WINDOW: Duration = Duration::from_secs(15 * 60);
/// The first failure is answered after this, each further one after twice the last.
const FAILURE_DELAY: Duration = Duration::from_secs(1);
/// Passwords have 12 bytes or more (config checks): the block, not the delay, stops
/// guessing, so the delay stays short enough for a person.
const MAX_FAILURE_DELAY: Duration = Duration::from_secs(4);
/// Addresses tracked at once; the least recently seen go first.
const MAX_TRACKED: u64 = 10_000;
/// How long a successful login keeps its address exempt from blocks.
const KNOWN_TTL: Duration = Duration::from_secs(24 * 3600);

/// The answer to a blocked address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked;

pub struct AdminThrottle {
    metrics: Arc<Metrics>,
    /// Failures per address group; an entry lives [`WINDOW`] after its last failure.
    failures: Cache<IpAddr, u32>,
    /// Address groups that logged in.
    known: Cache<IpAddr, ()>,
}

impl AdminThrottle {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            failures: Cache::builder()
                .max_capacity(MAX_TRACKED)
                .time_to_live(WINDOW)
                .build(),
            known: Cache::builder()
                .max_capacity(MAX_TRACKED)
                .time_to_live(KNOWN_TTL)
                .build(),
        }
    }

    /// Whether `client` may try a password at all.
    ///
    /// # Errors
    /// The address had too many failures recently and never logged in.
    pub fn check(&self, client: IpAddr) -> Result<(), Blocked> {
        let group = address_group(client);
        let failures = self.failures.get(&group).unwrap_or(0);
        if failures >= BLOCK_AFTER && !self.known.contains_key(&group) {
            return Err(Blocked);
        }
        Ok(())
    }

    /// Counts a failed login from `client`; how long to wait before answering it.
    pub fn failed(&self, client: IpAddr) -> Duration {
        let group = address_group(client);
        // One atomic step, so that parallel failures neither lose a count nor block twice.
        let failures = self
            .failures
            .entry(group)
            .and_upsert_with(|entry| entry.map_or(0, |entry| *entry.value()).saturating_add(1))
            .into_value();
        if failures == BLOCK_AFTER && !self.known.contains_key(&group) {
            tracing::warn!(
                client = %group,
                failures,
                "too many failed admin logins from one address: blocking it for the failure window"
            );
            self.metrics.login_block("admin_address");
        }
        let doublings = failures.saturating_sub(1).min(16);
        FAILURE_DELAY
            .saturating_mul(1 << doublings)
            .min(MAX_FAILURE_DELAY)
    }

    /// Remembers that `client` logged in: its address is not blocked from now on.
    pub fn succeeded(&self, client: IpAddr) {
        let group = address_group(client);
        self.known.insert(group, ());
        self.failures.invalidate(&group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn one_address_is_blocked_and_no_other() {
        let throttle = AdminThrottle::new(Arc::new(Metrics::new()));
        let delays: Vec<u64> = (0..BLOCK_AFTER)
            .map(|_| throttle.failed(ip("192.0.2.1")).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 4, 4, 4, 4, 4, 4, 4]);
        assert_eq!(throttle.check(ip("192.0.2.1")), Err(Blocked));
        assert_eq!(throttle.check(ip("192.0.2.2")), Ok(()));
    }

    #[test]
    fn an_address_that_logged_in_is_not_blocked() {
        let throttle = AdminThrottle::new(Arc::new(Metrics::new()));
        throttle.succeeded(ip("2001:db8::1"));
        for _ in 0..BLOCK_AFTER {
            throttle.failed(ip("2001:db8::2"));
        }
        assert_eq!(throttle.check(ip("2001:db8::3")), Ok(()));
    }
}
