//! The token cache: moka, one entry per account and protocol, each living until its own
//! expiry less the refresh margin; concurrent misses for one key share a single fetch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;

use super::auth_server::AuthServer;
use super::{Token, TokenError, TokenKey};
use crate::config::CacheConfig;
use crate::metrics::{CauseLabels, Metrics};

pub struct TokenCache {
    entries: Cache<TokenKey, Arc<Token>>,
    source: AuthServer,
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
    pub fn new(config: &CacheConfig, source: AuthServer, metrics: Arc<Metrics>) -> Self {
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

    /// Drops `key`'s token, e.g. after the upstream refused it.
    pub async fn invalidate(&self, key: &TokenKey) {
        self.entries.invalidate(key).await;
        self.update_entry_gauge().await;
    }

    /// moka counts lazily: settle its pending work first (only on misses and invalidations).
    async fn update_entry_gauge(&self) {
        self.entries.run_pending_tasks().await;
        let count = i64::try_from(self.entries.entry_count()).unwrap_or(i64::MAX);
        self.metrics.token_cache_entries.set(count);
    }
}
