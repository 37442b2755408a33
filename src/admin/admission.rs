//! Who gets a connection to the admin endpoint: a share for every request, a reserve that
//! serves only the probes and the scrape (`/healthz`, `/readyz`, `/metrics`) once that share
//! is full, and a cap per client address (IPv6: /64) over both. When a limit is hit, it is
//! counted and a warning is logged, at most once a minute.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::client_auth::throttle::address_group;
use crate::metrics::Metrics;

/// Scrapers, probes and a person at the onboarding page need a handful of connections, the
/// token service one per sidecar at a time; more are not served, so that no one can hold the
/// process's descriptors through this port.
const SHARED_CONNECTIONS: usize = 64;
/// Taken only when the shared ones are all in use: the liveness probe must answer even then,
/// or a stranger holding the page's connections has the pod restarted.
const PROBE_CONNECTIONS: usize = 16;
/// One address (a pod, a NAT, an attacker) may hold a quarter of the shared connections.
const PER_ADDRESS: usize = 16;
/// Limits hit are warned about at most this often (each is counted in the metric).
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// What an admitted connection may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// Every path.
    Any,
    /// `/healthz`, `/readyz` and `/metrics` only.
    ProbesOnly,
}

/// Why a connection was not admitted (closed at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address holds [`PER_ADDRESS`] connections already.
    PerAddress,
    /// Both the shared connections and the reserve are in use.
    Full,
}

pub struct Admission {
    metrics: Arc<Metrics>,
    counts: Mutex<Counts>,
    /// When the last warning went out, and the limits hit since then.
    warned: Mutex<(Option<Instant>, u64)>,
}

#[derive(Default)]
struct Counts {
    shared: usize,
    probes: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// An admitted connection's place; given back when dropped.
pub struct Slot {
    admission: Arc<Admission>,
    share: Share,
    address: IpAddr,
}

impl Slot {
    pub fn share(&self) -> Share {
        self.share
    }
}

impl Admission {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        for reason in ["per_address", "probes_only", "full"] {
            metrics.admin_connection_limited(reason, 0);
        }
        Self {
            metrics,
            counts: Mutex::new(Counts::default()),
            warned: Mutex::new((None, 0)),
        }
    }

    /// A place for a connection from `client`.
    ///
    /// # Errors
    /// Why there is none; the connection is to be closed.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Slot, Refused> {
        let address = address_group(client);
        let admitted = {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let held = counts.by_address.get(&address).copied().unwrap_or(0);
            let share = if held >= PER_ADDRESS {
                Err(Refused::PerAddress)
            } else if counts.shared < SHARED_CONNECTIONS {
                counts.shared += 1;
                Ok(Share::Any)
            } else if counts.probes < PROBE_CONNECTIONS {
                counts.probes += 1;
                Ok(Share::ProbesOnly)
            } else {
                Err(Refused::Full)
            };
            if share.is_ok() {
                *counts.by_address.entry(address).or_default() += 1;
            }
            share
        };
        match admitted {
            Ok(Share::Any) => {}
            Ok(Share::ProbesOnly) => self.limited("probes_only", client),
            Err(Refused::PerAddress) => self.limited("per_address", client),
            Err(Refused::Full) => self.limited("full", client),
        }
        admitted.map(|share| Slot {
            admission: self.clone(),
            share,
            address,
        })
    }

    /// Counts a limit hit, and warns unless a warning went out within [`WARNING_INTERVAL`].
    fn limited(&self, reason: &'static str, client: IpAddr) {
        self.metrics.admin_connection_limited(reason, 1);
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        let (last, since) = &mut *warned;
        if last.is_some_and(|last| last.elapsed() < WARNING_INTERVAL) {
            *since += 1;
            return;
        }
        tracing::warn!(
            reason,
            %client,
            also_limited_since_last_warning = *since,
            "admin endpoint connection limit reached (probes_only: only /healthz, /readyz and /metrics are served)"
        );
        *last = Some(Instant::now());
        *since = 0;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match self.share {
            Share::Any => counts.shared -= 1,
            Share::ProbesOnly => counts.probes -= 1,
        }
        if let Some(held) = counts.by_address.get_mut(&self.address) {
            *held -= 1;
            if *held == 0 {
                counts.by_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[tokio::test]
    async fn the_reserve_takes_over_when_the_shared_connections_are_in_use() {
        let admission = Arc::new(Admission::new(Arc::new(Metrics::new())));
        let mut held = Vec::new();
        for n in 0..SHARED_CONNECTIONS {
            let slot = admission.admit(ip(n as u8 / 8)).unwrap();
            assert_eq!(slot.share(), Share::Any);
            held.push(slot);
        }
        let probe = admission.admit(ip(200)).unwrap();
        assert_eq!(probe.share(), Share::ProbesOnly);
        drop(held.pop());
        assert_eq!(admission.admit(ip(201)).unwrap().share(), Share::Any);
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share() {
        let admission = Arc::new(Admission::new(Arc::new(Metrics::new())));
        let held: Vec<Slot> = (0..PER_ADDRESS)
            .map(|_| admission.admit(ip(1)).unwrap())
            .collect();
        assert_eq!(admission.admit(ip(1)).err(), Some(Refused::PerAddress));
        assert!(admission.admit(ip(2)).is_ok());
        drop(held);
        assert!(admission.admit(ip(1)).is_ok());
    }
}
