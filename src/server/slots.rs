//! The connection slots of one listen address: `max_connections` and
//! `max_connections_per_client`, exact under bursts, and the eviction of a connection still
//! before login when the listener is full.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;

/// The sessions open on one listen address, in total and per client address (IPv6: /64).
/// A slot is taken before a session's task is spawned and moves into it, so the limits hold
/// however fast connections arrive (a gauge read before the task runs would let a burst
/// through). Counted here rather than with semaphores so that a reload can change them. A load
/// balancer's connection to a full listener is the exception: it is held over the limit until
/// its header names the client ([`Slots::try_take`]).
///
/// A full listener makes room by evicting a session before login, as Dovecot's login
/// processes do: otherwise connections that never log in could hold every slot. The victim is
/// the oldest of the address group holding the most such sessions, so that one client
/// reconnecting in a loop mostly evicts its own. Logged-in sessions, and sessions whose login
/// is under way, are never evicted.
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
    /// Load balancers' connections admitted over a full listener, each to evict once its
    /// header names the client ([`Slot::charge_client`]).
    owed: usize,
    admitted: u64,
}

/// What evicting a session before login takes: its counts, and the signal it waits on.
struct Evictable {
    client: Option<IpAddr>,
    active: Gauge,
    evict: oneshot::Sender<()>,
    /// Its login was handed to the authenticator: evicting it now would waste (or cut off)
    /// a password check or upstream login already paid for.
    authenticating: bool,
    /// Admitted over a full listener; counted in [`SlotCounts::owed`].
    owes_room: bool,
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

/// Marks a session's login as under way, from the authenticator's side of the front end.
pub(super) struct LoginMark {
    slots: Arc<Slots>,
    id: u64,
}

impl Slots {
    /// A slot for a connection from `peer`, counted against the client's address unless
    /// `client` is `None` (a load balancer's connection, counted once its header names the
    /// client: [`Slot::charge_client`]). A full listener evicts a session before login; for a
    /// load balancer's connection that waits for the client's address, so that a client at
    /// its share cannot evict anyone else's only to be refused itself.
    /// `limits`: `max_connections` and `max_connections_per_client`.
    pub(super) fn try_take(
        self: &Arc<Self>,
        (max_connections, max_per_client): (usize, usize),
        client: Option<IpAddr>,
        active: Gauge,
    ) -> Result<Admission, Full> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let client = client.map(crate::client_auth::throttle::address_group);
        let full = counts.open >= max_connections;
        // Held over the limit only until the header arrives (pre_auth_timeout at most), and
        // only as many as there are sessions to evict then.
        let owes_room = full && client.is_none();
        if owes_room && counts.evictable() <= counts.owed {
            return Err(Full::Listener);
        }
        let victim = if full && !owes_room {
            Some(counts.victim(None).ok_or(Full::Listener)?)
        } else {
            None
        };
        if let Some(group) = client {
            counts.check_share(group, victim, max_per_client)?;
        }
        if let Some(victim) = victim {
            counts.evict(victim);
        }
        if let Some(group) = client {
            *counts.by_client.entry(group).or_default() += 1;
        }
        counts.open += 1;
        counts.owed += usize::from(owes_room);
        counts.admitted += 1;
        let id = counts.admitted;
        let (evict, evicted) = oneshot::channel();
        counts.before_login.insert(
            id,
            Evictable {
                client,
                active: active.clone(),
                evict,
                authenticating: false,
                owes_room,
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
            made_room: victim.is_some(),
        })
    }
}

impl SlotCounts {
    fn of_client(&self, group: IpAddr) -> usize {
        self.by_client.get(&group).copied().unwrap_or(0)
    }

    /// Sessions a load balancer's connection admitted over a full listener could evict; not
    /// those admitted so themselves, which would let them admit each other without bound.
    fn evictable(&self) -> usize {
        let evictable = self.before_login.values();
        evictable
            .filter(|e| !e.authenticating && !e.owes_room)
            .count()
    }

    /// The session to evict for a newcomer (never `newcomer` itself): the oldest of the address
    /// group with the most sessions that may be evicted, the oldest group on a tie.
    fn victim(&self, newcomer: Option<u64>) -> Option<u64> {
        let mut groups: HashMap<Option<IpAddr>, (usize, u64)> = HashMap::new();
        for (&id, evictable) in &self.before_login {
            if evictable.authenticating || Some(id) == newcomer {
                continue;
            }
            groups.entry(evictable.client).or_insert((0, id)).0 += 1;
        }
        let (_, oldest) = groups
            .into_values()
            .max_by_key(|&(count, oldest)| (count, std::cmp::Reverse(oldest)))?;
        Some(oldest)
    }

