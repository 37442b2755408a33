//! News between replicas over pub/sub: an account revoked (its sessions end everywhere), or
//! its token replaced (a re-authorization, an import, a token the upstream refused), so
//! every replica drops what it has cached and the next login gets the new one.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Redis;
use crate::config::is_usable_name;

/// How long a replica waits before subscribing again after Redis refused.
const SUBSCRIBE_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "news", content = "account", rename_all = "snake_case")]
pub enum News {
    /// Refused for good by its token source: its sessions end and its tokens are dropped.
    Revoked(String),
    /// Its cached tokens are stale: dropped, the next login fetches anew.
    Replaced(String),
}

impl News {
    pub fn account(&self) -> &str {
        match self {
            News::Revoked(account) | News::Replaced(account) => account,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Letter {
    /// The sending replica, which ignores its own letters.
    from: String,
    #[serde(flatten)]
    news: News,
}

/// Tells the other replicas.
pub async fn publish(redis: &Redis, news: &News) {
    let letter = Letter {
        from: redis.replica.clone(),
        news: news.clone(),
    };
    let Ok(text) = serde_json::to_string(&letter) else {
        return;
    };
    let mut command = redis::cmd("PUBLISH");
    command.arg(channel(redis)).arg(text);
    if let Err(error) = redis.run::<u64>("publish", &command).await {
        tracing::warn!(%error, "cannot tell the other replicas about an account");
    }
}

/// Delivers the other replicas' news to `deliver` until the handle's pushes end (the handle
/// was dropped) or `deliver` says stop.
pub fn listen(redis: &Arc<Redis>, deliver: impl Fn(News) -> bool + Send + 'static) {
    let Some(mut pushes) = redis.pushes() else {
        return;
    };
    let weak = Arc::downgrade(redis);
    tokio::spawn(async move {
        // Subscribed once, the connection manager subscribes again after each reconnect.
        loop {
            let Some(redis) = weak.upgrade() else { return };
            if redis.subscribe(&channel(&redis)).await.is_ok() {
                break;
            }
            drop(redis);
            tokio::time::sleep(SUBSCRIBE_RETRY).await;
        }
        while let Some(push) = pushes.recv().await {
            let Some(redis) = weak.upgrade() else { return };
            if let Some(news) = read(&redis, &push)
                && !deliver(news)
            {
                return;
            }
        }
    });
}

/// The news in a push, if it is another replica's letter on our channel.
fn read(redis: &Redis, push: &redis::PushInfo) -> Option<News> {
    if push.kind != redis::PushKind::Message {
        return None;
    }
    let [channel_name, payload] = push.data.as_slice() else {
        return None;
    };
    let channel_name: String = redis::from_redis_value_ref(channel_name).ok()?;
    if channel_name != channel(redis) {
        return None;
    }
    let payload: Vec<u8> = redis::from_redis_value_ref(payload).ok()?;
    let letter: Letter = serde_json::from_slice(&payload).ok()?;
    (letter.from != redis.replica && is_usable_name(letter.news.account())).then_some(letter.news)
}

fn channel(redis: &Redis) -> String {
    redis.key("news", "accounts")
}
