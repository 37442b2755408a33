//! The token cache: moka, one entry per account (and protocol, where tokens differ), each
//! living until its own expiry less the refresh margin; concurrent misses for one key share a
//! single fetch. Tokens of accounts in use are renewed in the background before they expire,
//! so a login never waits for a token source; an account refused for good has its open
//! sessions ended. Tokens a client's own password got live under a key with its proof, at
//! most as long as a verified password is remembered, and are never renewed.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use tokio::time::Instant;

use super::shared::{SharedTokens, unix_millis};
use super::{MAX_LIFETIME, Token, TokenError, TokenKey, TokenSource};
use crate::config::{CacheConfig, DEFAULT_MAX_CONCURRENT_FETCHES, Protocol};
use crate::metrics::{CauseLabels, Metrics};
use crate::replicas::Redis;
use crate::replicas::news::{self, News};
use crate::secret::Secret;
use crate::sessions::SessionRegistry;

/// A background renewal that failed is tried again after this, doubling, up to the maximum,
/// while the cached token is still good.
const RENEWAL_RETRY_START: Duration = Duration::from_secs(2);
const RENEWAL_RETRY_MAX: Duration = Duration::from_secs(60);
/// How long a replica waits for another replica's request for the same token.
const SHARED_FETCH_WAIT: Duration = Duration::from_secs(30);

/// A cached token and when it was last handed out.
pub struct Cached {
    pub token: Token,
    fetched: Instant,
    /// Milliseconds after the cache's epoch.
    last_used: AtomicU64,
    /// How long it may stay cached, whatever its lifetime (a password grant's token).
    max_age: Option<Duration>,
    /// Unix milliseconds when it expires, if its source said: how replicas tell tokens
    /// apart.
    expires_at: Option<u64>,
}

impl Cached {
    /// How long the token is still valid, if its source said how long it lives.
    pub fn remaining(&self) -> Option<Duration> {
        self.token
            .lifetime
            .map(|lifetime| lifetime.saturating_sub(self.fetched.elapsed()))
    }
}

pub struct TokenCache {
    entries: Cache<TokenKey, Arc<Cached>>,
    source: Arc<dyn TokenSource>,
    metrics: Arc<Metrics>,
    default_ttl: Duration,
    refresh_margin: Duration,
    refresh_window: Duration,
    /// Sessions to end when an account is refused for good; `None`: leave them be.
    sessions: Option<Arc<SessionRegistry>>,
    epoch: Instant,
    /// Set when a reload replaced this cache: its renewals stop (sessions still holding it
    /// keep their tokens until they expire).
    retired: std::sync::atomic::AtomicBool,
    /// Bounds the token requests in flight, renewals included.
    fetches: tokio::sync::Semaphore,
    /// The replicas' Redis: a second level of tokens, and the news of accounts.
    shared: Option<Arc<SharedTokens>>,
}

/// Per-entry lifetime: the token's own (or the default) minus the margin, so a token is
/// never handed out within `refresh_margin` of its expiry.
struct TokenExpiry {
    default_ttl: Duration,
    refresh_margin: Duration,
}

impl TokenExpiry {
    fn cached_for(&self, cached: &Cached) -> Duration {
        // Capped here too: every source's token passes this way, whatever it claimed.
        let by_lifetime = cached
            .token
            .lifetime
            .unwrap_or(self.default_ttl)
            .min(MAX_LIFETIME)
            .saturating_sub(self.refresh_margin);
        cached
            .max_age
            .map_or(by_lifetime, |max| by_lifetime.min(max))
    }
}

impl Expiry<TokenKey, Arc<Cached>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        cached: &Arc<Cached>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(self.cached_for(cached))
    }

    /// A renewed token replaces the entry: it lives by its own lifetime, not the old one's.
    fn expire_after_update(
        &self,
        _key: &TokenKey,
        cached: &Arc<Cached>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.cached_for(cached))
    }
}

