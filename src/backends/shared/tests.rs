//! Two replicas' backends sharing one real redis-server.

use std::sync::Arc;
use std::time::Duration;

use super::super::{Backends, Lease, Pool, ring};
use crate::config::pool::ServerConfig;
use crate::config::{Protocol, TlsMode, UpstreamConfig};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::replicas::Redis;
use crate::replicas::testing::RedisServer;

const SERVERS: [&str; 3] = ["s1", "s2", "s3"];
const ACCOUNT: &str = "Alice@Example.test";
const KEY: &str = "alice@example.test";

/// One replica's backends with a pool of three servers that are never checked again (the
/// tests say which are up), sharing `redis` if given.
fn replica(redis: Option<&Arc<Redis>>) -> (Arc<Backends>, Arc<Pool>) {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(Duration::from_secs(30)));
    let backends = Arc::new(Backends::new(metrics.clone(), health));
    let mut config = UpstreamConfig::new(String::new(), 0, TlsMode::None);
    config.servers = SERVERS
        .iter()
        .map(|name| ServerConfig {
            name: (*name).to_owned(),
            host: "127.0.0.1".to_owned(),
            port: 9,
            weight: 1,
        })
        .collect();
    config.health.interval = Duration::from_secs(3600);
    let protocol = crate::protocols::named(Protocol::Imap);
    let pool = Pool::new(
        "imap",
        protocol,
        &config,
        "mailgate.test",
        &backends,
        &metrics,
    )
    .unwrap();
    backends.shared_through(redis);
    (backends, pool)
}

/// Where rendezvous hashing sends the account when every server is up.
fn preferred() -> &'static str {
    let index = ring::best(KEY, SERVERS.iter().map(|name| (*name, 1))).unwrap();
    SERVERS[index]
}

async fn route(pool: &Pool) -> Lease {
    pool.route(ACCOUNT, None, &[]).await.unwrap()
}

/// Waits (10 s at most) until `condition` holds.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never: {what}");
}

