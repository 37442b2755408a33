//! The throttle shared by replicas, against a real redis-server: two handles on one server
//! are two replicas, a new handle is a replica after a restart.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{Scope, Throttle};
use crate::config::ThrottleConfig;
use crate::login::Credentials;
use crate::metrics::Metrics;
use crate::replicas::testing::RedisServer;
use crate::secret::Secret;

/// Each test's deadline: Redis calls have their own (2 s), this catches a hang.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A replica's throttle, on its own handle of `server`, and its metrics.
fn replica(server: &RedisServer, block_address_after: u32) -> (Throttle, Arc<Metrics>) {
    let config = ThrottleConfig {
        block_address_after,
        block_network_after: 0,
        ..ThrottleConfig::default()
    };
    let metrics = Arc::new(Metrics::new());
    let throttle = Throttle::new(&config, metrics.clone())
        .unwrap()
        .shared_through(server.handle())
        .unwrap();
    (throttle, metrics)
}

fn ip(text: &str) -> Option<IpAddr> {
    Some(text.parse().unwrap())
}

fn credentials(account: &str, password: &str) -> Credentials {
    Credentials {
        account: account.into(),
        password: Secret::new(password.into()),
    }
}

async fn within_deadline(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test finished within its deadline");
}

#[tokio::test]
async fn failures_on_two_replicas_meet_one_budget() {
    within_deadline(async {
        let server = RedisServer::start();
        let (a, a_metrics) = replica(&server, 4);
        let (b, b_metrics) = replica(&server, 4);
        for n in 0..4 {
            let replica = if n % 2 == 0 { &a } else { &b };
            assert!(replica.check(ip("192.0.2.1"), "alice").await.is_ok());
            let guess = credentials("alice", &format!("guess {n}"));
            replica.wrong_password(ip("192.0.2.1"), &guess).await;
        }
        let (restarted, _) = replica(&server, 4);
        for replica in [&a, &b, &restarted] {
            assert_eq!(
                replica.check(ip("192.0.2.1"), "carol").await,
                Err(Scope::Address)
            );
            assert_eq!(
                replica.check(ip("192.0.2.2"), "carol").await,
                Ok(Duration::ZERO)
            );
        }
        // The account's four failures make its next login wait 1 s doubled three times.
        assert_eq!(
            restarted.check(ip("198.51.100.7"), "alice").await,
            Ok(Duration::from_secs(8))
        );
        let announced = [a_metrics, b_metrics]
            .iter()
            .filter(|metrics| {
                metrics
                    .encode()
                    .contains("mailgate_login_blocks_total{scope=\"address\"} 1\n")
            })
            .count();
        assert_eq!(announced, 1, "the block is announced by one replica");
    })
    .await;
}

#[tokio::test]
async fn a_wrong_password_retried_on_every_replica_counts_once() {
    within_deadline(async {
        let server = RedisServer::start();
        let replicas = [replica(&server, 2).0, replica(&server, 2).0];
        for _ in 0..3 {
            for (replica, account) in replicas.iter().zip(["bob", " BOB"]) {
                let stale = credentials(account, "last year's password");
                replica.wrong_password(ip("192.0.2.1"), &stale).await;
            }
        }
        for replica in &replicas {
            assert!(replica.check(ip("192.0.2.1"), "alice").await.is_ok());
        }
        let another = credentials("bob", "another");
        replicas[1].wrong_password(ip("192.0.2.1"), &another).await;
        assert_eq!(
            replicas[0].check(ip("192.0.2.1"), "alice").await,
            Err(Scope::Address)
        );
    })
    .await;
}

#[tokio::test]
async fn a_known_address_is_spared_on_every_replica_and_after_a_restart() {
    within_deadline(async {
        let server = RedisServer::start();
        let (a, _) = replica(&server, 2);
        let (b, _) = replica(&server, 2);
        a.succeeded(ip("192.0.2.1"), "alice").await;
        for n in 0..2 {
            let guess = credentials("bob", &format!("guess {n}"));
            b.wrong_password(ip("192.0.2.1"), &guess).await;
        }
        let (restarted, _) = replica(&server, 2);
        for replica in [&b, &restarted] {
            assert_eq!(
                replica.check(ip("192.0.2.1"), "carol").await,
                Err(Scope::Address)
            );
            assert_eq!(
                replica.check(ip("192.0.2.1"), "Alice").await,
                Ok(Duration::ZERO)
            );
        }

        // Warm now: the owner's next login asks Redis nothing, nor writes to it.
        server.cli(&["CONFIG", "RESETSTAT"]);
        assert_eq!(
            restarted.check(ip("192.0.2.1"), "alice").await,
            Ok(Duration::ZERO)
        );
        restarted.succeeded(ip("192.0.2.1"), "alice").await;
        a.succeeded(ip("192.0.2.1"), "alice").await;
        let stats = server.cli(&["INFO", "commandstats"]);
        assert!(!stats.contains("cmdstat_eval"), "{stats}");
        assert!(!stats.contains("cmdstat_set:"), "{stats}");
    })
    .await;
}

