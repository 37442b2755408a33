//! The backends' state across replicas, in the replicas' Redis (`tokens.shared`): each
//! account's server (an assignment that lives while some replica has a session of it open),
//! the operator's drains and moves, and news so that the other replicas apply a kick, a move
//! or a drain at once (each also reads drains and moves again every [`SYNC_EVERY`], since
//! news can be missed). docs/backends.md, "Across replicas", says what this guarantees.
//!
//! Redis is a help, never a condition: a login routes on what this replica knows when Redis
//! does not answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::Backends;
use crate::replicas::news::{self, News};
use crate::replicas::{Redis, SharedError, millis};

/// How long an account's server is remembered after the last replica's last session of it
/// ends: a replica renews it every third of this while it has one open.
pub const ASSIGNMENT_TTL: Duration = Duration::from_secs(60);
/// How often drains and moves are read again, for news a replica missed.
const SYNC_EVERY: Duration = Duration::from_secs(5);
/// Assignments renewed by one script at most (keeps each call short for Redis).
const RENEW_BATCH: usize = 500;

/// Sets each `KEYS[i]` that is missing to `ARGV[i + 1]`, renews it if it names that
/// server already; returns what each names now.
const RENEW_SCRIPT: &str = r"
local found = {}
for i, key in ipairs(KEYS) do
  local server = ARGV[i + 1]
  local current = redis.call('GET', key)
  if not current then
    redis.call('SET', key, server, 'PX', ARGV[1])
    current = server
  elseif current == server then
    redis.call('PEXPIRE', key, ARGV[1])
  end
  found[i] = current
end
return found
";

/// A drain as Redis keeps it (a hash of server name to this, as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedDrain {
    /// When it began, in milliseconds since the Unix epoch.
    pub since_ms: u64,
    pub grace_ms: u64,
}

impl SharedDrain {
    pub fn new(since: SystemTime, grace: Duration) -> Self {
        let since = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            since_ms: millis(since),
            grace_ms: millis(grace),
        }
    }

    pub fn since(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_millis(self.since_ms))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// When its grace is over; `None` past what the clock can count (another writer's).
    pub fn end(&self) -> Option<SystemTime> {
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_millis(self.since_ms))?
            .checked_add(self.grace())
    }

    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }
}

/// The backends' keys in the replicas' Redis.
pub struct SharedState {
    redis: Arc<Redis>,
    renew: redis::Script,
}

impl SharedState {
    pub fn new(redis: Arc<Redis>) -> Self {
        Self {
            redis,
            renew: redis::Script::new(RENEW_SCRIPT),
        }
    }

    pub fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    fn assignment(&self, account: &str) -> String {
        self.redis.key("backend-account", account)
    }

    fn drains_key(&self) -> String {
        self.redis.key("backends", "drains")
    }

    fn moves_key(&self) -> String {
        self.redis.key("backends", "moves")
    }

    /// The server another replica (or this one) assigned `account` to; `None` when there is
    /// none or Redis does not answer (then it is not waited for).
    pub async fn assigned(&self, account: &str) -> Option<String> {
        if !self.redis.is_up() {
            return None;
        }
        let get = redis::cmd("GET").arg(self.assignment(account)).clone();
        self.redis
            .run::<Option<String>>("backend_assigned", &get)
            .await
            .ok()
            .flatten()
    }

    /// Assigns `account` to `server` unless another server has it (renewing it if it is
    /// this one); with `overwrite`, whatever had it. Returns the server that has it now;
    /// `None` when Redis does not answer.
    pub async fn claim(&self, account: &str, server: &str, overwrite: bool) -> Option<String> {
        if !self.redis.is_up() {
            return None;
        }
        if overwrite {
            let set = redis::cmd("SET")
                .arg(self.assignment(account))
                .arg(server)
                .arg("PX")
                .arg(millis(ASSIGNMENT_TTL))
                .clone();
            self.redis.run::<()>("backend_assign", &set).await.ok()?;
            return Some(server.to_owned());
        }
        self.renew(&[(account.to_owned(), server.to_owned())])
            .await
            .and_then(|mut found| found.pop())
    }