/// Waits until `count` replicas listen to the news.
async fn listening(server: &RedisServer, count: usize) {
    let expected = format!("\n{count}");
    for _ in 0..500 {
        if server
            .cli(&["PUBSUB", "NUMSUB", "test:news:accounts"])
            .contains(&expected)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the replicas never listened");
}

fn draining(backends: &Backends, server: &str) -> bool {
    backends
        .status()
        .iter()
        .any(|status| status.server == server && status.state == "draining")
}

async fn ended(lease: &Lease) {
    tokio::time::timeout(Duration::from_secs(10), lease.ended())
        .await
        .expect("the session was ended");
}

#[tokio::test]
async fn an_assignment_is_followed_by_a_replica_that_sees_other_servers_up() {
    let server = RedisServer::start();
    let (_one_backends, one) = replica(Some(&server.handle()));
    let (_other_backends, other) = replica(Some(&server.handle()));
    // The first replica finds the account's preferred server down; the other does not.
    one.set_up(preferred(), false);
    let first = route(&one).await;
    let assigned = first.server().name.clone();
    assert_ne!(assigned, preferred());
    let second = route(&other).await;
    assert_eq!(second.server().name, assigned);
    let key = format!("test:backend-account:{KEY}");
    assert_eq!(server.cli(&["GET", &key]).trim(), assigned);
    assert!(server.cli(&["PTTL", &key]).trim().parse::<i64>().unwrap() > 0);
    // With no session open anywhere, the assignment still holds until it expires.
    drop((first, second));
    assert_eq!(route(&other).await.server().name, assigned);
    server.cli(&["DEL", &key]);
    assert_eq!(route(&other).await.server().name, preferred());
}

#[tokio::test]
async fn an_assignment_to_a_server_a_replica_cannot_use_is_taken_over() {
    let server = RedisServer::start();
    let (one_backends, one) = replica(Some(&server.handle()));
    let (_other_backends, other) = replica(Some(&server.handle()));
    let on_preferred = route(&one).await;
    assert_eq!(on_preferred.server().name, preferred());
    // The other replica finds that server down: the account moves, and the first replica's
    // renewal finds it assigned elsewhere and ends its session there.
    other.set_up(preferred(), false);
    let moved = route(&other).await;
    assert_ne!(moved.server().name, preferred());
    let key = format!("test:backend-account:{KEY}");
    assert_eq!(server.cli(&["GET", &key]).trim(), moved.server().name);
    one_backends
        .renew_assignments(&one_backends.shared().unwrap())
        .await;
    ended(&on_preferred).await;
}

#[tokio::test]
async fn a_drain_reaches_the_other_replica_by_news_and_by_reading() {
    let server = RedisServer::start();
    let (one_backends, _one) = replica(Some(&server.handle()));
    let (other_backends, other) = replica(Some(&server.handle()));
    listening(&server, 2).await;
    let session = route(&other).await;
    let target = session.server().name.clone();
    one_backends.drain(&target, Duration::ZERO).await.unwrap();
    eventually("the drain reached the other replica", || {
        draining(&other_backends, &target)
    })
    .await;
    // Its grace over, the other replica ends its own sessions there.
    ended(&session).await;
    drop(session);
    assert_ne!(route(&other).await.server().name, target);
    // An undrain whose news was missed is read within a few seconds.
    server.cli(&["HDEL", "test:backends:drains", &target]);
    eventually("the undrain was read", || {
        !draining(&other_backends, &target)
    })
    .await;
    one_backends.undrain(&target).await.unwrap();
    assert!(!draining(&one_backends, &target));
}

#[tokio::test]
async fn a_replica_starting_reads_the_drains_in_force() {
    let server = RedisServer::start();
    let (one_backends, _one) = replica(Some(&server.handle()));
    one_backends
        .drain("s2", Duration::from_secs(60))
        .await
        .unwrap();
    let (late_backends, _late) = replica(Some(&server.handle()));
    eventually("the drain was read at start", || {
        draining(&late_backends, "s2")
    })
    .await;
    // What another writer left there is not a drain.
    server.cli(&["HSET", "test:backends:drains", "s1", "not json"]);
    // A drain begun at the end of time drains, and is no reason to fail.
    let end_of_time = format!(r#"{{"since_ms":{0},"grace_ms":{0}}}"#, u64::MAX);
    server.cli(&["HSET", "test:backends:drains", "s3", &end_of_time]);
    late_backends
        .sync_drains(&late_backends.shared().unwrap())
        .await;
    assert!(!draining(&late_backends, "s1"));
    assert!(draining(&late_backends, "s2") && draining(&late_backends, "s3"));
}

#[tokio::test]
async fn moves_and_kicks_reach_the_other_replica() {
    let server = RedisServer::start();
    let (one_backends, _one) = replica(Some(&server.handle()));
    let (_other_backends, other) = replica(Some(&server.handle()));
    listening(&server, 2).await;
    let session = route(&other).await;
    let elsewhere = SERVERS
        .into_iter()
        .find(|name| *name != session.server().name)
        .unwrap();
    // No routes file: Redis keeps the move.
    one_backends.move_account(ACCOUNT, elsewhere).await.unwrap();
    ended(&session).await;
    drop(session);
    let moved = route(&other).await;
    assert_eq!(moved.server().name, elsewhere);
    assert_eq!(
        server.cli(&["HGET", "test:backends:moves", KEY]).trim(),
        elsewhere
    );
    one_backends.kick(ACCOUNT).await;
    ended(&moved).await;
}

#[tokio::test]
async fn without_an_answer_from_redis_logins_route_here() {
    let server = RedisServer::start();
    let (backends, pool) = replica(Some(&server.handle()));
    drop(server);
    assert_eq!(route(&pool).await.server().name, preferred());
    pool.set_up(preferred(), false);
    assert_ne!(route(&pool).await.server().name, preferred());
    // What cannot be shared is refused rather than kept by this replica alone.
    assert!(backends.drain("s1", Duration::ZERO).await.is_err());
    assert!(replica(None).0.move_account(ACCOUNT, "s1").await.is_err());
}

#[tokio::test]
async fn a_replica_with_a_session_open_keeps_the_assignment() {
    let server = RedisServer::start();
    let (backends, pool) = replica(Some(&server.handle()));
    let session = route(&pool).await;
    let key = format!("test:backend-account:{KEY}");
    server.cli(&["DEL", &key]);
    let shared = backends.shared().unwrap();
    backends.renew_assignments(&shared).await;
    assert_eq!(server.cli(&["GET", &key]).trim(), session.server().name);
    server.cli(&["PEXPIRE", &key, "1000"]);
    backends.renew_assignments(&shared).await;
    let left: u64 = server.cli(&["PTTL", &key]).trim().parse().unwrap();
    assert!(left > 1000, "renewed to the full lifetime, not {left} ms");
    assert!(!session.was_ended());
}
