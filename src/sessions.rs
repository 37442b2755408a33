//! Logged-in sessions by account, so that the sessions of an account that its token source
//! refused for good (`invalid_grant`, auth server 403/404) can be ended at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::metrics::Metrics;

/// One session's end signal.
#[derive(Default)]
struct Signal {
    revoked: AtomicBool,
    notify: Notify,
}

pub struct SessionRegistry {
    by_account: Mutex<HashMap<String, HashMap<u64, Arc<Signal>>>>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

/// A session's place in the registry; leaves it on drop.
pub struct Registration {
    registry: Arc<SessionRegistry>,
    account: String,
    id: u64,
    signal: Arc<Signal>,
}

impl SessionRegistry {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            by_account: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            metrics,
        }
    }

    /// Adds a logged-in session of `account`.
    pub fn register(self: &Arc<Self>, account: &str) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(Signal::default());
        self.sessions()
            .entry(account.to_owned())
            .or_default()
            .insert(id, signal.clone());
        Registration {
            registry: self.clone(),
            account: account.to_owned(),
            id,
            signal,
        }
    }

    /// Ends every open session of `account`; returns how many there were.
    pub fn revoke(&self, account: &str) -> usize {
        let sessions = self.sessions().remove(account).unwrap_or_default();
        for signal in sessions.values() {
            signal.revoked.store(true, Ordering::Release);
            signal.notify.notify_one();
        }
        if !sessions.is_empty() {
            tracing::warn!(
                account = %crate::sanitize::Escaped(account),
                sessions = sessions.len(),
                "account refused by its token source: ending its open sessions"
            );
            self.metrics.sessions_revoked.inc_by(sessions.len() as u64);
        }
        sessions.len()
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u64, Arc<Signal>>>> {
        self.by_account.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Registration {
    /// Completes when the account is revoked.
    pub async fn revoked(&self) {
        if !self.was_revoked() {
            self.signal.notify.notified().await;
        }
    }

    pub fn was_revoked(&self) -> bool {
        self.signal.revoked.load(Ordering::Acquire)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut sessions = self.registry.sessions();
        if let Some(of_account) = sessions.get_mut(&self.account) {
            of_account.remove(&self.id);
            if of_account.is_empty() {
                sessions.remove(&self.account);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn revoking_ends_that_accounts_sessions_only() {
        let registry = Arc::new(SessionRegistry::new(Arc::new(Metrics::new())));
        let alice = registry.register("alice");
        let alice_too = registry.register("alice");
        let bob = registry.register("bob");
        assert_eq!(registry.revoke("alice"), 2);
        alice.revoked().await;
        alice_too.revoked().await;
        assert!(!bob.was_revoked());
        drop(bob);
        assert_eq!(registry.revoke("bob"), 0);
        assert!(registry.sessions().is_empty());
    }
}