    /// Renews the assignment of each (account, server) pair, or makes it where there is
    /// none; returns what each account is assigned to now, in order.
    pub async fn renew(&self, pairs: &[(String, String)]) -> Option<Vec<String>> {
        let mut found = Vec::with_capacity(pairs.len());
        for batch in pairs.chunks(RENEW_BATCH) {
            let mut invocation = self.renew.prepare_invoke();
            invocation.arg(millis(ASSIGNMENT_TTL));
            for (account, server) in batch {
                invocation.key(self.assignment(account)).arg(server);
            }
            let answered: Vec<String> = self.redis.eval("backend_renew", &invocation).await.ok()?;
            found.extend(answered);
        }
        Some(found)
    }

    /// Every drain in force.
    ///
    /// # Errors
    /// Redis does not answer.
    pub async fn drains(&self) -> Result<HashMap<String, SharedDrain>, SharedError> {
        let all = redis::cmd("HGETALL").arg(self.drains_key()).clone();
        let found: HashMap<String, String> = self.redis.run("backend_drains", &all).await?;
        Ok(found
            .into_iter()
            .filter_map(|(server, drain)| Some((server, serde_json::from_str(&drain).ok()?)))
            .collect())
    }

    /// Keeps `server`'s drain (`None`: its undrain) and tells the other replicas.
    ///
    /// # Errors
    /// Redis does not answer.
    pub async fn set_drain(
        &self,
        server: &str,
        drain: Option<SharedDrain>,
    ) -> Result<(), SharedError> {
        let command = match drain {
            Some(drain) => redis::cmd("HSET")
                .arg(self.drains_key())
                .arg(server)
                .arg(serde_json::to_string(&drain).unwrap_or_default())
                .clone(),
            None => redis::cmd("HDEL")
                .arg(self.drains_key())
                .arg(server)
                .clone(),
        };
        self.redis.run::<()>("backend_drain", &command).await?;
        news::publish(&self.redis, &News::Drains(server.to_owned())).await;
        Ok(())
    }

    /// Every move in force, by account key.
    ///
    /// # Errors
    /// Redis does not answer.
    pub async fn moves(&self) -> Result<BTreeMap<String, String>, SharedError> {
        let all = redis::cmd("HGETALL").arg(self.moves_key()).clone();
        self.redis.run("backend_moves", &all).await
    }

    /// Where `account` was moved, if it was.
    ///
    /// # Errors
    /// Redis does not answer.
    pub async fn moved(&self, account: &str) -> Result<Option<String>, SharedError> {
        let get = redis::cmd("HGET")
            .arg(self.moves_key())
            .arg(account)
            .clone();
        self.redis.run("backend_moves", &get).await
    }

    /// Keeps `account`'s move to `server`, assigns it there, and tells the other replicas.
    ///
    /// # Errors
    /// Redis does not answer.
    pub async fn set_move(&self, account: &str, server: &str) -> Result<(), SharedError> {
        let set = redis::cmd("HSET")
            .arg(self.moves_key())
            .arg(account)
            .arg(server)
            .clone();
        self.redis.run::<()>("backend_move", &set).await?;
        self.claim(account, server, true).await;
        news::publish(&self.redis, &News::Moved(account.to_owned())).await;
        Ok(())
    }

    /// Tells the other replicas to end `account`'s sessions.
    pub async fn kick(&self, account: &str) {
        news::publish(&self.redis, &News::Kicked(account.to_owned())).await;
    }
}