    /// A client at its share may come in only by evicting its own connection: that keeps it
    /// within its share (on loopback the one client's share is the whole listener).
    fn check_share(&self, group: IpAddr, victim: Option<u64>, limit: usize) -> Result<(), Full> {
        let victim_group = victim.and_then(|id| self.before_login.get(&id)?.client);
        let freed = usize::from(victim_group == Some(group));
        if self.of_client(group) - freed >= limit {
            return Err(Full::Client);
        }
        Ok(())
    }

    /// Evicts a session before login: frees its counts and tells it to leave.
    fn evict(&mut self, id: u64) {
        if let Some(evictable) = self.remove(id) {
            let _ = evictable.evict.send(());
        }
    }

    /// Takes a session off the evictable ones and frees its counts.
    fn remove(&mut self, id: u64) -> Option<Evictable> {
        let evictable = self.before_login.remove(&id)?;
        self.owed -= usize::from(evictable.owes_room);
        self.release(evictable.client, &evictable.active);
        Some(evictable)
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
    /// Counts the slot against `client` once a load balancer's header has named it, and
    /// makes the room it was admitted without. `true` if a session was evicted for it.
    pub(super) fn charge_client(&mut self, client: IpAddr, limit: usize) -> Result<bool, Full> {
        let mut counts = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        let group = crate::client_auth::throttle::address_group(client);
        // Evicted meanwhile: it counts for nothing any more.
        let Some(evictable) = counts.before_login.get(&self.id) else {
            return Ok(false);
        };
        let victim = if evictable.owes_room {
            Some(counts.victim(Some(self.id)).ok_or(Full::Listener)?)
        } else {
            None
        };
        counts.check_share(group, victim, limit)?;
        if let Some(victim) = victim {
            counts.evict(victim);
        }
        let owed = victim.is_some();
        counts.owed -= usize::from(owed);
        if let Some(evictable) = counts.before_login.get_mut(&self.id) {
            evictable.client = Some(group);
            evictable.owes_room = false;
        }
        *counts.by_client.entry(group).or_default() += 1;
        self.client = Some(group);
        Ok(owed)
    }

    /// The mark its front end's authenticator sets while a login is under way.
    pub(super) fn login_mark(&self) -> LoginMark {
        LoginMark {
            slots: self.slots.clone(),
            id: self.id,
        }
    }

    /// Whether a newer connection took this one's place.
    pub(super) fn is_evicted(&self) -> bool {
        let counts = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        !self.logged_in && !counts.before_login.contains_key(&self.id)
    }

    /// The session has logged in: it can no longer be evicted. `false` if it was evicted first.
    pub(super) fn mark_logged_in(&mut self) -> bool {
        let mut counts = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(evictable) = counts.before_login.remove(&self.id) else {
            return false;
        };
        counts.owed -= usize::from(evictable.owes_room);
        self.logged_in = true;
        true
    }
}

impl LoginMark {
    /// While `true`, the session cannot be evicted; a failed login makes it evictable again.
    /// No effect once it was evicted.
    pub(super) fn set(&self, authenticating: bool) {
        let mut counts = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(evictable) = counts.before_login.get_mut(&self.id) {
            evictable.authenticating = authenticating;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        if self.logged_in {
            counts.release(self.client, &self.active);
        } else {
            counts.remove(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)));
    const TWO: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2)));

    pub(super) fn open(slots: &Arc<Slots>) -> usize {
        slots.counts.lock().unwrap().open
    }

    #[test]
    fn a_full_listener_evicts_the_oldest_before_login_and_counts_each_slot_once() {
        let slots = Arc::new(Slots::default());
        let active = Gauge::default();
        let take = |client| slots.try_take((2, 10), client, active.clone());
        let mut logged_in = take(ONE).ok().unwrap();
        assert!(logged_in.slot.mark_logged_in());
        let mut waiting = take(TWO).ok().unwrap();
        let newcomer = take(TWO).ok().unwrap();
        assert!(newcomer.made_room);
        assert_eq!(waiting.evicted.try_recv(), Ok(()));
        assert!(waiting.slot.is_evicted() && !waiting.slot.mark_logged_in());
        assert_eq!((open(&slots), active.get()), (2, 2));
        drop(waiting);
        assert_eq!((open(&slots), active.get()), (2, 2));
        // Only logged-in sessions left after the newcomer's login: refused.
        let mut newcomer = newcomer;
        assert!(newcomer.slot.mark_logged_in());
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
mod eviction_abuse {
    use super::tests::open;
    use super::*;

    const ONE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const TWO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn user(i: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, i)))
    }

    /// Behind a trusted load balancer the client is known only after the slot is taken: a
    /// client at its share evicted another client's connection, then was refused itself.
    /// Repeated, it emptied the listener of everyone else's logins in progress.
    #[test]
    fn a_proxied_client_at_its_share_evicts_no_one_else() {
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
        assert_eq!((open(&slots), active.get()), (2, 2));
        // A client below its share still makes room, once its address is known.
        let mut newcomer = take(None).ok().unwrap();
        assert!(matches!(
            newcomer.slot.charge_client(user(3).unwrap(), 1),
            Ok(true)
        ));
        assert_eq!(other.evicted.try_recv(), Ok(()));
        assert_eq!((open(&slots), active.get()), (2, 2));
        drop((attacker, newcomer, other));
        assert_eq!((open(&slots), active.get()), (0, 0));
    }

    /// Connections from a load balancer to a full listener wait over the limit for their
    /// headers: never more of them than there are sessions to evict.
    #[test]
    fn proxied_connections_held_over_a_full_listener_are_bounded() {
        let slots = Arc::new(Slots::default());
        let active = Gauge::default();
        let take = |client| slots.try_take((2, 10), client, active.clone());
        let _waiting: Vec<_> = (3..5u8).map(|i| take(user(i)).ok().unwrap()).collect();
        let held: Vec<_> = (0..2).map(|_| take(None).ok().unwrap()).collect();
        assert!(matches!(take(None), Err(Full::Listener)));
        assert_eq!(open(&slots), 4);
        drop(held);
        assert_eq!(open(&slots), 2);
    }

    /// One address holding at most one connection at a time, far below its share, evicted
    /// every other client's login in progress in turn by reconnecting: nothing protected a
    /// connection that is already authenticating, however young.
    #[test]
    fn one_address_reconnecting_does_not_evict_everyone_elses_logins() {
        let slots = Arc::new(Slots::default());
        let active = Gauge::default();
        let take = |client| slots.try_take((3, 100), client, active.clone());
        let mut logged_in = take(Some(ONE)).ok().unwrap();
        assert!(logged_in.slot.mark_logged_in());
        let mut users: Vec<_> = (3..5u8).map(|i| take(user(i)).ok().unwrap()).collect();
        for user in &users {
            user.slot.login_mark().set(true);
        }
        // Connect, get a slot by eviction, hang up at once; again.
        for _ in 0..2 {
            if let Ok(admission) = take(Some(TWO)) {
                drop(admission);
            }
        }
        let mut evicted = 0;
        for user in &mut users {
            evicted += usize::from(user.evicted.try_recv().is_ok());
        }
        assert_eq!(evicted, 0, "one address evicted {evicted} logins of others");
        // A failed login is evictable again.
        users[0].slot.login_mark().set(false);
        assert!(take(Some(TWO)).is_ok());
        assert_eq!(users[0].evicted.try_recv(), Ok(()));
        drop(logged_in);
    }

    /// A client reconnecting in a loop holds the most connections before login: it evicts its
    /// own, not an older one of somebody else's.
    #[test]
    fn a_reconnecting_address_evicts_its_own_connections_first() {
        let slots = Arc::new(Slots::default());
        let active = Gauge::default();
        let take = |client| slots.try_take((4, 100), client, active.clone());
        let mut other = take(Some(ONE)).ok().unwrap();
        let mut own: Vec<_> = (0..3).map(|_| take(Some(TWO)).ok().unwrap()).collect();
        let newcomer = take(Some(TWO)).ok().unwrap();
        assert!(newcomer.made_room);
        assert!(
            other.evicted.try_recv().is_err(),
            "ONE's connection was evicted for TWO"
        );
        assert_eq!(own[0].evicted.try_recv(), Ok(()));
        assert_eq!(open(&slots), 4);
    }
}
