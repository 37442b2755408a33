//! The connection slots of one listen address: `max_connections` and
//! `max_connections_per_client`, exact under bursts, and the eviction of the oldest connection
//! still before login when the listener is full.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;

/// The sessions open on one listen address, in total and per client address (IPv6: /64).
/// A slot is taken before a session's task is spawned and moves into it, so the limits hold
/// however fast connections arrive (a gauge read before the task runs would let a burst
/// through). Counted here rather than with semaphores so that a reload can change them.
///
/// A full listener makes room by evicting its oldest session still before login, as Dovecot's
/// login processes do: otherwise connections that never log in could hold every slot.
/// Logged-in sessions are never evicted.
#[derive(Default)]
pub(super) struct Slots {
    counts: std::sync::Mutex<SlotCounts>,
}

#[derive(Default)]
struct SlotCounts {
    open: usize,
    by_client: HashMap<IpAddr, usize>,
    /// Sessions before login by admission number, so the first is the oldest.
    before_login: BTreeMap<u64, Evictable>,
    admitted: u64,
}

/// What evicting a session before login takes: its counts, and the signal it waits on.
struct Evictable {
    client: Option<IpAddr>,
    active: Gauge,
    evict: oneshot::Sender<()>,
}

/// Why no slot was free.
pub(super) enum Full {
    Listener,
    Client,
}

/// One session's place under the limits; frees it and lowers the gauge on drop, unless an
/// eviction freed it already.
pub(super) struct Slot {
    slots: Arc<Slots>,
    id: u64,
    /// The address group it counts against, once known.
    client: Option<IpAddr>,
    active: Gauge,
    logged_in: bool,
}

/// A slot for a new connection, and whether an older one was evicted for it.
pub(super) struct Admission {
    pub(super) slot: Slot,
    /// Completes when the session is evicted.
    pub(super) evicted: oneshot::Receiver<()>,
    pub(super) made_room: bool,
}

impl Slots {
    /// A slot for a connection from `peer`, counted against the client's address unless
    /// `client` is `None` (a load balancer's connection, counted once its header names the
    /// client: [`Slot::charge_client`]). A full listener evicts its oldest session before login.
    /// `limits`: `max_connections` and `max_connections_per_client`.
    pub(super) fn try_take(
        self: &Arc<Self>,
        (max_connections, max_per_client): (usize, usize),
        client: Option<IpAddr>,
        active: Gauge,
    ) -> Result<Admission, Full> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let client = client.map(crate::client_auth::throttle::address_group);
        let made_room = counts.open >= max_connections;
        let oldest = if made_room {
            let (_, oldest) = counts
                .before_login
                .first_key_value()
                .ok_or(Full::Listener)?;
            Some(oldest.client)
        } else {
            None
        };
        if let Some(group) = client {
            // Evicting the client's own oldest connection keeps it within its share (on
            // loopback the one client's share is the whole listener); anyone else's does not.
            let freed = usize::from(oldest == Some(Some(group)));
            if counts.of_client(group) - freed >= max_per_client {
                return Err(Full::Client);
            }
        }
        if made_room && let Some((_, oldest)) = counts.before_login.pop_first() {
            counts.release(oldest.client, &oldest.active);
            let _ = oldest.evict.send(());
        }
        if let Some(group) = client {
            *counts.by_client.entry(group).or_default() += 1;
        }
        counts.open += 1;
        counts.admitted += 1;
        let id = counts.admitted;
        let (evict, evicted) = oneshot::channel();
        counts.before_login.insert(
            id,
            Evictable {
                client,
                active: active.clone(),
                evict,
            },
        );
        active.inc();
        let slot = Slot {
            slots: self.clone(),
            id,
            client,
            active,
            logged_in: false,
        };
        Ok(Admission {
            slot,
            evicted,
            made_room,
        })
    }
}

impl SlotCounts {
    fn of_client(&self, group: IpAddr) -> usize {
        self.by_client.get(&group).copied().unwrap_or(0)
    }

    /// Frees one session's counts.
    fn release(&mut self, client: Option<IpAddr>, active: &Gauge) {
        self.open -= 1;
        if let Some(client) = client
            && let Some(of_client) = self.by_client.get_mut(&client)
        {
            *of_client -= 1;
            if *of_client == 0 {
                self.by_client.remove(&client);
            }
        }
        active.dec();
    }
}

impl Slot {
    /// Counts the slot against `client` once a load balancer's header has named it.
    pub(super) fn charge_client(&mut self, client: IpAddr, limit: usize) -> Result<(), Full> {
        let mut counts = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        let group = crate::client_auth::throttle::address_group(client);
        if counts.of_client(group) >= limit {
            return Err(Full::Client);
        }
        // Evicted meanwhile: it counts for nothing any more.
        let Some(evictable) = counts.before_login.get_mut(&self.id) else {
            return Ok(());
        };
        evictable.client = Some(group);
        *counts.by_client.entry(group).or_default() += 1;
        self.client = Some(group);
        Ok(())
    }