#[tokio::test]
async fn a_pair_known_on_one_replica_costs_the_others_no_round_trip() {
    within_deadline(async {
        let server = RedisServer::start();
        let (a, _) = replica(&server, 2);
        let (b, _) = replica(&server, 2);
        // Both listen before a tells, as replicas running before the login do.
        for _ in 0..250 {
            if server
                .cli(&["PUBSUB", "NUMSUB", "test:news:accounts"])
                .contains("\n2")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.succeeded(ip("192.0.2.1"), "alice").await;
        // Delivery on loopback takes well under this.
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.cli(&["CONFIG", "RESETSTAT"]);
        assert_eq!(b.check(ip("192.0.2.1"), "alice").await, Ok(Duration::ZERO));
        let asked = server.cli(&["INFO", "commandstats"]);
        assert!(!asked.contains("cmdstat_eval"), "b asked Redis: {asked}");
        // And b spares the owner the address's block it learns of afterwards.
        for n in 0..2 {
            let guess = credentials("bob", &format!("guess {n}"));
            a.wrong_password(ip("192.0.2.1"), &guess).await;
        }
        assert_eq!(b.check(ip("192.0.2.1"), "carol").await, Err(Scope::Address));
        assert_eq!(b.check(ip("192.0.2.1"), "alice").await, Ok(Duration::ZERO));
    })
    .await;
}

#[tokio::test]
async fn a_login_renews_a_known_address_redis_is_about_to_forget() {
    within_deadline(async {
        let server = RedisServer::start();
        let (a, _) = replica(&server, 2);
        a.succeeded(ip("192.0.2.1"), "alice").await;
        let keys = server.cli(&["--scan", "--pattern", "test:throttle:known:*"]);
        let key = keys.trim();
        let thirty_days = 30 * 24 * 3600 * 1000;
        let left =
            |server: &RedisServer| -> u64 { server.cli(&["PTTL", key]).trim().parse().unwrap() };
        assert!(left(&server) > thirty_days - 60_000);

        // Twenty days later, on a replica that never saw alice: Redis's copy is renewed.
        server.cli(&["PEXPIRE", key, &(10 * 24 * 3600 * 1000_u64).to_string()]);
        let (restarted, _) = replica(&server, 2);
        assert_eq!(
            restarted.check(ip("192.0.2.1"), "alice").await,
            Ok(Duration::ZERO)
        );
        restarted.succeeded(ip("192.0.2.1"), "alice").await;
        assert!(left(&server) > thirty_days - 60_000);
    })
    .await;
}

#[tokio::test]
async fn without_redis_the_throttle_goes_on_with_its_own_counts() {
    within_deadline(async {
        let server = RedisServer::start();
        let (a, _) = replica(&server, 2);
        let (b, _) = replica(&server, 2);
        b.wrong_password(ip("192.0.2.1"), &credentials("bob", "one"))
            .await;
        assert_eq!(
            a.check(ip("192.0.2.1"), "carol").await,
            Ok(Duration::from_secs(1))
        );
        drop(server);

        // The failure Redis counted before it went away still counts here.
        a.wrong_password(ip("192.0.2.1"), &credentials("bob", "two"))
            .await;
        assert_eq!(a.check(ip("192.0.2.1"), "carol").await, Err(Scope::Address));
        a.succeeded(ip("192.0.2.2"), "alice").await;
        assert_eq!(a.check(ip("192.0.2.2"), "alice").await, Ok(Duration::ZERO));
        assert_eq!(b.check(ip("192.0.2.3"), "carol").await, Ok(Duration::ZERO));
    })
    .await;
}

#[tokio::test]
async fn redis_holds_no_account_address_or_password() {
    within_deadline(async {
        let server = RedisServer::start();
        let (a, _) = replica(&server, 2);
        let guess = credentials("alice.liddell", "hunter2-guess");
        a.wrong_password(ip("203.0.113.77"), &guess).await;
        a.succeeded(ip("203.0.113.77"), "alice.liddell").await;
        let dump = server.dump();
        assert!(dump.contains("test:throttle:known:"), "{dump}");
        for clear in ["alice", "hunter2", "203.0.113"] {
            assert!(!dump.contains(clear), "{clear} in {dump}");
        }
    })
    .await;
}