impl Backends {
    /// Shares assignments, drains and moves with the other replicas through `redis`
    /// (`None`: no longer); called at start and on reload, a no-op when it is the same Redis.
    pub fn shared_through(self: &Arc<Self>, redis: Option<&Arc<Redis>>) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let same = match (&*shared, redis) {
            (Some(current), Some(redis)) => Arc::ptr_eq(current.redis(), redis),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        *shared = redis.map(|redis| Arc::new(SharedState::new(redis.clone())));
        let Some(state) = shared.clone() else {
            return;
        };
        drop(shared);
        self.follow_the_news(&state);
        tokio::spawn(keep_in_step(Arc::downgrade(self), Arc::downgrade(&state)));
    }

    /// The shared state, when there is one.
    pub(super) fn shared(&self) -> Option<Arc<SharedState>> {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `state` is still the one in use (a reload may have replaced it).
    fn shares(&self, state: &Arc<SharedState>) -> bool {
        self.shared()
            .is_some_and(|current| Arc::ptr_eq(&current, state))
    }

    /// Acts on the other replicas' kicks, moves and drains.
    fn follow_the_news(self: &Arc<Self>, state: &Arc<SharedState>) {
        let (backends, shared) = (Arc::downgrade(self), Arc::downgrade(state));
        news::listen(state.redis(), move |news| {
            let (Some(backends), Some(state)) = (backends.upgrade(), shared.upgrade()) else {
                return false;
            };
            if !backends.shares(&state) {
                return false;
            }
            match news.clone() {
                News::Kicked(account) => {
                    backends.end_sessions(&account);
                }
                News::Moved(account) => {
                    tokio::spawn(async move {
                        if let Ok(server) = state.moved(&account).await {
                            backends.apply_move(&account, server.as_deref());
                        }
                    });
                }
                News::Drains(_) => {
                    tokio::spawn(async move { backends.sync_drains(&state).await });
                }
                News::Revoked(_) | News::Replaced(_) | News::Known(_) => {}
            }
            true
        });
    }

    /// Makes the drains Redis keeps this replica's.
    async fn sync_drains(self: &Arc<Self>, state: &SharedState) {
        if let Ok(drains) = state.drains().await {
            self.apply_drains(&drains);
        }
    }

    /// Makes the moves Redis keeps this replica's.
    async fn sync_moves(&self, state: &SharedState) {
        if let Ok(moves) = state.moves().await {
            self.lock().moves = moves;
        }
    }

    /// Renews the assignment of every account with a session open here; an account another
    /// replica assigned elsewhere (to a server this one can use) has its sessions here ended,
    /// so that it converges on one server.
    async fn renew_assignments(&self, state: &SharedState) {
        let pairs = self.open_servers();
        let Some(found) = state.renew(&pairs).await else {
            return;
        };
        for ((account, server), assigned) in pairs.iter().zip(found) {
            if assigned != *server && self.can_take(account, &assigned) {
                tracing::info!(from = %server, to = %assigned,
                    "another replica assigned the account elsewhere: ending its sessions here");
                self.end_sessions_off(account, &assigned);
            }
        }
    }
}

/// Reads drains and moves every [`SYNC_EVERY`] and renews assignments every third of
/// [`ASSIGNMENT_TTL`], until the backends are dropped or share another state.
async fn keep_in_step(backends: Weak<Backends>, state: Weak<SharedState>) {
    let mut sync = tokio::time::interval(SYNC_EVERY);
    let mut renew = tokio::time::interval(ASSIGNMENT_TTL / 3);
    for ticks in [&mut sync, &mut renew] {
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        let renewing = tokio::select! {
            _ = sync.tick() => false,
            _ = renew.tick() => true,
        };
        let (Some(backends), Some(state)) = (backends.upgrade(), state.upgrade()) else {
            return;
        };
        if !backends.shares(&state) {
            return;
        }
        if renewing {
            backends.renew_assignments(&state).await;
        } else {
            backends.sync_drains(&state).await;
            backends.sync_moves(&state).await;
        }
    }
}

#[cfg(test)]
mod tests;
