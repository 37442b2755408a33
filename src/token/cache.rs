//! The token cache: moka, one entry per account and protocol, each living until its own
//! expiry less the refresh margin; concurrent misses for one key share a single fetch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;

use super::{Token, TokenError, TokenKey, TokenSource};
use crate::config::CacheConfig;
use crate::metrics::{CauseLabels, Metrics};

pub struct TokenCache {
    entries: Cache<TokenKey, Arc<Token>>,
    source: Arc<dyn TokenSource>,
    metrics: Arc<Metrics>,
}

/// Per-entry lifetime: the token's own (or the default) minus the margin, so a token is
/// never handed out within `refresh_margin` of its expiry.
struct TokenExpiry {
    default_ttl: Duration,
    refresh_margin: Duration,
}

impl Expiry<TokenKey, Arc<Token>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        token: &Arc<Token>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let lifetime = token.lifetime.unwrap_or(self.default_ttl);
        Some(lifetime.saturating_sub(self.refresh_margin))
    }
}

impl TokenCache {
    pub fn new(config: &CacheConfig, source: Arc<dyn TokenSource>, metrics: Arc<Metrics>) -> Self {
        let evictions = metrics.token_cache_evictions.clone();
        let entries = Cache::builder()
            .max_capacity(config.max_entries)
            .eviction_listener(move |_key, _token, cause| {
                let cause = match cause {
                    RemovalCause::Expired => "expired",
                    RemovalCause::Explicit => "explicit",
                    RemovalCause::Replaced => "replaced",
                    RemovalCause::Size => "size",
                };
                evictions.get_or_create(&CauseLabels { cause }).inc();
            })
            .expire_after(TokenExpiry {
                default_ttl: config.default_ttl,
                refresh_margin: config.refresh_margin,
            })
            .build();
        Self {
            entries,
            source,
            metrics,
        }
    }

    /// A valid token for `key`, from the cache or fetched once for all concurrent callers.
    ///
    /// # Errors
    /// What the source reported; errors are not cached.
    pub async fn get(&self, key: &TokenKey) -> Result<Arc<Token>, TokenError> {
        if let Some(token) = self.entries.get(key).await {
            self.metrics.token_cache("hit");
            return Ok(token);
        }
        self.metrics.token_cache("miss");
        let fetched = self
            .entries
            .try_get_with_by_ref(key, async { self.source.fetch(key).await.map(Arc::new) })
            .await
            .map_err(|error| (*error).clone());
        self.update_entry_gauge().await;
        fetched
    }

    /// Checks that the token source answers (for readiness).
    pub async fn probe_source(&self) {
        self.source.probe().await;
    }

    /// Drops `key`'s token after the upstream refused it, but only if the cache still holds
    /// that very token: another session may already have fetched a fresh one.
    pub async fn invalidate(&self, key: &TokenKey, refused: &Arc<Token>) {
        self.entries
            .entry_by_ref(key)
            .and_compute_with(|entry| async move {
                match entry {
                    Some(entry) if Arc::ptr_eq(entry.value(), refused) => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
        self.update_entry_gauge().await;
    }

    /// moka counts lazily: settle its pending work first (only on misses and invalidations).
    async fn update_entry_gauge(&self) {
        self.entries.run_pending_tasks().await;
        let count = i64::try_from(self.entries.entry_count()).unwrap_or(i64::MAX);
        self.metrics.token_cache_entries.set(count);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::Protocol;
    use crate::login::UpstreamAuth;
    use crate::secret::Secret;
    use crate::token::BoxFuture;

    /// Hands out `token-1`, `token-2`, ... and counts the requests.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl TokenSource for Counting {
        fn fetch<'a>(&'a self, _key: &'a TokenKey) -> BoxFuture<'a, Result<Token, TokenError>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                Ok(Token {
                    auth: UpstreamAuth::Bearer {
                        user: "u".into(),
                        token: Secret::new(format!("token-{n}")),
                    },
                    lifetime: None,
                })
            })
        }

        fn probe(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    fn token_text(token: &Token) -> String {
        match &token.auth {
            UpstreamAuth::Bearer { token, .. } => token.expose().clone(),
            UpstreamAuth::Password { .. } => unreachable!(),
        }
    }

    #[tokio::test]
    async fn a_late_invalidation_leaves_a_fresher_token_alone() {
        let source = Arc::new(Counting::default());
        let cache = TokenCache::new(
            &CacheConfig::default(),
            source.clone(),
            Arc::new(Metrics::new()),
        );
        let key = TokenKey {
            account: "a".into(),
            protocol: Protocol::Imap,
        };
        let first = cache.get(&key).await.unwrap();
        let seen_by_late_session = cache.get(&key).await.unwrap();
        // One session finds the token refused and replaces it...
        cache.invalidate(&key, &first).await;
        let fresh = cache.get(&key).await.unwrap();
        assert_eq!(token_text(&fresh), "token-2");
        // ...then another session, holding the same old token, reports it refused too.
        cache.invalidate(&key, &seen_by_late_session).await;
        assert_eq!(token_text(&cache.get(&key).await.unwrap()), "token-2");
        assert_eq!(source.0.load(Ordering::SeqCst), 2);
    }
}
