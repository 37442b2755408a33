//! The Redis replicas share (`tokens.shared.redis`): the handle every call goes through, with
//! a deadline, metrics and readiness; locks across replicas ([`lock`]); and news of accounts
//! between them ([`news`]). What is kept there is decided above: refresh-token records
//! (`token::oauth2::store::redis`), access tokens (`token::shared`), the throttle's counts
//! (`client_auth::throttle`).
//!
//! A Redis that does not answer in time counts as down (a metric and readiness say so); the
//! caller falls back to what it holds locally or fails temporarily. Callers seal what is
//! secret before it is sent: Redis never sees a token.

mod link;
pub mod lock;
pub mod news;

#[cfg(test)]
pub mod testing;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::FromRedisValue;
use tokio::time::Instant;

use crate::config::SharedConfig;
use crate::health::Health;
use crate::metrics::Metrics;
use link::Link;

/// HKDF's salt for keys derived from the sealing key.
const DERIVATION_SALT: &[u8] = b"mailgate replicas v1";
/// How often a Redis that counts as down is asked again: a replica that no login makes call
/// it must still find it back (readiness, and the news' subscription, renewed on reconnect).
const WATCH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharedError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis cannot be reached")]
    Unreachable,
    /// Redis answered with an error reply; its code only, since the text may quote what
    /// was sent.
    #[error("Redis refused the call ({0})")]
    Refused(String),
}

/// One Redis, as the replicas share it.
pub struct Redis {
    link: Link,
    prefix: String,
    timeout: Duration,
    /// What keys for other uses than sealing are derived from.
    derivation: ring::hkdf::Prk,
    metrics: Arc<Metrics>,
    health: Option<Arc<Health>>,
    /// The last call's outcome, to log each change once.
    up: AtomicBool,
    /// How often Redis answered again after not answering.
    recoveries: AtomicU64,
    /// Random, per handle: tells this replica's own news apart.
    replica: String,
    /// The connection for news (pub/sub pushes), set up once.
    pushes: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>>>,
    /// Who the news go to.
    listeners: std::sync::Mutex<Vec<news::Deliver>>,
    /// Itself, for the task that watches a Redis that is down.
    this: std::sync::Weak<Redis>,
}

impl Redis {
    /// A handle on the Redis `config` names; it connects on first use and reconnects by
    /// itself.
    ///
    /// # Errors
    /// The URL, TLS settings or key are unusable (`mailgate check` has said so already).
    pub fn new(
        config: &SharedConfig,
        metrics: Arc<Metrics>,
        health: Option<Arc<Health>>,
    ) -> Result<Arc<Self>, String> {
        let redis = &config.redis;
        let key = config
            .key
            .as_ref()
            .ok_or("tokens.shared has no key to derive from")?;
        let (pushes, pushed) = tokio::sync::mpsc::unbounded_channel();
        let link = Link::new(redis, pushes)?;
        let replica = random_id()?;
        Ok(Arc::new_cyclic(|this| Self {
            link,
            prefix: redis.key_prefix.clone(),
            timeout: redis.timeout,
            derivation: ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, DERIVATION_SALT)
                .extract(key.expose()),
            metrics,
            health,
            up: AtomicBool::new(true),
            recoveries: AtomicU64::new(0),
            replica,
            pushes: std::sync::Mutex::new(Some(pushed)),
            listeners: std::sync::Mutex::new(Vec::new()),
            this: this.clone(),
        }))
    }

    /// The Redis key of `name` in `space` (`token`, `lease`, ...), under the prefix. In a
    /// cluster the prefix is a hash tag: every key in one slot, so that scripts may take
    /// several.
    pub fn key(&self, space: &str, name: &str) -> String {
        if self.link.is_cluster() {
            format!("{{{}}}{space}:{name}", self.prefix)
        } else {
            format!("{}{space}:{name}", self.prefix)
        }
    }

    /// How often Redis answered again after not answering, since the start.
    pub fn recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::SeqCst)
    }

    /// Whether the last call was answered: a caller that can do without Redis need not
    /// wait for one that does not answer (it is asked again in the background).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// An HMAC key for `label`'s use, derived from the sealing key (HKDF, RFC 5869): the same
    /// in every replica, and telling nothing of the sealing key or of other labels' keys.
    ///
    /// # Errors
    /// None in practice: HKDF refuses only outputs longer than 255 hashes.
    pub fn derived_key(&self, label: &str) -> Result<ring::hmac::Key, String> {
        self.derivation
            .expand(&[label.as_bytes()], ring::hmac::HMAC_SHA256)
            .map(ring::hmac::Key::from)
            .map_err(|_| format!("cannot derive the key for {label}"))
    }

    /// Runs `command` within the deadline; `op` names it in metrics.
    ///
    /// # Errors
    /// Redis failed or did not answer in time.
    pub async fn run<T: FromRedisValue>(
        &self,
        op: &'static str,
        command: &redis::Cmd,
    ) -> Result<T, SharedError> {
        self.timed(op, async move {
            command
                .query_async(&mut self.link.connection().await?)
                .await
        })
        .await
    }

    /// Runs `invocation` of a Lua script within the deadline (`EVALSHA`, loading it once).
    ///
    /// # Errors
    /// Redis failed or did not answer in time.
    pub async fn eval<T: FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, SharedError> {
        self.timed(op, async move {
            invocation
                .invoke_async(&mut self.link.connection().await?)
                .await
        })
        .await
    }

    /// Subscribes to `channel`; messages arrive on the receiver [`Redis::pushes`] hands out.
    ///
    /// # Errors
    /// Redis failed or did not answer in time.
    pub async fn subscribe(&self, channel: &str) -> Result<(), SharedError> {
        self.timed("subscribe", async move {
            let mut connection = self.link.connection().await?;
            self.link.subscribe(&mut connection, channel).await
        })
        .await
    }

    /// What listens to the news on this handle.
    fn listeners(&self) -> std::sync::MutexGuard<'_, Vec<news::Deliver>> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pushes of the subscriptions; only the first caller gets them.
    pub fn pushes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>> {
        self.pushes.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                self.link.failed(Some(&error)).await;
                Err(classify(&error, self.timeout))
            }
            Err(_) => {
                self.link.failed(None).await;
                Err(SharedError::Timeout(self.timeout))
            }
        };
        let label = match &result {
            Ok(_) => "ok",
            Err(SharedError::Timeout(_)) => "timeout",
            Err(SharedError::Unreachable) => "unreachable",
            Err(SharedError::Refused(_)) => "refused",
        };
        self.metrics
            .redis_call(op, label, started.elapsed().as_secs_f64());
        self.answered(matches!(result, Ok(_) | Err(SharedError::Refused(_))));
        result
    }

    /// Records whether Redis answered, for readiness and the `up` gauge, logging changes.
    fn answered(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                self.recoveries.fetch_add(1, Ordering::SeqCst);
                tracing::info!("Redis answers again");
            } else {
                tracing::warn!("the shared Redis does not answer");
                self.watch();
            }
        }
        self.metrics.redis_up(up);
        if let Some(health) = &self.health {
            health.set_shared_state_reachable(up);
        }
    }
}

