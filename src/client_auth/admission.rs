//! Admission before a password check: each client address (IPv6: its /64) gets a share of
//! the checks, and a check waits, with a deadline, for one of a fixed number of slots.
//! Checks are the expensive step of a login (argon2 memory, an auth server's or identity
//! provider's time), so they never run unbounded in parallel.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::throttle;

/// No room for the check: the address has its share, or no slot became free in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("password checks are overloaded")]
pub struct Overloaded;

/// Checks waiting or running per client address, at most `share` each.
pub struct PerAddress {
    counts: Mutex<HashMap<IpAddr, usize>>,
    share: usize,
}

/// A check counted against its address (none for in-memory streams); uncounted on drop.
pub struct Turn<'a> {
    counted: Option<(&'a PerAddress, IpAddr)>,
}

impl PerAddress {
    pub fn new(share: usize) -> Self {
        Self {
            counts: Mutex::new(HashMap::new()),
            share,
        }
    }

    /// Takes a turn for `client`'s address without waiting.
    ///
    /// # Errors
    /// [`Overloaded`] when the address has its share already.
    pub fn take(&self, client: Option<IpAddr>) -> Result<Turn<'_>, Overloaded> {
        let Some(client) = client else {
            return Ok(Turn { counted: None });
        };
        let address = throttle::address_group(client);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(address).or_default();
        if *count >= self.share {
            return Err(Overloaded);
        }
        *count += 1;
        Ok(Turn {
            counted: Some((self, address)),
        })
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let Some((per_address, address)) = self.counted else {
            return;
        };
        let mut counts = per_address.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&address);
            }
        }
    }
}

/// A fixed number of checks at once, waited for at most `queue_timeout`.
pub struct Slots {
    permits: Arc<Semaphore>,
    queue_timeout: Duration,
}

impl Slots {
    pub fn new(slots: usize, queue_timeout: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(slots.max(1))),
            queue_timeout,
        }
    }

    /// Waits for a free slot, at most the queue timeout; the slot is free again when the
    /// permit is dropped.
    ///
    /// # Errors
    /// [`Overloaded`] when none became free in time.
    pub async fn take(&self) -> Result<OwnedSemaphorePermit, Overloaded> {
        tokio::time::timeout(self.queue_timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| Overloaded)?
            .map_err(|_| Overloaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_share_and_its_turns_back() {
        let per_address = PerAddress::new(2);
        let ip = |text: &str| Some(text.parse::<IpAddr>().unwrap());
        let first = per_address.take(ip("192.0.2.1")).unwrap();
        let _second = per_address.take(ip("192.0.2.1")).unwrap();
        assert!(per_address.take(ip("192.0.2.1")).is_err());
        assert!(per_address.take(ip("192.0.2.2")).is_ok());
        drop(first);
        assert!(per_address.take(ip("192.0.2.1")).is_ok());
        assert!(per_address.take(None).is_ok());
    }

    #[tokio::test]
    async fn a_slot_is_waited_for_until_the_deadline() {
        let slots = Slots::new(1, Duration::from_millis(50));
        let held = slots.take().await.unwrap();
        assert_eq!(slots.take().await.err(), Some(Overloaded));
        drop(held);
        assert!(slots.take().await.is_ok());
    }
}
