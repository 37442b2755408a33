//! Replicas sharing one Redis (`tokens.shared.redis`): three real mailgate processes, one real
//! redis-server, one real Dovecot and the local OAuth2 provider. The provider counts and
//! refuses what a real one would: a rotated refresh token presented again revokes its whole
//! family (RFC 9700 reuse detection), so a token redeemed twice shows as failed logins.

mod support;

use std::time::Duration;

use support::cluster::{ALICE, CLIENT, Cluster, log_in_and_out, logins_at_once};
use support::imap_client::ImapClient;
use support::process::send_signal;
use support::{Mailgate, eventually, with_timeout};

const MINUTES: Duration = Duration::from_secs(180);

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_make_one_provider_request_per_account() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(3, 10, "").await;
        cluster.start_all().await;

        let failed = logins_at_once(&cluster, 300).await;
        assert!(failed.is_empty(), "{failed:?}\n{}", cluster.output());
        let (requests, granted) = cluster.refreshes();
        assert_eq!(
            (requests, granted),
            (10, 10),
            "one refresh per account over all replicas\n{}",
            cluster.output()
        );
        assert_eq!(cluster.provider.reuses_detected(), 0);
        // Every replica served logins, and those it did not fetch for came from Redis.
        let hits: f64 = {
            let mut sum = 0.0;
            for n in 0..3 {
                let text = cluster.metrics(n).await;
                assert!(
                    metric(
                        &text,
                        "mailgate_logins_total{listener=\"imap\",result=\"ok\"}"
                    ) >= 100.0,
                    "{text}"
                );
                sum += metric(&text, "mailgate_shared_tokens_total{result=\"hit\"}");
            }
            sum
        };
        assert!(hits >= 1.0, "no replica took another's token");
        for n in 0..3 {
            cluster.replica(n).assert_no_secret_logged();
        }
        // Redis holds the refresh tokens sealed: none of them in clear on its disk.
        let files = cluster.redis.files();
        for account in &cluster.accounts {
            assert!(files.contains(account.as_str()));
        }
        for token in cluster.provider.refresh_tokens_issued(ALICE) {
            assert!(!files.contains(&token), "a refresh token in clear in Redis");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotations_while_three_replicas_log_in_never_redeem_a_token_twice() {
    with_timeout(MINUTES, async {
        // Tokens live 3 s and are renewed 2 s before expiry: every round needs a refresh,
        // and the replicas' background renewals race the logins' fetches.
        let mut cluster =
            Cluster::start(3, 1, "  cache: { refresh_margin: 2s, default_ttl: 3s }\n").await;
        cluster
            .provider
            .set_access_token_lifetime(Duration::from_secs(3));
        cluster.start_all().await;

        for round in 0..50 {
            let failed = logins_at_once(&cluster, 6).await;
            assert!(
                failed.is_empty(),
                "round {round}: {failed:?}\n{}",
                cluster.output()
            );
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let (requests, granted) = cluster.refreshes();
        assert_eq!(
            cluster.provider.reuses_detected(),
            0,
            "{}",
            cluster.output()
        );
        assert_eq!(requests, granted, "every refresh was granted");
        assert!(
            requests >= 25,
            "the tokens were really refreshed in the rounds ({requests})"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_mid_refresh_is_taken_over_after_its_lease() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(3, 1, "").await;
        cluster.start_all().await;
        let hold = cluster.provider.hold();
        // Replica 0 takes the account's locks and waits for the provider...
        let first = tokio::spawn(log_in_and_out(cluster.replicas[0].imap_address(), "user0"));
        assert!(
            eventually(Duration::from_secs(10), || async {
                cluster.provider.held_requests() == 1
            })
            .await
        );
        // ...and dies there: its request is abandoned unanswered, nothing was rotated.
        let pid = cluster.replica(0).pid().unwrap();
        send_signal(pid, "KILL");
        let _ = first.await;
        assert!(
            eventually(Duration::from_secs(5), || async {
                cluster.provider.held_requests() == 0
            })
            .await
        );
        drop(hold);
        // Replica 1 waits out the dead holder's lease, then refreshes itself.
        let tagged = log_in_and_out(cluster.replicas[1].imap_address(), "user0").await;
        assert!(tagged.contains(" OK "), "{tagged}\n{}", cluster.output());
        let tagged = log_in_and_out(cluster.replicas[2].imap_address(), "user0").await;
        assert!(tagged.contains(" OK "), "{tagged}\n{}", cluster.output());
        let (_, granted) = cluster.refreshes();
        assert_eq!(granted, 1, "{}", cluster.output());
        assert_eq!(cluster.provider.reuses_detected(), 0);
        // The account's token survives: a restarted replica 0 logs in too.
        cluster.replicas[0].process = None;
        cluster.start_replica(0).await;
        let tagged = log_in_and_out(cluster.replicas[0].imap_address(), "user0").await;
        assert!(tagged.contains(" OK "), "{tagged}\n{}", cluster.output());
    })
    .await;
}

/// A token rotated while Redis was away stays with the replica that redeemed it, and so does
/// the account's lease, until Redis takes the token: no other replica redeems the one it
/// replaces meanwhile (which the provider would take for reuse, revoking the family).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_redis_missed_is_written_before_another_replica_redeems() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(2, 1, "").await;
        cluster.start_all().await;
        let hold = cluster.provider.hold_answers();
        let first = tokio::spawn(log_in_and_out(cluster.replicas[0].imap_address(), "user0"));
        assert!(
            eventually(Duration::from_secs(10), || async {
                cluster.provider.held_requests() == 1
            })
            .await
        );
        // The provider rotates the token while Redis is away: replica 0 cannot write it.
        cluster.redis.stop();
        drop(hold);
        let tagged = first.await.unwrap();
        assert!(tagged.contains(" OK "), "{tagged}\n{}", cluster.output());
        cluster.redis.run().await;

        // Replica 1 has no token of its own: it must get the rotated one.
        assert!(
            eventually(Duration::from_secs(40), || async {
                log_in_and_out(cluster.replicas[1].imap_address(), "user0")
                    .await
                    .contains(" OK ")
            })
            .await,
            "{}",
            cluster.output()
        );
        assert_eq!(
            cluster.provider.reuses_detected(),
            0,
            "{}",
            cluster.output()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logins_with_a_cached_token_outlive_a_redis_outage_and_the_rest_recover() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(3, 2, "").await;
        cluster.start_all().await;
        // user0's token is cached on replica 0; user1 has none anywhere.
        let tagged = log_in_and_out(cluster.replicas[0].imap_address(), "user0").await;
        assert!(tagged.contains(" OK "), "{tagged}");

        cluster.redis.stop();
        let cached = log_in_and_out(cluster.replicas[0].imap_address(), "user0").await;
        assert!(cached.contains(" OK "), "{cached}\n{}", cluster.output());
        let uncached = log_in_and_out(cluster.replicas[1].imap_address(), "user1").await;
        assert!(
            uncached.contains("NO [UNAVAILABLE]"),
            "{uncached}\n{}",
            cluster.output()
        );
        assert!(
            cluster
                .readyz(1)
                .await
                .contains("the shared Redis does not answer"),
            "{}",
            cluster.readyz(1).await
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        cluster.redis.run().await;

        assert!(
            eventually(Duration::from_secs(20), || async {
                log_in_and_out(cluster.replicas[1].imap_address(), "user1")
                    .await
                    .contains(" OK ")
            })
            .await,
            "{}",
            cluster.output()
        );
        for n in 0..3 {
            assert!(
                eventually(Duration::from_secs(20), || async {
                    cluster.readyz(n).await.ends_with(" 200")
                })
                .await,
                "{}",
                cluster.readyz(n).await
            );
        }
        assert_eq!(cluster.provider.reuses_detected(), 0);
        let text = cluster.metrics(1).await;
        assert!(
            metric(
                &text,
                "mailgate_redis_calls_total{op=\"token_claim\",result=\"unreachable\"}"
            ) + metric(
                &text,
                "mailgate_redis_calls_total{op=\"token_claim\",result=\"timeout\"}"
            ) >= 1.0,
            "{text}"
        );
    })
    .await;
}

/// How many replicas listen for the news.
async fn subscribers(redis: &support::redis::RedisServer) -> Option<u32> {
    redis
        .cli(&["PUBSUB", "NUMSUB", "mailgate:news:accounts"])
        .await
        .lines()
        .nth(1)
        .and_then(|count| count.trim().parse().ok())
}

/// A replica that found Redis down and then has nothing to ask it (no login needs it) still
/// finds out that it is back: it becomes ready again and hears the news again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_replica_recovers_readiness_and_news_after_a_redis_outage() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(2, 1, "").await;
        cluster.start_all().await;
        assert!(
            eventually(Duration::from_secs(10), || async {
                subscribers(&cluster.redis).await == Some(2)
            })
            .await
        );

        cluster.redis.stop();
        let uncached = log_in_and_out(cluster.replicas[1].imap_address(), "user0").await;
        assert!(uncached.contains("NO [UNAVAILABLE]"), "{uncached}");
        assert!(cluster.readyz(1).await.ends_with(" 503"));
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.redis.run().await;

        assert!(
            eventually(Duration::from_secs(20), || async {
                cluster.readyz(1).await.ends_with(" 200")
            })
            .await,
            "{}",
            cluster.readyz(1).await
        );
        assert!(
            eventually(Duration::from_secs(20), || async {
                subscribers(&cluster.redis).await == Some(2)
            })
            .await,
            "{:?}",
            subscribers(&cluster.redis).await
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_redis_costs_logins_no_more_than_its_deadline() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(3, 2, "").await;
        cluster.start_all().await;
        let tagged = log_in_and_out(cluster.replicas[0].imap_address(), "user0").await;
        assert!(tagged.contains(" OK "), "{tagged}");

        // Accepting connections, answering nothing: the worst a Redis can do.
        cluster.redis.freeze(true);
        let cached = tokio::time::timeout(
            Duration::from_secs(10),
            log_in_and_out(cluster.replicas[0].imap_address(), "user0"),
        )
        .await
        .expect("a cached login does not wait for Redis");
        assert!(cached.contains(" OK "), "{cached}");
        let uncached = tokio::time::timeout(
            Duration::from_secs(10),
            log_in_and_out(cluster.replicas[2].imap_address(), "user1"),
        )
        .await
        .expect("an uncached login fails within the deadline");
        assert!(uncached.contains("NO [UNAVAILABLE]"), "{uncached}");
        cluster.redis.freeze(false);
        assert!(
            eventually(Duration::from_secs(20), || async {
                log_in_and_out(cluster.replicas[2].imap_address(), "user1")
                    .await
                    .contains(" OK ")
            })
            .await,
            "{}",
            cluster.output()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_grant_on_one_replica_ends_the_accounts_sessions_on_all() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(3, 2, "").await;
        cluster.start_all().await;
        let mut sessions = Vec::new();
        for n in 0..3 {
            let mut client = ImapClient::connect(cluster.replicas[n].imap_address()).await;
            let login = client.login("user0", "any-password").await;
            assert!(login.is_ok(), "{login:?}");
            sessions.push(client);
        }
        let mut other = ImapClient::connect(cluster.replicas[1].imap_address()).await;
        assert!(other.login("user1", "any-password").await.is_ok());

        // user0's grant family is revoked, its access token too. Replicas 1 and 2 hold that
        // token for an hour; replica 0 finds out at the next login and must tell them.
        assert!(cluster.provider.revoke_family(&cluster.onboarded[0]));
        let refused = log_in_and_out(cluster.replicas[0].imap_address(), "user0").await;
        assert!(
            refused.contains("NO [AUTHENTICATIONFAILED]"),
            "{refused}\n{}",
            cluster.output()
        );
        for (n, session) in sessions.iter_mut().enumerate() {
            let bye = tokio::time::timeout(Duration::from_secs(8), session.line())
                .await
                .unwrap_or_else(|_| panic!("replica {n} kept the session\n{}", cluster.output()));
            assert_eq!(
                bye, "* BYE Access to this account was revoked; log in again\r\n",
                "replica {n}"
            );
        }
        assert!(
            other.command("NOOP").await.is_ok(),
            "user1's session goes on"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_authorization_replaces_every_replicas_cached_token() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(3, 1, "").await;
        cluster.start_all().await;
        for n in 0..3 {
            let tagged = log_in_and_out(cluster.replicas[n].imap_address(), "user0").await;
            assert!(tagged.contains(" OK "), "{tagged}");
        }
        assert_eq!(cluster.refreshes(), (1, 1));
        let rotated = cluster
            .provider
            .current_refresh_token(ALICE, CLIENT)
            .unwrap();

        // The user consents again (device flow) while the replicas hold the old token.
        cluster.provider.set_device_interval(1);
        let mut authorize = Mailgate::spawn(
            &cluster.config(0),
            &["authorize", "--account", "user0", "--device"],
            &[],
        );
        assert!(
            eventually(Duration::from_secs(10), || async {
                !cluster.provider.pending_user_codes().is_empty()
            })
            .await
        );
        let code = cluster.provider.pending_user_codes().pop().unwrap();
        assert!(cluster.provider.approve_device(&code, ALICE));
        assert_eq!(
            authorize.wait_exit(Duration::from_secs(30)).await,
            Some(0),
            "{}",
            authorize.output()
        );

        // Every replica dropped the old token: the next logins redeem the new grant, once.
        for n in [1, 2, 0] {
            assert!(
                eventually(Duration::from_secs(10), || async {
                    log_in_and_out(cluster.replicas[n].imap_address(), "user0")
                        .await
                        .contains(" OK ")
                })
                .await,
                "{}",
                cluster.output()
            );
        }
        let redeemed: Vec<_> = cluster
            .provider
            .token_requests()
            .into_iter()
            .filter(|r| r.grant_type == "refresh_token")
            .filter_map(|r| r.refresh_token)
            .collect();
        assert_eq!(redeemed.len(), 2, "{redeemed:?}\n{}", cluster.output());
        assert!(
            redeemed[1] != rotated && redeemed[1] != cluster.onboarded[0],
            "the new grant's token was redeemed, not the old one's"
        );
    })
    .await;
}
