//! The local token store: one file per account, XChaCha20-Poly1305 with the account id as
//! associated data (a file copied to another account's name does not decrypt), mode 0600,
//! replaced atomically (temp file, fsync, rename, fsync of the directory), so that a crash
//! leaves either the old record or the new one, never neither.
//!
//! Compare-and-swap writes hold the account's `.lock` file (`flock`) from reading to renaming;
//! the lease is a second lock file, `.lease`, held across a whole refresh. Every mailgate
//! process on the host (service, `authorize`, `test-login`) takes both, so they serialize.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::seal::Sealer;
use super::{Expect, Lease, StoreError, Stored, Swap, TokenStore};
use crate::secret::Secret;
use crate::token::BoxFuture;

/// Records are small JSON; anything larger is not ours.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// The store in one directory; its calls run on the blocking pool.
#[derive(Clone)]
pub struct FileStore(Arc<Files>);

/// The directory and its blocking calls.
pub struct Files {
    dir: PathBuf,
    sealer: Sealer,
}

impl FileStore {
    /// Opens the store in `dir`, creating it (mode 0700) if needed.
    ///
    /// # Errors
    /// The directory cannot be created, or the key is not 32 bytes.
    pub fn open(dir: &Path, key: &Secret<Vec<u8>>) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|e| io_error(dir, &e))?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        Self::at(dir, key)
    }

    /// The store in `dir` as it is, for reading: a missing directory is an empty store (and
    /// is not created).
    ///
    /// # Errors
    /// The key is not 32 bytes.
    pub fn at(dir: &Path, key: &Secret<Vec<u8>>) -> Result<Self, StoreError> {
        Ok(Self(Arc::new(Files {
            dir: dir.to_owned(),
            sealer: Sealer::new(key)?,
        })))
    }

    /// The record files (`NAME.token`) of none of `accounts`, by file name, sorted.
    ///
    /// # Errors
    /// The directory cannot be read.
    pub async fn others(&self, accounts: &[String]) -> Result<Vec<String>, StoreError> {
        let accounts = accounts.to_vec();
        self.blocking(move |files| files.others(&accounts)).await
    }

    /// Runs `call` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Files) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let files = self.0.clone();
        tokio::task::spawn_blocking(move || call(&files))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
    }
}

impl TokenStore for FileStore {
    fn load<'a>(&'a self, account: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        let account = account.to_owned();
        Box::pin(self.blocking(move |files| files.load(&account)))
    }

    fn swap<'a>(
        &'a self,
        account: &'a str,
        expect: Expect,
        record: Stored,
    ) -> BoxFuture<'a, Result<Swap, StoreError>> {
        let account = account.to_owned();
        Box::pin(self.blocking(move |files| files.swap(&account, expect, record)))
    }

    fn try_lease<'a>(
        &'a self,
        account: &'a str,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        let account = account.to_owned();
        Box::pin(self.blocking(move |files| files.try_lease(&account)))
    }
}