impl TokenCache {
    pub fn new(
        config: &CacheConfig,
        source: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
        sessions: Option<Arc<SessionRegistry>>,
    ) -> Self {
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
            default_ttl: config.default_ttl,
            refresh_margin: config.refresh_margin,
            refresh_window: config.refresh_window,
            sessions,
            epoch: Instant::now(),
            retired: std::sync::atomic::AtomicBool::new(false),
            fetches: tokio::sync::Semaphore::new(DEFAULT_MAX_CONCURRENT_FETCHES),
            shared: None,
        }
    }

    /// Shares tokens with the other replicas through `redis`, sealed with `key`: a miss
    /// looks there first, and one replica fetches for all.
    ///
    /// # Errors
    /// The key is not 32 bytes.
    pub fn shared_through(
        mut self,
        redis: Arc<Redis>,
        key: &Secret<Vec<u8>>,
    ) -> Result<Self, String> {
        self.shared = Some(Arc::new(SharedTokens::new(
            redis,
            key,
            self.refresh_margin,
        )?));
        Ok(self)
    }

    /// The replicas' Redis, when tokens are shared.
    pub fn redis(&self) -> Option<&Arc<Redis>> {
        self.shared.as_ref().map(|shared| shared.redis())
    }

    /// Acts on the other replicas' news until this cache is retired or dropped: drops the
    /// account's tokens, and for a revocation ends its sessions.
    pub fn follow_the_news(self: &Arc<Self>, redis: &Arc<Redis>) {
        let cache = Arc::downgrade(self);
        news::listen(redis, move |news| {
            let Some(cache) = cache.upgrade() else {
                return false;
            };
            if cache.retired.load(Ordering::Relaxed) {
                return false;
            }
            if !matches!(news, News::Revoked(_) | News::Replaced(_)) {
                return true;
            }
            let news = news.clone();
            tokio::spawn(async move {
                match news {
                    News::Revoked(account) => {
                        cache.forget_account(&account).await;
                        cache.revoked(&account);
                    }
                    _ => cache.forget_account(news.account()).await,
                }
            });
            true
        });
    }

    /// Drops the account's tokens from the shared sources.
    async fn forget_account(&self, account: &str) {
        for key in TokenKey::every_shared(account) {
            self.entries.invalidate(&key).await;
        }
        self.update_entry_gauge().await;
    }

    /// Tells the other replicas (in the background: the login does not wait for it).
    fn announce(&self, news: News) {
        if let Some(shared) = self.shared.clone() {
            tokio::spawn(async move { shared.announce(news).await });
        }
    }

    /// A token for `key` expiring after `later_than` (Unix ms): from the other replicas
    /// when they share one, else fetched here (once for all of them); with the expiry the
    /// replicas know it by.
    async fn fetch_newer(
        &self,
        key: &TokenKey,
        later_than: u64,
    ) -> Result<(Token, Option<u64>), TokenError> {
        match &self.shared {
            Some(shared) if key.proof.is_none() => {
                let (token, expires_at) = shared
                    .get_or_fetch(key, later_than, SHARED_FETCH_WAIT, async || {
                        self.fetch(key).await
                    })
                    .await?;
                Ok((token, Some(expires_at)))
            }
            _ => Ok((self.fetch(key).await?, None)),
        }
    }

    /// At most `limit` token requests in flight at once.
    pub fn with_max_concurrent_fetches(mut self, limit: usize) -> Self {
        self.fetches = tokio::sync::Semaphore::new(limit.max(1));
        self
    }

    /// One request to the source, when a turn is free.
    async fn fetch(&self, key: &TokenKey) -> Result<Token, TokenError> {
        // The semaphore is never closed, so a permit always comes.
        let _turn = self.fetches.acquire().await;
        self.source.fetch(key).await
    }

    /// Stops renewing tokens: a reload put another cache in this one's place.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// A valid token for `account` over `protocol`, from the cache or fetched once for all
    /// concurrent callers.
    ///
    /// # Errors
    /// What the source reported; errors are not cached.
    pub async fn get(
        self: &Arc<Self>,
        account: &str,
        protocol: Protocol,
    ) -> Result<(TokenKey, Arc<Cached>), TokenError> {
        let key = self.source.key(account, protocol);
        if let Some(cached) = self.entries.get(&key).await {
            self.metrics.token_cache("hit");
            self.touch(&cached);
            return Ok((key, cached));
        }
        self.metrics.token_cache("miss");
        let fetched = self
            .entries
            .entry_by_ref(&key)
            .or_try_insert_with(async {
                self.fetch_newer(&key, 0)
                    .await
                    .map(|(token, expires_at)| self.cached(token, self.now_ms(), None, expires_at))
            })
            .await;
        self.update_entry_gauge().await;
        match fetched {
            Ok(entry) => {
                let cached = entry.value().clone();
                self.touch(&cached);
                if entry.is_fresh() {
                    self.renew_later(key.clone(), cached.clone());
                }
                Ok((key, cached))
            }
            Err(error) => {
                if error.is_revocation() {
                    self.revoked_everywhere(&key.account);
                }
                Err((*error).clone())
            }
        }
    }

    /// The token a password grant got for `key` (whose proof stands for the password), or
    /// else `grant`'s, run once for all concurrent callers with that key. It stays at most
    /// `max_age` and is never renewed in the background: only the password gets another.
    /// Returns the token and whether this call's `grant` got it.
    ///
    /// # Errors
    /// What `grant` reported, shared with the callers that waited on it; never cached.
    pub async fn get_or_grant<E>(
        &self,
        key: &TokenKey,
        max_age: Duration,
        grant: impl Future<Output = Result<Token, E>>,
    ) -> Result<(Arc<Cached>, bool), Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        if let Some(cached) = self.entries.get(key).await {
            self.metrics.token_cache("hit");
            self.touch(&cached);
            return Ok((cached, false));
        }
        self.metrics.token_cache("miss");
        let entry = self
            .entries
            .entry_by_ref(key)
            .or_try_insert_with(async {
                let token = grant.await?;
                Ok(self.cached(token, self.now_ms(), Some(max_age), None))
            })
            .await;
        self.update_entry_gauge().await;
        let entry = entry?;
        let fresh = entry.is_fresh();
        let cached = entry.into_value();
        self.touch(&cached);
        Ok((cached, fresh))
    }

    /// Checks that the token source answers (for readiness).
    pub async fn probe_source(&self) {
        self.source.probe().await;
    }

    /// Drops `key`'s token after the upstream refused it, but only if the cache still holds
    /// that very token: another session may already have fetched a fresh one.
    pub async fn invalidate(&self, key: &TokenKey, refused: &Arc<Cached>) {
        if let Some(shared) = &self.shared
            && let Some(expires_at) = refused.expires_at
        {
            shared.forget(key, expires_at).await;
            self.announce(News::Replaced(key.account.clone()));
        }
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

    /// A cache entry for `token`; `expires_at` is the expiry the replicas know it by, if it
    /// came through them.
    fn cached(
        &self,
        token: Token,
        last_used: u64,
        max_age: Option<Duration>,
        expires_at: Option<u64>,
    ) -> Arc<Cached> {
        let expires_at = expires_at.or_else(|| token.lifetime.map(expiry_from_now));
        Arc::new(Cached {
            token,
            fetched: Instant::now(),
            last_used: AtomicU64::new(last_used),
            max_age,
            expires_at,
        })
    }

    fn touch(&self, cached: &Cached) {
        cached.last_used.store(self.now_ms(), Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Ends the open sessions of an account its source refused for good.
    fn revoked(&self, account: &str) {
        if let Some(sessions) = &self.sessions {
            sessions.revoke(account);
        }
    }

    /// Ends the account's sessions here and, through the news, on every replica.
    fn revoked_everywhere(&self, account: &str) {
        self.revoked(account);
        self.announce(News::Revoked(account.to_owned()));
    }

    /// Renews `cached` in the background before it leaves the cache, as long as its account
    /// was used within `refresh_window`; then the fresh token is renewed the same way.
    fn renew_later(self: &Arc<Self>, key: TokenKey, cached: Arc<Cached>) {
        let cache = Arc::downgrade(self);
        tokio::spawn(renew(cache, key, cached));
    }

    /// When to renew: `refresh_margin` before the token leaves the cache, but not in the
    /// first half of its time there.
    fn renewal_due(&self, cached: &Cached) -> (Instant, Instant) {
        let expiry = TokenExpiry {
            default_ttl: self.default_ttl,
            refresh_margin: self.refresh_margin,
        };
        let cached_for = expiry.cached_for(cached);
        let lead = cached_for
            .saturating_sub(self.refresh_margin)
            .max(cached_for / 2);
        (cached.fetched + lead, cached.fetched + cached_for)
    }

    fn idle_for(&self, cached: &Cached) -> Duration {
        let last_used = cached.last_used.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(last_used))
    }

    /// Whether `cached` is still the entry for `key` (not replaced, dropped or expired).
    async fn is_current(&self, key: &TokenKey, cached: &Arc<Cached>) -> bool {
        self.entries
            .get(key)
            .await
            .is_some_and(|current| Arc::ptr_eq(&current, cached))
    }

    /// moka counts lazily: settle its pending work first (only on misses and invalidations).
    async fn update_entry_gauge(&self) {
        self.entries.run_pending_tasks().await;
        let count = i64::try_from(self.entries.entry_count()).unwrap_or(i64::MAX);
        self.metrics.token_cache_entries.set(count);
    }
}

/// Unix milliseconds `lifetime` from now.
pub fn expiry_from_now(lifetime: Duration) -> u64 {
    unix_millis().saturating_add(u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX))
}

