//! News between replicas over pub/sub: an account revoked (its sessions end everywhere), or
//! its token replaced (a re-authorization, an import, a token the upstream refused), so
//! every replica drops what it has cached and the next login gets the new one; and the
//! operator's kicks, moves and drains of backends (`backends::shared`). Letters carry
//! a proof under a key derived from the sealing key: one that lacks it (another deployment on
//! the same prefix, anyone else who may publish) is not acted on.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;
use serde::{Deserialize, Serialize};

use super::Redis;
use crate::config::is_usable_name;

/// How long a replica waits before subscribing again after Redis refused.
const SUBSCRIBE_RETRY: Duration = Duration::from_secs(1);
/// Label of the key that proves letters.
const PROOFS_LABEL: &str = "news proofs";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "news", content = "account", rename_all = "snake_case")]
pub enum News {
    /// Refused for good by its token source: its sessions end and its tokens are dropped.
    Revoked(String),
    /// Its cached tokens are stale: dropped, the next login fetches anew.
    Replaced(String),
    /// An (account, address) pair that logged in, by its name in Redis: the other replicas
    /// need not ask Redis about it before its next login there.
    Known(String),
    /// Ended by the operator (`mailgate backends kick`): its sessions end everywhere.
    Kicked(String),
    /// Moved by the operator to another backend: its route is read again from Redis.
    Moved(String),
    /// The operator drained or undrained this backend server: the drains are read again.
    Drains(String),
}

impl News {
    /// The account, or for [`News::Known`] the pair's name, for [`News::Drains`] the
    /// server's.
    pub fn account(&self) -> &str {
        match self {
            News::Revoked(name)
            | News::Replaced(name)
            | News::Known(name)
            | News::Kicked(name)
            | News::Moved(name)
            | News::Drains(name) => name,
        }
    }
}

/// What is done with a letter; `false` once its listener is gone.
pub type Deliver = Box<dyn Fn(&News) -> bool + Send>;

#[derive(Serialize, Deserialize)]
struct Letter {
    /// The sending replica, which ignores its own letters.
    from: String,
    #[serde(flatten)]
    news: News,
    /// HMAC-SHA256 of the sender and the news, base64.
    proof: String,
}

/// Tells the other replicas.
pub async fn publish(redis: &Redis, news: &News) {
    let Some(proof) = proof(redis, &redis.replica, news) else {
        return;
    };
    let letter = Letter {
        from: redis.replica.clone(),
        news: news.clone(),
        proof,
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

/// Delivers the other replicas' news to `deliver` (and to every other listener of the
/// handle) until the handle's pushes end (the handle was dropped) or `deliver` says stop.
pub fn listen(redis: &Arc<Redis>, deliver: impl Fn(&News) -> bool + Send + 'static) {
    redis.listeners().push(Box::new(deliver));
    let Some(mut pushes) = redis.pushes() else {
        // The first listener's task delivers to all.
        return;
    };
    let weak = Arc::downgrade(redis);
    tokio::spawn(async move {
        if !subscribe(&weak).await {
            return;
        }
        while let Some(push) = pushes.recv().await {
            // The connection manager subscribes again when it reconnects, but it reconnects
            // only for a call, which a replica serving cached tokens may not make for long.
            if push.kind == redis::PushKind::Disconnection {
                if !subscribe(&weak).await {
                    return;
                }
                continue;
            }
            let Some(redis) = weak.upgrade() else { return };
            if let Some(news) = read(&redis, &push) {
                redis.listeners().retain(|deliver| deliver(&news));
            }
        }
    });
}

/// Subscribes to the news, trying again until Redis takes it; `false` once the handle is
/// gone.
async fn subscribe(weak: &std::sync::Weak<Redis>) -> bool {
    loop {
        let Some(redis) = weak.upgrade() else {
            return false;
        };
        if redis.subscribe(&channel(&redis)).await.is_ok() {
            return true;
        }
        drop(redis);
        tokio::time::sleep(SUBSCRIBE_RETRY).await;
    }
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
    (proven(redis, &letter)
        && letter.from != redis.replica
        && is_usable_name(letter.news.account()))
    .then_some(letter.news)
}

/// The proof of `news` from `from`; `None` if no key could be derived.
fn proof(redis: &Redis, from: &str, news: &News) -> Option<String> {
    let key = redis.derived_key(PROOFS_LABEL).ok()?;
    let tag = hmac::sign(&key, proven_text(from, news)?.as_bytes());
    Some(STANDARD.encode(tag))
}

/// Whether `letter` carries its proof (checked in constant time).
fn proven(redis: &Redis, letter: &Letter) -> bool {
    let (Ok(key), Ok(tag)) = (
        redis.derived_key(PROOFS_LABEL),
        STANDARD.decode(&letter.proof),
    ) else {
        return false;
    };
    proven_text(&letter.from, &letter.news)
        .is_some_and(|text| hmac::verify(&key, text.as_bytes(), &tag).is_ok())
}

/// What a letter's proof is over: its sender and its news.
fn proven_text(from: &str, news: &News) -> Option<String> {
    serde_json::to_string(&(from, news)).ok()
}

fn channel(redis: &Redis) -> String {
    redis.key("news", "accounts")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicas::testing::RedisServer;

    /// Listens on `redis`, forwarding what is delivered.
    fn listener(redis: &Arc<Redis>) -> tokio::sync::mpsc::UnboundedReceiver<News> {
        let (delivered, heard) = tokio::sync::mpsc::unbounded_channel();
        listen(redis, move |news| delivered.send(news.clone()).is_ok());
        heard
    }

    async fn subscribed(server: &RedisServer) {
        for _ in 0..200 {
            if server
                .cli(&["PUBSUB", "NUMSUB", "test:news:accounts"])
                .contains("\n1")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the listener never subscribed");
    }

    #[tokio::test]
    async fn only_letters_sealed_with_the_deployments_key_are_acted_on() {
        let server = RedisServer::start();
        let ours = server.handle();
        let mut heard = listener(&ours);
        subscribed(&server).await;
        // Another deployment on the same prefix, another key; and a bare forged letter.
        publish(&server.handle_keyed(8), &News::Revoked("alice".to_owned())).await;
        server.cli(&[
            "PUBLISH",
            "test:news:accounts",
            r#"{"from":"x","news":"revoked","account":"carol"}"#,
        ]);
        publish(&server.handle(), &News::Revoked("bob".to_owned())).await;
        let first = tokio::time::timeout(Duration::from_secs(5), heard.recv()).await;
        assert_eq!(first.unwrap(), Some(News::Revoked("bob".to_owned())));
    }
}
