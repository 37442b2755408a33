//! Liveness and readiness as `/healthz` and `/readyz` report them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Ready means: listeners bound, not draining, and the token source answered recently.
pub struct Health {
    started: Instant,
    listening: AtomicBool,
    draining: AtomicBool,
    /// Milliseconds after `started` of the token source's last HTTP answer, plus one (0 = never).
    token_source_answered: AtomicU64,
    /// How recent that answer must be.
    freshness: Duration,
    /// The token source's last answer refused mailgate's own credentials (401/403).
    token_source_refused: AtomicBool,
    /// An account's refresh token is held only in memory: the store refused the write.
    token_store_unwritten: AtomicBool,
    /// The shared Redis did not answer its last call.
    shared_state_unreachable: AtomicBool,
    /// A listener's pool has no server up.
    no_backend_up: AtomicBool,
    /// The last readiness reported, to log each change once.
    last: Mutex<Option<Result<(), NotReady>>>,
    /// A probe of the token source is under way.
    pub probing: AtomicBool,
}

/// Why mailgate is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("listeners are not bound yet")]
    Starting,
    #[error("draining for shutdown")]
    Draining,
    #[error("the token source has not answered recently")]
    TokenSourceSilent,
    #[error("the token source refuses mailgate's credentials (HTTP 401/403)")]
    TokenSourceRefuses,
    #[error("the token store cannot be written; a refresh token is held only in memory")]
    TokenStoreUnwritten,
    #[error("the shared Redis does not answer; only logins with a cached token work")]
    SharedStateUnreachable,
    #[error("no server of a listener's pool is up")]
    NoBackendUp,
}

impl Health {
    pub fn new(freshness: Duration) -> Self {
        Self {
            started: Instant::now(),
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            token_source_answered: AtomicU64::new(0),
            freshness,
            token_source_refused: AtomicBool::new(false),
            token_store_unwritten: AtomicBool::new(false),
            shared_state_unreachable: AtomicBool::new(false),
            no_backend_up: AtomicBool::new(false),
            last: Mutex::new(None),
            probing: AtomicBool::new(false),
        }
    }

    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Relaxed);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Any HTTP answer counts: even a 404 proves the source is up.
    pub fn token_source_answered(&self) {
        let millis = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.token_source_answered
            .store(millis.saturating_add(1), Ordering::Relaxed);
        self.token_source_refused.store(false, Ordering::Relaxed);
    }

    /// The source answered, but refuses mailgate itself: no login can get a token.
    pub fn token_source_refused(&self) {
        self.token_source_answered();
        self.token_source_refused.store(true, Ordering::Relaxed);
    }

    pub fn set_token_store_unwritten(&self, unwritten: bool) {
        self.token_store_unwritten
            .store(unwritten, Ordering::Relaxed);
    }

    pub fn set_shared_state_reachable(&self, reachable: bool) {
        self.shared_state_unreachable
            .store(!reachable, Ordering::Relaxed);
    }

    /// Whether the token source should be probed: it has not answered recently, or it
    /// refused mailgate (so a fixed password shows soon).
    pub fn set_no_backend_up(&self, stranded: bool) {
        self.no_backend_up.store(stranded, Ordering::Relaxed);
    }

    pub fn token_source_needs_probe(&self) -> bool {
        !self.token_source_fresh() || self.token_source_refused.load(Ordering::Relaxed)
    }

    /// Whether the token source answered within the freshness window.
    fn token_source_fresh(&self) -> bool {
        match self.token_source_answered.load(Ordering::Relaxed) {
            0 => false,
            stamp => {
                let answered = self.started + Duration::from_millis(stamp - 1);
                answered.elapsed() <= self.freshness
            }
        }
    }

    /// Ready, or why not; logs every change of the answer with its reason.
    pub fn readiness(&self) -> Result<(), NotReady> {
        let now = if !self.listening.load(Ordering::Relaxed) {
            Err(NotReady::Starting)
        } else if self.draining.load(Ordering::Relaxed) {
            Err(NotReady::Draining)
        } else if !self.token_source_fresh() {
            Err(NotReady::TokenSourceSilent)
        } else if self.token_source_refused.load(Ordering::Relaxed) {
            Err(NotReady::TokenSourceRefuses)
        } else if self.no_backend_up.load(Ordering::Relaxed) {
            Err(NotReady::NoBackendUp)
        } else if self.shared_state_unreachable.load(Ordering::Relaxed) {
            Err(NotReady::SharedStateUnreachable)
        } else if self.token_store_unwritten.load(Ordering::Relaxed) {
            Err(NotReady::TokenStoreUnwritten)
        } else {
            Ok(())
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if *last != Some(now) {
            match now {
                Ok(()) => tracing::info!("ready"),
                Err(reason) => tracing::warn!(%reason, "not ready"),
            }
            *last = Some(now);
        }
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn readiness_follows_listeners_token_source_and_drain() {
        let health = Health::new(Duration::from_secs(30));
        assert_eq!(health.readiness(), Err(NotReady::Starting));
        health.set_listening();
        assert_eq!(health.readiness(), Err(NotReady::TokenSourceSilent));
        health.token_source_answered();
        assert_eq!(health.readiness(), Ok(()));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(health.readiness(), Err(NotReady::TokenSourceSilent));
        health.token_source_refused();
        assert_eq!(health.readiness(), Err(NotReady::TokenSourceRefuses));
        health.token_source_answered();
        assert_eq!(health.readiness(), Ok(()));
        health.set_draining();
        assert_eq!(health.readiness(), Err(NotReady::Draining));
    }
}