    /// Whether a newer connection took this one's place.
    pub(super) fn is_evicted(&self) -> bool {
        let counts = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        !self.logged_in && !counts.before_login.contains_key(&self.id)
    }

    /// The session has logged in: it can no longer be evicted. `false` if it was already.
    pub(super) fn log_in(&mut self) -> bool {
        let mut counts = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        self.logged_in = counts.before_login.remove(&self.id).is_some();
        self.logged_in
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        if self.logged_in || counts.before_login.remove(&self.id).is_some() {
            counts.release(self.client, &self.active);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)));
    const TWO: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2)));

    fn open(slots: &Arc<Slots>) -> usize {
        slots.counts.lock().unwrap().open
    }

    #[test]
    fn a_full_listener_evicts_the_oldest_before_login_and_counts_each_slot_once() {
        let slots = Arc::new(Slots::default());
        let active = Gauge::default();
        let take = |client| slots.try_take((2, 10), client, active.clone());
        let mut logged_in = take(ONE).ok().unwrap();
        assert!(logged_in.slot.log_in());
        let mut waiting = take(TWO).ok().unwrap();
        let newcomer = take(TWO).ok().unwrap();
        assert!(newcomer.made_room);
        assert_eq!(waiting.evicted.try_recv(), Ok(()));
        assert!(waiting.slot.is_evicted() && !waiting.slot.log_in());
        assert_eq!((open(&slots), active.get()), (2, 2));
        drop(waiting);
        assert_eq!((open(&slots), active.get()), (2, 2));
        // Only logged-in sessions left after the newcomer's login: refused.
        let mut newcomer = newcomer;
        assert!(newcomer.slot.log_in());
        assert!(matches!(take(TWO), Err(Full::Listener)));
        assert_eq!(logged_in.evicted.try_recv().ok(), None);
        drop((logged_in, newcomer));
        assert_eq!((open(&slots), active.get()), (0, 0));
    }

    #[test]
    fn a_client_at_its_share_may_evict_only_its_own_oldest() {
        let slots = Arc::new(Slots::default());
        let active = Gauge::default();
        let take = |client| slots.try_take((2, 1), client, active.clone());
        let first = take(ONE).ok().unwrap();
        assert!(matches!(take(ONE), Err(Full::Client)));
        let _second = take(TWO).ok().unwrap();
        // Full: ONE's own connection is the oldest, so ONE may take its place; TWO may not.
        assert!(matches!(take(TWO), Err(Full::Client)));
        let third = take(ONE).ok().unwrap();
        assert!(third.made_room);
        drop(first);
        assert_eq!(open(&slots), 2);
    }
}

#[cfg(test)]
mod attacks {
    use super::*;

    const ONE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const TWO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    /// Behind a trusted load balancer the client is known only after the slot is taken: a
    /// client at its share still evicts another client's connection, then is refused itself.
    /// Repeated, it empties the listener of everyone else's logins in progress.
    #[test]
    fn attack_a_proxied_client_at_its_share_evicts_no_one_else() {
        let slots = Arc::new(Slots::default());
        let active = Gauge::default();
        let take = |client| slots.try_take((2, 1), client, active.clone());
        let mut other = take(None).ok().unwrap();
        assert!(other.slot.charge_client(ONE, 1).is_ok());
        let mut attacker = take(None).ok().unwrap();
        assert!(attacker.slot.charge_client(TWO, 1).is_ok());
        // TWO's next connection through the balancer: full, TWO at its share.
        if let Ok(mut again) = take(None) {
            assert!(again.slot.charge_client(TWO, 1).is_err());
        }
        assert!(
            other.evicted.try_recv().is_err(),
            "ONE's connection was evicted for TWO"
        );
        drop(attacker);
    }

    /// One address holding at most one connection at a time, far below its share, evicts
    /// every other client's login in progress in turn by reconnecting: nothing protects a
    /// connection that is already authenticating, however young.
    #[test]
    fn attack_one_address_reconnecting_does_not_evict_everyone_elses_logins() {
        let slots = Arc::new(Slots::default());
        let active = Gauge::default();
        let take = |client| slots.try_take((3, 100), client, active.clone());
        let mut logged_in = take(Some(ONE)).ok().unwrap();
        assert!(logged_in.slot.log_in());
        let mut users: Vec<_> = (3..5u8)
            .map(|i| {
                let user = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, i));
                take(Some(user)).ok().unwrap()
            })
            .collect();
        // Connect, get a slot by eviction, hang up at once; the next user fills the room;
        // again.
        drop(take(Some(TWO)).ok().unwrap());
        let next = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 9));
        let _newcomer = take(Some(next)).ok().unwrap();
        drop(take(Some(TWO)).ok().unwrap());
        let mut evicted = 0;
        for user in &mut users {
            evicted += usize::from(user.evicted.try_recv().is_ok());
        }
        assert_eq!(evicted, 0, "one address evicted {evicted} logins of others");
        drop(logged_in);
    }
}
