//! The throttle shared by replicas (`tokens.shared`): three mailgate processes on one Redis,
//! one auth server checking passwords and one Dovecot count a guesser's failures into one
//! budget, and remember their owners' addresses across a rollout.

mod support;

use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;

use support::imap_client::{Completion, ImapClient};
use support::redis::RedisServer;
use support::{Mailgate, TEST_TIMEOUT, TestUpstream, free_port, with_timeout};

/// (login, account, mailbox, password) of the auth server's users.
const ALICE: (&str, &str, &str, &str) = (
    "alice",
    "acct-alice",
    "alice@example.test",
    "alice-right-4e1",
);
const BOB: (&str, &str, &str, &str) = ("bob", "acct-bob", "bob@example.test", "bob-right-0c9");
/// The address a guesser shares with Alice (an office NAT): 127.0.0.2.
const NAT: u8 = 2;
const BUDGET: usize = 10;

/// One replica's configuration: the test upstream, passwords checked by its auth server, the
/// throttle with short waits and an address budget of [`BUDGET`], shared through `redis`.
fn replica_config(up: &TestUpstream, redis: &RedisServer) -> String {
    format!(
        "{}  shared:\n    redis: {{ url: \"{}\" }}\n    key_env: MAILGATE_SHARED_KEY\nclient_auth:\n  mode: auth_server\n  auth_server: {{ url: \"{}\" }}\n  throttle: {{ failure_delay: 10ms, max_failure_delay: 50ms, block_address_after: {BUDGET} }}\n",
        up.mailgate_config(free_port(), free_port()),
        redis.url(),
        up.auth.check_url(),
    )
}

/// Three replicas on `redis`, sharing one key; each with its IMAP address.
async fn replicas(up: &TestUpstream, redis: &RedisServer) -> Vec<(Mailgate, SocketAddr)> {
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let mut started = Vec::new();
    for _ in 0..3 {
        let config = replica_config(up, redis);
        let mailgate = Mailgate::start_with_env(&config, &[("MAILGATE_SHARED_KEY", &key)]).await;
        let imap = mailgate.listen_addrs()[0];
        started.push((mailgate, imap));
    }
    started
}

/// One IMAP login on a new connection from 127.0.0.`host`.
async fn login_from(imap: SocketAddr, host: u8, login: &str, password: &str) -> Completion {
    let mut client = ImapClient::connect_from(imap, IpAddr::from([127, 0, 0, host])).await;
    client.login(login, password).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_wrong_passwords_over_three_replicas_meet_one_budget() {
    with_timeout(TEST_TIMEOUT * 2, async {
        let up = TestUpstream::start().await;
        let redis = RedisServer::start().await;
        for (login, account, mailbox, password) in [ALICE, BOB] {
            up.auth.add_password(login, password, Some(account));
            up.auth.grant(account, mailbox);
        }
        let replicas = replicas(&up, &redis).await;
        let alice = login_from(replicas[0].1, NAT, ALICE.0, ALICE.3).await;
        assert!(alice.is_ok(), "{alice:?}\n{}", replicas[0].0.output());

        let mut refused = Vec::new();
        for guess in 0..30 {
            let (_, imap) = &replicas[guess % 3];
            let answer = login_from(*imap, NAT, BOB.0, &format!("guess-{guess}")).await;
            refused.push(answer.tagged);
        }
        let checked = refused
            .iter()
            .filter(|answer| answer.contains("NO [AUTHENTICATIONFAILED]"))
            .count();
        let blocked = refused
            .iter()
            .filter(|answer| answer.contains("NO [UNAVAILABLE]"))
            .count();
        assert_eq!((checked, blocked), (BUDGET, 30 - BUDGET), "{refused:#?}");
        let guesses_checked = up
            .auth
            .password_checks()
            .iter()
            .filter(|check| check.user.as_deref() == Some(BOB.0))
            .count();
        assert_eq!(guesses_checked, BUDGET);

        // Every replica refuses Bob's address, spares Alice's device behind it, and lets Bob
        // in from elsewhere.
        for (n, (mailgate, imap)) in replicas.iter().enumerate() {
            let bob = login_from(*imap, NAT, BOB.0, BOB.3).await;
            assert!(bob.tagged.contains("NO [UNAVAILABLE]"), "{bob:?}");
            let alice = login_from(*imap, NAT, ALICE.0, ALICE.3).await;
            assert!(
                alice.is_ok(),
                "replica {n}: {alice:?}\n{}",
                mailgate.output()
            );
            let bob = login_from(*imap, 3 + n as u8, BOB.0, BOB.3).await;
            assert!(bob.is_ok(), "replica {n}: {bob:?}\n{}", mailgate.output());
        }

        // A rollout: every replica replaced. The block and Alice's address are remembered.
        for (mut mailgate, _) in replicas {
            mailgate.assert_no_secret_logged();
            mailgate.stop();
        }
        let replicas = self::replicas(&up, &redis).await;
        let (mailgate, imap) = &replicas[1];
        let alice = login_from(*imap, NAT, ALICE.0, ALICE.3).await;
        assert!(alice.is_ok(), "{alice:?}\n{}", mailgate.output());
        let bob = login_from(*imap, NAT, BOB.0, BOB.3).await;
        assert!(bob.tagged.contains("NO [UNAVAILABLE]"), "{bob:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_replica_throttles_on_its_own_and_known_logins_go_on() {
    with_timeout(TEST_TIMEOUT * 2, async {
        let up = TestUpstream::start().await;
        let mut redis = RedisServer::start().await;
        for (login, account, mailbox, password) in [ALICE, BOB] {
            up.auth.add_password(login, password, Some(account));
            up.auth.grant(account, mailbox);
        }
        let replicas = replicas(&up, &redis).await;
        let (mailgate, imap) = &replicas[0];
        let alice = login_from(*imap, NAT, ALICE.0, ALICE.3).await;
        assert!(alice.is_ok(), "{alice:?}\n{}", mailgate.output());
        redis.kill();

        let mut refused = Vec::new();
        for guess in 0..=BUDGET {
            let answer = login_from(*imap, NAT, BOB.0, &format!("guess-{guess}")).await;
            refused.push(answer.tagged);
        }
        assert!(
            refused[..BUDGET]
                .iter()
                .all(|answer| answer.contains("NO [AUTHENTICATIONFAILED]")),
            "{refused:#?}"
        );
        assert!(refused[BUDGET].contains("NO [UNAVAILABLE]"), "{refused:#?}");
        let alice = login_from(*imap, NAT, ALICE.0, ALICE.3).await;
        assert!(alice.is_ok(), "{alice:?}\n{}", mailgate.output());

        // Redis back, empty: the replica keeps the block it counted on its own.
        redis.run().await;
        let bob = login_from(*imap, NAT, BOB.0, BOB.3).await;
        assert!(bob.tagged.contains("NO [UNAVAILABLE]"), "{bob:?}");
        let alice = login_from(*imap, NAT, ALICE.0, ALICE.3).await;
        assert!(alice.is_ok(), "{alice:?}\n{}", mailgate.output());
        mailgate.assert_no_secret_logged();
    })
    .await;
}
