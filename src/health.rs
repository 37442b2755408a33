//! Liveness and readiness as `/healthz` and `/readyz` report them.

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
}

impl Health {
    pub fn new(freshness: Duration) -> Self {
        Self {
            started: Instant::now(),
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            token_source_answered: AtomicU64::new(0),
            freshness,
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
    }

    /// Whether the token source answered within the freshness window.
    pub fn token_source_fresh(&self) -> bool {
        match self.token_source_answered.load(Ordering::Relaxed) {
            0 => false,
            stamp => {
                let answered = self.started + Duration::from_millis(stamp - 1);
                answered.elapsed() <= self.freshness
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && self.token_source_fresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn readiness_follows_listeners_token_source_and_drain() {
        let health = Health::new(Duration::from_secs(30));
        assert!(!health.is_ready());
        health.set_listening();
        assert!(!health.is_ready(), "token source never answered");
        health.token_source_answered();
        assert!(health.is_ready());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!health.is_ready(), "answer went stale");
        health.token_source_answered();
        health.set_draining();
        assert!(!health.is_ready());
    }
}