impl Redis {
    /// Pings Redis every [`WATCH_EVERY`] until it answers (or the handle is dropped).
    fn watch(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.this.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                let Some(redis) = this.upgrade() else { return };
                if redis.up.load(Ordering::Relaxed) {
                    return;
                }
                let _: Result<String, _> = redis.run("ping", &redis::cmd("PING")).await;
            }
        });
    }
}

/// A duration in the milliseconds Redis takes (`PX`, `PEXPIRE`, scripts' arguments).
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn random_id() -> Result<String, String> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 12];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no randomness from the system".to_owned())?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn classify(error: &redis::RedisError, timeout: Duration) -> SharedError {
    if error.is_timeout() {
        return SharedError::Timeout(timeout);
    }
    match error.code() {
        Some(code) => SharedError::Refused(crate::sanitize::for_log(code)),
        // Redis answered, with something else than the call expects (another writer's value,
        // a corrupted entry): that is no outage.
        None if matches!(
            error.kind(),
            redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType
        ) =>
        {
            SharedError::Refused("an answer of another shape".to_owned())
        }
        None => SharedError::Unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::news::{self, News};
    use super::testing::{RedisCluster, RedisServer};
    use super::*;

    #[tokio::test]
    async fn news_reach_the_other_replicas_through_a_cluster() {
        let cluster = RedisCluster::start();
        let (one, other) = (cluster.handle(), cluster.handle());
        let (heard, mut hearing) = tokio::sync::mpsc::unbounded_channel();
        news::listen(&other, move |news| heard.send(news.clone()).is_ok());
        let revoked = News::Revoked("alice@example.test".to_owned());
        let delivered = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                news::publish(&one, &revoked).await;
                if let Ok(Some(news)) =
                    tokio::time::timeout(Duration::from_millis(200), hearing.recv()).await
                {
                    return news;
                }
            }
        })
        .await
        .expect("the news arrived");
        assert_eq!(delivered, revoked);
        // Keys share one slot, so scripts may take several.
        assert_eq!(one.key("lease", "alice"), "{test:}lease:alice");
    }

    #[tokio::test]
    async fn a_password_reaches_redis_even_over_a_unix_socket() {
        let server = RedisServer::start_with(Some("redis-pass-q7"));
        let ping = redis::cmd("PING");
        let answer: String = server.handle().run("ping", &ping).await.unwrap();
        assert_eq!(answer, "PONG");
        let stranger = RedisServer::start();
        assert!(stranger.handle().run::<String>("ping", &ping).await.is_ok());
    }

    #[tokio::test]
    async fn a_refusal_is_an_answer_and_a_dead_redis_is_down() {
        let server = RedisServer::start_with(Some("redis-pass-q7"));
        let handle = server.handle();
        let absent = redis::cmd("HGET").arg("nothing").arg("field").clone();
        let nothing: Option<String> = handle.run("hget", &absent).await.unwrap();
        assert_eq!(nothing, None);
        let bad = redis::cmd("NOSUCHCOMMAND");
        assert!(matches!(
            handle.run::<String>("bad", &bad).await,
            Err(SharedError::Refused(_))
        ));
        assert!(handle.up.load(Ordering::Relaxed));
        drop(server);
        assert!(matches!(
            handle.run::<String>("ping", &redis::cmd("PING")).await,
            Err(SharedError::Unreachable | SharedError::Timeout(_))
        ));
        assert!(!handle.up.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn an_answer_of_another_shape_is_refused_not_down() {
        let server = RedisServer::start();
        let handle = server.handle();
        // What another writer (or a corrupted entry) leaves where a number is expected.
        server.cli(&["SET", "test:odd", "not a number"]);
        let get = redis::cmd("GET").arg("test:odd").clone();
        assert!(matches!(
            handle.run::<u64>("get", &get).await,
            Err(SharedError::Refused(_))
        ));
        assert!(handle.up.load(Ordering::Relaxed));
    }
}
