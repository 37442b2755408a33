//! The throttle's counts as the replicas share them: failures per account, address and
//! network are counters living the failure window after their last failure; a wrong password
//! counted is a key named by its proof (so a retry on another replica counts once); an
//! (account, address) pair that logged in is a key living as long as the throttle remembers
//! it. Every name is a keyed hash under a key derived from the sealing key, so Redis holds
//! no account id, address or password, nor anything to test guesses against.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use ring::hmac;

use crate::replicas::news::{self, News};
use crate::replicas::{Redis, SharedError, millis};
use crate::token::Proof;

/// Label of the key that names the throttle's keys in Redis.
const NAMES_LABEL: &str = "throttle names";
/// Hash bytes kept in a name: 128 bits, no collisions in practice.
const NAME_BYTES: usize = 16;
/// Pairs known from the other replicas' news, at most (the least recently seen go first).
const MAX_KNOWN_NAMES: u64 = 100_000;

/// Counts a wrong password unless its proof `KEYS[1]` was counted within the window
/// (`ARGV[1]` ms; a retry keeps it that much longer): adds one to each counter `KEYS[2..]`,
/// each then living the window, and answers their counts; answers nothing if counted before.
static FAIL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return {}
end
local counts = {}
for i = 2, #KEYS do
  counts[i - 1] = redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return counts",
    )
});

/// Each key's value as a number (0 when absent) and its remaining milliseconds.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local seen = {}
for i, key in ipairs(KEYS) do
  seen[i] = {tonumber(redis.call('GET', key) or '0'), redis.call('PTTL', key)}
end
return seen",
    )
});

/// A counter as Redis holds it: its failures, and how much longer it lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    pub failures: u32,
    pub lives: Duration,
}

/// A login's counters; those of the address and network are zero without an address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub account: Seen,
    pub address: Seen,
    pub network: Seen,
}

/// What Redis holds about a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub counts: Counts,
    /// How much longer Redis remembers that the address logged in to the account, if it does.
    pub known: Option<Duration>,
}

/// One login's keys in Redis.
pub struct Subject {
    account: String,
    address: Option<AddressKeys>,
}

struct AddressKeys {
    count: String,
    network: String,
    /// The (account, address) pair.
    known: String,
}

impl Subject {
    /// The counters, in the order of [`Counts`]' fields.
    fn counters(&self) -> Vec<&str> {
        let mut keys = vec![self.account.as_str()];
        if let Some(address) = &self.address {
            keys.extend([address.count.as_str(), address.network.as_str()]);
        }
        keys
    }
}

pub struct SharedFailures {
    redis: Arc<Redis>,
    names: hmac::Key,
    /// How long a counter lives after its last failure, and a counted proof after its last try.
    window: Duration,
    /// How long a pair that logged in is remembered.
    known_for: Duration,
    /// Pairs that logged in, by name, as this replica wrote them, read them, or heard of them
    /// from the others: no need to ask Redis about them before a login.
    known: moka::sync::Cache<String, ()>,
}

impl SharedFailures {
    /// # Errors
    /// No key could be derived for the names.
    pub fn new(redis: Arc<Redis>, window: Duration, known_for: Duration) -> Result<Self, String> {
        let known = moka::sync::Cache::builder()
            .max_capacity(MAX_KNOWN_NAMES)
            .time_to_live(known_for)
            .build();
        let heard = known.clone();
        news::listen(&redis, move |news| {
            if let News::Known(name) = news {
                heard.insert(name.clone(), ());
            }
            true
        });
        Ok(Self {
            names: redis.derived_key(NAMES_LABEL)?,
            redis,
            window,
            known_for,
            known,
        })
    }

    /// Whether `subject`'s pair logged in before, as far as this replica has heard.
    pub fn knows(&self, subject: &Subject) -> bool {
        subject
            .address
            .as_ref()
            .is_some_and(|address| self.known.contains_key(&address.known))
    }