/// The renewal task of one entry; ends when the entry is replaced or dropped, its account
/// idle, the cache gone, or the source refuses the account for good.
async fn renew(cache: Weak<TokenCache>, key: TokenKey, mut cached: Arc<Cached>) {
    let mut retry = RENEWAL_RETRY_START;
    let Some((mut due, _)) = cache.upgrade().map(|cache| cache.renewal_due(&cached)) else {
        return;
    };
    loop {
        tokio::time::sleep_until(due).await;
        let Some(cache) = cache.upgrade() else { return };
        if !cache.is_current(&key, &cached).await || cache.idle_for(&cached) > cache.refresh_window
        {
            return;
        }
        match cache
            .fetch_newer(&key, cached.expires_at.unwrap_or(0))
            .await
        {
            Ok((token, expires_at)) => {
                let last_used = cached.last_used.load(Ordering::Relaxed);
                let fresh = cache.cached(token, last_used, None, expires_at);
                cache.entries.insert(key.clone(), fresh.clone()).await;
                cache.metrics.refresh_ahead("ok");
                cached = fresh;
                due = cache.renewal_due(&cached).0;
                retry = RENEWAL_RETRY_START;
            }
            Err(error) if error.is_revocation() => {
                cache.metrics.refresh_ahead("refused");
                cache.invalidate(&key, &cached).await;
                cache.revoked_everywhere(&key.account);
                return;
            }
            Err(error) => {
                cache.metrics.refresh_ahead("error");
                tracing::warn!(%error, "renewing a token ahead of its expiry failed; trying again");
                let leaves = cache.renewal_due(&cached).1;
                due = Instant::now() + retry;
                if due >= leaves {
                    return;
                }
                retry = (retry * 2).min(RENEWAL_RETRY_MAX);
            }
        }
    }
}

