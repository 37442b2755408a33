//! `mailgate store migrate --to redis|file`: copies every refresh-token record between the
//! token store's directory and Redis, one line per account, never a token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, relative, shared_state};
use crate::config::{Config, Grant, OAuth2Config};
use crate::metrics::Metrics;
use crate::replicas::Redis;
use crate::sanitize;
use crate::secret::Secret;
use crate::token::oauth2::lease_wait;
use crate::token::oauth2::provider::unix_now;
use crate::token::oauth2::store::file::FileStore;
use crate::token::oauth2::store::migrate::{Conflict, Migration, MoveError, Outcome};
use crate::token::oauth2::store::redis::RedisStore;
use crate::token::oauth2::store::{StoreError, Stored, TokenStore};
use crate::token::shared::account_replaced;

/// Where the records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `tokens.oauth2.store.dir`.
    File,
    /// `tokens.shared.redis`.
    Redis,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::File => "the file store",
            Backend::Redis => "Redis",
        }
    }

    fn other(self) -> Backend {
        match self {
            Backend::File => Backend::Redis,
            Backend::Redis => Backend::File,
        }
    }

    /// The name with the directory, for the file store.
    fn place(self, dir: &Path) -> String {
        match self {
            Backend::File => format!("the file store ({})", dir.display()),
            Backend::Redis => "Redis".to_owned(),
        }
    }
}

/// What to do beyond copying into empty places.
#[derive(Debug, Clone, Copy)]
pub struct Choices {
    pub overwrite: bool,
    pub dry_run: bool,
}

/// `mailgate store migrate --to BACKEND [--overwrite] [--dry-run]`: exit 0 when every
/// `refresh_token` account is at the destination (or has no record to move).
pub async fn migrate(config: &Config, to: Backend, choices: Choices) -> u8 {
    let opened = match Opened::new(config, to, choices) {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let from = to.other();
    let accounts = refresh_token_accounts(config);
    println!(
        "{} the refresh tokens of {} account{} from {} to {}; the source is left as it is.",
        if choices.dry_run {
            "Dry run, nothing is written: would copy"
        } else {
            "Copying"
        },
        accounts.len(),
        if accounts.len() == 1 { "" } else { "s" },
        from.place(&opened.dir),
        to.place(&opened.dir),
    );
    let mut done = 0;
    for account in &accounts {
        let outcome = opened.migration.account(account).await;
        println!("{account}: {}", describe(&outcome, to, choices.dry_run));
        if outcome.as_ref().is_ok_and(Outcome::is_done) {
            done += 1;
        }
        if to == Backend::Redis && !choices.dry_run && matches!(outcome, Ok(Outcome::Moved { .. }))
        {
            // Replicas already on Redis drop what they cached for the account.
            account_replaced(&opened.redis, account).await;
        }
    }
    if from == Backend::File {
        report_others(&opened.file, &accounts).await;
    }
    summary(done, accounts.len(), to, choices.dry_run)
}

/// Both stores, as the configuration names them.
struct Opened {
    migration: Migration,
    file: FileStore,
    dir: PathBuf,
    redis: Arc<Redis>,
}

impl Opened {
    /// # Errors
    /// The exit code, after saying why: a store is not configured (or the source directory
    /// does not exist), or cannot be set up.
    fn new(config: &Config, to: Backend, choices: Choices) -> Result<Self, u8> {
        let (oauth2, dir, key) = file_store_settings(config).map_err(|reason| {
            eprintln!("store migrate needs both stores in the configuration: {reason}");
            EXIT_USAGE
        })?;
        let redis = shared_state(config, &Arc::new(Metrics::new()))?.ok_or_else(|| {
            eprintln!(
                "store migrate needs both stores in the configuration: tokens.shared.redis is not set"
            );
            EXIT_USAGE
        })?;
        if to == Backend::Redis && !dir.is_dir() {
            eprintln!(
                "tokens.oauth2.store.dir {} does not exist: there is nothing to migrate",
                dir.display()
            );
            return Err(EXIT_USAGE);
        }
        // The destination directory is created only when something is written to it.
        let file = if to == Backend::File && !choices.dry_run {
            FileStore::open(dir, key)
        } else {
            FileStore::at(dir, key)
        }
        .map_err(|error| {
            eprintln!("cannot open the token store: {error}");
            EXIT_FAILED
        })?;
        let file_store: Arc<dyn TokenStore> = Arc::new(file.clone());
        let redis_store =
            RedisStore::new(redis.clone(), key, lease_wait(oauth2)).map_err(|error| {
                eprintln!("cannot open the token store in Redis: {error}");
                EXIT_FAILED
            })?;
        let redis_store: Arc<dyn TokenStore> = Arc::new(redis_store);
        let (from, to) = match to {
            Backend::Redis => (file_store, redis_store),
            Backend::File => (redis_store, file_store),
        };
        Ok(Self {
            migration: Migration {
                from,
                to,
                overwrite: choices.overwrite,
                dry_run: choices.dry_run,
                lease_wait: lease_wait(oauth2),
            },
            file,
            dir: dir.to_owned(),
            redis,
        })
    }
}

/// The OAuth2 settings, the file store's directory and the key both stores seal with.
fn file_store_settings(
    config: &Config,
) -> Result<(&OAuth2Config, &Path, &Secret<Vec<u8>>), &'static str> {
    let oauth2 = config
        .tokens
        .oauth2
        .as_ref()
        .ok_or("tokens.oauth2 is not set")?;
    let store = oauth2
        .store
        .as_ref()
        .ok_or("tokens.oauth2.store is not set")?;
    let dir = store
        .dir
        .as_deref()
        .ok_or("tokens.oauth2.store.dir is not set")?;
    let key = store
        .key
        .as_ref()
        .ok_or("tokens.oauth2.store has no key (key_file or key_env)")?;
    Ok((oauth2, dir, key))
}