    /// The keys of a login of `account` (folded as the throttle counts it) from `address`
    /// (the bytes of its address group and of its network).
    pub fn subject(&self, account: &str, address: Option<(&[u8], &[u8])>) -> Subject {
        let account_bytes = account.as_bytes();
        Subject {
            account: self.name("account", &[account_bytes]),
            address: address.map(|(address, network)| AddressKeys {
                count: self.name("address", &[address]),
                network: self.name("network", &[network]),
                known: self.name("known", &[account_bytes, address]),
            }),
        }
    }

    /// The counters of `subject` and whether its pair logged in before: one round trip.
    ///
    /// # Errors
    /// Redis failed or did not answer in time.
    pub async fn read(&self, subject: &Subject) -> Result<Reading, SharedError> {
        let mut keys = subject.counters();
        if let Some(address) = &subject.address {
            keys.push(&address.known);
        }
        let mut call = READ.prepare_invoke();
        for key in keys {
            call.key(key);
        }
        let seen: Vec<(u32, i64)> = self.redis.eval("throttle_check", &call).await?;
        let mut seen = seen.into_iter().map(|(failures, millis)| Seen {
            failures,
            lives: Duration::from_millis(u64::try_from(millis).unwrap_or(0)),
        });
        let counts = counts(&mut seen);
        let known = seen
            .next()
            .filter(|pair| pair.failures > 0)
            .map(|pair| pair.lives);
        if let (Some(_), Some(address)) = (known, &subject.address) {
            self.known.insert(address.known.clone(), ());
        }
        Ok(Reading { counts, known })
    }

    /// Counts the wrong password `proof` stands for against `subject`, unless a replica
    /// counted it within the window; the counts after it.
    ///
    /// # Errors
    /// Redis failed or did not answer in time.
    pub async fn fail(
        &self,
        proof: &Proof,
        subject: &Subject,
    ) -> Result<Option<Counts>, SharedError> {
        let mut call = FAIL.key(self.name("counted", &[&proof.0]));
        for key in subject.counters() {
            call.key(key);
        }
        call.arg(millis(self.window));
        let after: Vec<u32> = self.redis.eval("throttle_fail", &call).await?;
        if after.is_empty() {
            return Ok(None);
        }
        let mut seen = after.into_iter().map(|failures| Seen {
            failures,
            lives: self.window,
        });
        Ok(Some(counts(&mut seen)))
    }

    /// Remembers that `subject`'s address logged in to its account, and tells the other
    /// replicas (so that their first login of the pair need not ask Redis).
    ///
    /// # Errors
    /// Redis failed or did not answer in time.
    pub async fn remember(&self, subject: &Subject) -> Result<(), SharedError> {
        let Some(address) = &subject.address else {
            return Ok(());
        };
        let mut command = redis::cmd("SET");
        command
            .arg(&address.known)
            .arg("1")
            .arg("PX")
            .arg(millis(self.known_for));
        self.redis.run::<()>("known_pair", &command).await?;
        self.known.insert(address.known.clone(), ());
        news::publish(&self.redis, &News::Known(address.known.clone())).await;
        Ok(())
    }

    /// The Redis key of `identity` in `space` (each part length-prefixed, so that no two
    /// differ only in where one part ends).
    fn name(&self, space: &str, identity: &[&[u8]]) -> String {
        let mut context = hmac::Context::with_key(&self.names);
        for part in std::iter::once(space.as_bytes()).chain(identity.iter().copied()) {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        let hash: String = context.sign().as_ref()[..NAME_BYTES]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        self.redis.key("throttle", &format!("{space}:{hash}"))
    }
}

/// The counters' values in `seen`, in the order [`Subject::counters`] gave them.
fn counts(seen: &mut impl Iterator<Item = Seen>) -> Counts {
    Counts {
        account: seen.next().unwrap_or_default(),
        address: seen.next().unwrap_or_default(),
        network: seen.next().unwrap_or_default(),
    }
}