impl Files {
    pub fn load(&self, account: &str) -> Result<Option<Stored>, StoreError> {
        let path = self.path(account);
        let metadata = match fs::metadata(&path) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io_error(&path, &error)),
        };
        if metadata.len() > MAX_FILE_BYTES {
            return Err(StoreError::Corrupt);
        }
        let bytes = fs::read(&path).map_err(|e| io_error(&path, &e))?;
        let plain = self.sealer.open(account, &bytes)?;
        serde_json::from_slice(plain.expose())
            .map(Some)
            .map_err(|_| StoreError::Corrupt)
    }

    /// Reads, compares and writes under the account's lock file, so two processes' swaps
    /// never interleave.
    pub fn swap(
        &self,
        account: &str,
        expect: Expect,
        mut record: Stored,
    ) -> Result<Swap, StoreError> {
        let _lock = self.lock(account)?;
        let current = match self.load(account) {
            Ok(current) => current,
            // An unreadable record can only be replaced outright.
            Err(_) if expect == Expect::Anything => None,
            Err(error) => return Err(error),
        };
        if !expect.is_met_by(current.as_ref()) {
            return Ok(Swap::Conflict(current));
        }
        record.generation = super::next_generation(current.as_ref().map(|c| c.generation));
        self.write(account, &record)?;
        Ok(Swap::Written(record.generation))
    }

    fn try_lease(&self, account: &str) -> Result<Option<Lease>, StoreError> {
        let file = self.lock_file(account, "lease")?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lease::new(file))),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(error)) => {
                Err(io_error(&self.lock_path(account, "lease"), &error))
            }
        }
    }
    /// Holds the account's write lock until the returned file is dropped (advisory `flock`:
    /// every mailgate process takes it before writing).
    fn lock(&self, account: &str) -> Result<fs::File, StoreError> {
        let file = self.lock_file(account, "lock")?;
        file.lock()
            .map_err(|e| io_error(&self.lock_path(account, "lock"), &e))?;
        Ok(file)
    }

    fn lock_file(&self, account: &str, kind: &str) -> Result<fs::File, StoreError> {
        let path = self.lock_path(account, kind);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error(&path, &e))
    }

    fn lock_path(&self, account: &str, kind: &str) -> PathBuf {
        self.dir.join(format!(".{}.{kind}", file_name(account)))
    }

    fn write(&self, account: &str, record: &Stored) -> Result<(), StoreError> {
        let plain = Secret::new(record.to_json());
        let sealed = self.sealer.seal(account, plain.expose())?;
        let path = self.path(account);
        let temp = self.dir.join(format!(
            ".{}.{}.tmp",
            file_name(account),
            hex(&ring::digest::digest(&ring::digest::SHA256, &sealed).as_ref()[..8])
        ));
        let written = write_durably(&temp, &sealed)
            .and_then(|()| fs::rename(&temp, &path))
            .and_then(|()| fs::File::open(&self.dir)?.sync_all());
        if let Err(error) = written {
            let _ = fs::remove_file(&temp);
            return Err(io_error(&path, &error));
        }
        Ok(())
    }

    fn path(&self, account: &str) -> PathBuf {
        self.dir.join(format!("{}.token", file_name(account)))
    }

    fn others(&self, accounts: &[String]) -> Result<Vec<String>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_error(&self.dir, &error)),
        };
        let known: Vec<PathBuf> = accounts.iter().map(|account| self.path(account)).collect();
        let mut others = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| io_error(&self.dir, &e))?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            // Lock and temporary files start with a dot; records never do (see file_name).
            if name.ends_with(".token") && !name.starts_with('.') && !known.contains(&path) {
                others.push(name.into_owned());
            }
        }
        others.sort();
        Ok(others)
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// A readable, safe file name: letters, digits and `._@+-` kept, the rest as `%XX`; very
/// long ids (over the file-name limit) by their SHA-256.
fn file_name(account: &str) -> String {
    let mut name = String::new();
    for (i, byte) in account.bytes().enumerate() {
        let keep =
            byte.is_ascii_alphanumeric() || (b"_@+-".contains(&byte)) || (byte == b'.' && i > 0);
        if keep {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
    }
    if name.len() > 200 {
        return hex(ring::digest::digest(&ring::digest::SHA256, account.as_bytes()).as_ref());
    }
    name
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_error(path: &Path, error: &std::io::Error) -> StoreError {
    StoreError::Io(format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::contract;
    use super::*;

    fn key(byte: u8) -> Secret<Vec<u8>> {
        Secret::new(vec![byte; 32])
    }

    /// The store's blocking calls, for tests that look at its files.
    fn files(dir: &Path, byte: u8) -> Arc<Files> {
        FileStore::open(dir, &key(byte)).unwrap().0
    }

    fn record(token: &str) -> Stored {
        Stored {
            refresh_token: Some(Secret::new(token.to_owned())),
            refreshed_at: Some(1_700_000_000),
            access_expires_at: Some(1_700_003_600),
            refresh_expires_at: None,
            generation: 0,
        }
    }

    #[tokio::test]
    async fn the_file_store_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let open = |byte| -> Arc<dyn TokenStore> {
            Arc::new(FileStore::open(dir.path(), &key(byte)).unwrap())
        };
        contract::suite(&open(9), &open(9), &open(10)).await;
    }

    #[test]
    fn a_record_round_trips_encrypted_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = files(&dir.path().join("tokens"), 7);
        assert_eq!(store.load("alice@contoso.com").unwrap(), None);
        let Swap::Written(first) = store
            .swap("alice@contoso.com", Expect::Absent, record("rt-secret-1"))
            .unwrap()
        else {
            panic!("the first write conflicted");
        };
        store
            .swap(
                "alice@contoso.com",
                Expect::Generation(first),
                record("rt-secret-2"),
            )
            .unwrap();
        let loaded = store.load("alice@contoso.com").unwrap().unwrap();
        assert_eq!(loaded.refresh_token, record("rt-secret-2").refresh_token);
        assert_eq!(loaded.generation, first + 1);
        let path = store.path("alice@contoso.com");
        assert!(path.ends_with("alice@contoso.com.token"));
        let bytes = fs::read(&path).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("rt-secret"));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Only the record and its lock file are left: no temp files.
        let mut names: Vec<String> = fs::read_dir(dir.path().join("tokens"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [".alice@contoso.com.lock", "alice@contoso.com.token"]
        );
    }

    #[test]
    fn records_from_before_generations_read_as_generation_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store = files(dir.path(), 4);
        let old =
            br#"{"refresh_token":"rt-old","refreshed_at":1700000000,"access_expires_at":null}"#;
        fs::write(
            store.path("alice"),
            store.sealer.seal("alice", old).unwrap(),
        )
        .unwrap();
        let loaded = store.load("alice").unwrap().unwrap();
        assert_eq!(loaded.generation, 0);
        assert_eq!(loaded.refreshed_at, Some(1_700_000_000));
        assert_eq!(
            store
                .swap("alice", Expect::Generation(0), record("rt-new"))
                .unwrap(),
            Swap::Written(1)
        );
        // A token never redeemed is written so that these older versions can read it too.
        let untried = Stored {
            refreshed_at: None,
            ..record("rt-imported")
        };
        let json: serde_json::Value = serde_json::from_slice(&untried.to_json()).unwrap();
        assert_eq!(json["refreshed_at"], 0);
        store.swap("alice", Expect::Anything, untried).unwrap();
        assert_eq!(store.load("alice").unwrap().unwrap().refreshed_at, None);
    }

    #[test]
    fn a_wrong_key_a_swapped_file_and_garbage_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = files(dir.path(), 1);
        store.swap("alice", Expect::Absent, record("rt")).unwrap();
        let other_key = files(dir.path(), 2);
        assert_eq!(other_key.load("alice"), Err(StoreError::Undecryptable));
        // Only an outright replacement goes over a record that does not decrypt.
        assert_eq!(
            other_key.swap("alice", Expect::Absent, record("rt-2")),
            Err(StoreError::Undecryptable)
        );
        assert!(matches!(
            other_key.swap("alice", Expect::Anything, record("rt-2")),
            Ok(Swap::Written(_))
        ));
        fs::copy(store.path("alice"), store.path("bob")).unwrap();
        assert_eq!(store.load("bob"), Err(StoreError::Undecryptable));
        fs::write(store.path("carol"), b"MGT1short").unwrap();
        assert_eq!(store.load("carol"), Err(StoreError::Corrupt));
        fs::write(store.path("dave"), b"not ours").unwrap();
        assert_eq!(store.load("dave"), Err(StoreError::Corrupt));
    }

    #[tokio::test]
    async fn records_of_other_accounts_are_listed_by_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), &key(5)).unwrap();
        for account in ["alice", "old/friend", "bob"] {
            store
                .swap(account, Expect::Absent, record("rt"))
                .await
                .unwrap();
        }
        let _lease = store.try_lease("bob").await.unwrap();
        let known = ["alice".to_owned(), "bob".to_owned()];
        assert_eq!(store.others(&known).await.unwrap(), ["old%2Ffriend.token"]);
        let missing = FileStore::at(&dir.path().join("none"), &key(5)).unwrap();
        assert!(missing.others(&known).await.unwrap().is_empty());
        assert_eq!(missing.load("alice").await, Ok(None));
        assert!(!dir.path().join("none").exists());
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_name("a/../b"), "a%2F..%2Fb");
        assert_eq!(file_name(".hidden"), "%2Ehidden");
        assert_eq!(file_name(&"x".repeat(300)).len(), 64);
    }
}