/// The configuration is the list: every `refresh_token` account, sorted.
fn refresh_token_accounts(config: &Config) -> Vec<String> {
    config
        .tokens
        .oauth2
        .iter()
        .flat_map(|oauth2| &oauth2.accounts)
        .filter(|(_, account)| account.grant == Grant::RefreshToken)
        .map(|(id, _)| id.clone())
        .collect()
}

fn describe(outcome: &Result<Outcome, MoveError>, to: Backend, dry_run: bool) -> String {
    let (moved, replaced) = if dry_run {
        ("would be moved", "would be moved, replacing")
    } else {
        ("moved", "moved, replacing")
    };
    match outcome {
        Ok(Outcome::Moved { replaced: false }) => moved.to_owned(),
        Ok(Outcome::Moved { replaced: true }) => {
            format!("{replaced} the different record {} held", to.name())
        }
        Ok(Outcome::AlreadyThere) => "already there".to_owned(),
        Ok(Outcome::NothingToMove) => "nothing to move (no record in the source)".to_owned(),
        Ok(Outcome::Conflict(Conflict::Differs {
            source,
            destination,
        })) => format!(
            "conflict: {} holds another record ({}; the source's: {}); left as it is (--overwrite replaces it)",
            to.name(),
            state(destination),
            state(source)
        ),
        Ok(Outcome::Conflict(Conflict::Unreadable(error))) => format!(
            "conflict: the record {} holds cannot be read ({error}); left as it is (--overwrite replaces it)",
            to.name()
        ),
        Err(MoveError::Source(error @ (StoreError::Undecryptable | StoreError::Corrupt))) => {
            format!("unreadable: {error}")
        }
        Err(error) => format!("not moved: {error}"),
    }
}

/// What a record says of its token, times as `accounts` says them: enough to tell which of
/// two records is in use.
fn state(record: &Stored) -> String {
    match (&record.refresh_token, record.refreshed_at) {
        (None, _) => "needs re-authorization".to_owned(),
        (Some(_), Some(at)) => format!("redeemed {}", relative(at, unix_now())),
        (Some(_), None) => "never redeemed".to_owned(),
    }
}

/// Records in the directory that no configured account has: neither moved nor counted.
async fn report_others(file: &FileStore, accounts: &[String]) {
    match file.others(accounts).await {
        Ok(others) => {
            for name in others {
                println!(
                    "{}: the record of no refresh_token account in tokens.oauth2.accounts; skipped",
                    sanitize::for_log(&name)
                );
            }
        }
        Err(error) => eprintln!("cannot list the token store's directory: {error}"),
    }
}

fn summary(done: usize, total: usize, to: Backend, dry_run: bool) -> u8 {
    let failed = total - done;
    if failed > 0 {
        println!(
            "{failed} of {total} account{} not {}: see above.",
            if total == 1 { "" } else { "s" },
            if dry_run { "movable" } else { "moved" }
        );
        return EXIT_FAILED;
    }
    if dry_run {
        println!("Every account can be moved to {}.", to.name());
    } else {
        println!(
            "Every account is in {}. Point every mailgate at it; remove the source once none uses it.",
            to.name()
        );
    }
    EXIT_OK
}