/// A token source that refuses every account.
#[cfg(test)]
struct Nowhere;

#[cfg(test)]
impl TokenSource for Nowhere {
    fn fetch<'a>(&'a self, _key: &'a TokenKey) -> super::BoxFuture<'a, Result<Token, TokenError>> {
        Box::pin(async { Err(TokenError::Refused) })
    }

    fn probe(&self) -> super::BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[cfg(test)]
impl TokenCache {
    /// A cache without token sources, for tests of the parts around it.
    pub(crate) fn without_sources(metrics: Arc<Metrics>) -> Self {
        Self::new(&CacheConfig::default(), Arc::new(Nowhere), metrics, None)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::login::UpstreamAuth;
    use crate::secret::Secret;
    use crate::token::BoxFuture;

    /// Hands out `token-1`, `token-2`, ... with the given lifetime, and counts the requests.
    #[derive(Default)]
    struct Counting(AtomicUsize, Option<Duration>);

    impl TokenSource for Counting {
        fn fetch<'a>(&'a self, _key: &'a TokenKey) -> BoxFuture<'a, Result<Token, TokenError>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                Ok(Token {
                    auth: UpstreamAuth::Bearer {
                        user: "u".into(),
                        token: Secret::new(format!("token-{n}")),
                    },
                    lifetime: self.1,
                    server: None,
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
        let cache = Arc::new(TokenCache::new(
            &CacheConfig::default(),
            source.clone(),
            Arc::new(Metrics::new()),
            None,
        ));
        let (key, first) = cache.get("a", Protocol::Imap).await.unwrap();
        let (_, seen_by_late_session) = cache.get("a", Protocol::Imap).await.unwrap();
        // One session finds the token refused and replaces it...
        cache.invalidate(&key, &first).await;
        let (_, fresh) = cache.get("a", Protocol::Imap).await.unwrap();
        assert_eq!(token_text(&fresh.token), "token-2");
        // ...then another session, holding the same old token, reports it refused too.
        cache.invalidate(&key, &seen_by_late_session).await;
        let (_, kept) = cache.get("a", Protocol::Imap).await.unwrap();
        assert_eq!(token_text(&kept.token), "token-2");
        assert_eq!(source.0.load(Ordering::SeqCst), 2);
    }

    /// A source claiming a lifetime no clock can add (u64::MAX seconds) used to panic the
    /// renewal's deadline arithmetic; it counts as the longest lifetime there is.
    #[tokio::test]
    async fn an_endless_lifetime_is_cached_without_overflow() {
        let source = Arc::new(Counting(AtomicUsize::new(0), Some(Duration::MAX)));
        let cache = Arc::new(TokenCache::new(
            &CacheConfig::default(),
            source.clone(),
            Arc::new(Metrics::new()),
            None,
        ));
        let (_, first) = cache.get("a", Protocol::Imap).await.unwrap();
        let (_, again) = cache.get("a", Protocol::Imap).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(source.0.load(Ordering::SeqCst), 1);
        // The renewal task computes its deadlines so.
        let (renew_at, leaves_at) = cache.renewal_due(&first);
        assert!(renew_at < leaves_at);
    }

    /// Answers after a pause, recording how many requests were in flight at most.
    #[derive(Default)]
    struct Slow {
        in_flight: AtomicUsize,
        most: AtomicUsize,
    }

    impl TokenSource for Slow {
        fn fetch<'a>(&'a self, _key: &'a TokenKey) -> BoxFuture<'a, Result<Token, TokenError>> {
            Box::pin(async move {
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                Err(TokenError::Refused)
            })
        }

        fn probe(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn requests_for_many_accounts_take_turns() {
        let source = Arc::new(Slow::default());
        let cache = Arc::new(
            TokenCache::new(
                &CacheConfig::default(),
                source.clone(),
                Arc::new(Metrics::new()),
                None,
            )
            .with_max_concurrent_fetches(3),
        );
        let logins: Vec<_> = (0..12)
            .map(|i| {
                let cache = cache.clone();
                tokio::spawn(
                    async move { cache.get(&format!("account-{i}"), Protocol::Imap).await },
                )
            })
            .collect();
        for login in logins {
            assert!(login.await.unwrap().is_err());
        }
        assert_eq!(source.most.load(Ordering::SeqCst), 3);
    }
}

#[cfg(test)]
mod renewal_tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::login::UpstreamAuth;
    use crate::secret::Secret;
    use crate::token::BoxFuture;

    /// Hands out two-second tokens and counts the requests.
    #[derive(Default)]
    struct Source(AtomicUsize);

    impl TokenSource for Source {
        fn fetch<'a>(&'a self, _key: &'a TokenKey) -> BoxFuture<'a, Result<Token, TokenError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                Ok(Token {
                    auth: UpstreamAuth::Bearer {
                        user: "u".into(),
                        token: Secret::new("t".into()),
                    },
                    lifetime: Some(Duration::from_secs(2)),
                    server: None,
                })
            })
        }

        fn probe(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    /// Real time: moka's expiry does not follow tokio's paused clock. Tokens stay in the
    /// cache for one second and are renewed half a second after they were fetched.
    fn cache(source: Arc<Source>, metrics: Arc<Metrics>) -> Arc<TokenCache> {
        let config = CacheConfig {
            refresh_margin: Duration::from_secs(1),
            refresh_window: Duration::from_secs(1),
            ..CacheConfig::default()
        };
        Arc::new(TokenCache::new(&config, source, metrics, None))
    }

    #[tokio::test]
    async fn tokens_in_use_are_renewed_before_they_leave_the_cache() {
        let source = Arc::new(Source::default());
        let metrics = Arc::new(Metrics::new());
        let cache = cache(source.clone(), metrics.clone());
        // A login every 100 ms for three seconds: after the first, none may miss.
        for _ in 0..30 {
            cache.get("a", Protocol::Imap).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let text = metrics.encode();
        assert!(
            text.contains("mailgate_token_cache_total{result=\"miss\"} 1\n"),
            "{text}"
        );
        assert!(
            source.0.load(Ordering::SeqCst) >= 4,
            "renewed about every 0.5 s"
        );
    }

    #[tokio::test]
    async fn idle_accounts_are_left_to_expire() {
        let source = Arc::new(Source::default());
        let cache = cache(source.clone(), Arc::new(Metrics::new()));
        cache.get("a", Protocol::Imap).await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        // Renewed while within the one-second window of the one use, then left alone.
        assert!(
            source.0.load(Ordering::SeqCst) <= 4,
            "{}",
            source.0.load(Ordering::SeqCst)
        );
    }
}
