//! The encrypted refresh-token store: one file per account, XChaCha20-Poly1305 with the account
//! id as associated data (a file copied to another account's name does not decrypt), mode 0600,
//! replaced atomically (temp file, fsync, rename, fsync of the directory) so that a crash at any
//! moment leaves either the old token or the new one, never neither.
//!
//! Calls are blocking file I/O; async callers run them on the blocking pool.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::Deserialize;

use crate::secret::Secret;

/// Marks the file format, so a future format can be told apart.
const MAGIC: &[u8; 4] = b"MGT1";
const NONCE_BYTES: usize = 24;
/// Bound to the account id so that files cannot be swapped between accounts.
const AAD_PREFIX: &[u8] = b"mailgate token store v1\0";
/// Files are small JSON; anything larger is not ours.
const MAX_FILE_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("token store I/O: {0}")]
    Io(String),
    /// Wrong key, or a file changed by someone else: the two cannot be told apart.
    #[error("token store file does not decrypt (wrong store key, or a corrupted file)")]
    Undecryptable,
    #[error("token store file is corrupted")]
    Corrupt,
}

/// What is kept for one account. Written by [`record_json`]: `Secret` never serializes its
/// value, by design.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Stored {
    /// `None` once the provider refused it: the account needs re-authorization.
    pub refresh_token: Option<Secret<String>>,
    /// Unix seconds of the last successful grant.
    pub refreshed_at: u64,
    /// Unix seconds when the last access token expires, if the provider said.
    #[serde(default)]
    pub access_expires_at: Option<u64>,
    /// Unix seconds when the refresh token itself expires, if the provider said.
    #[serde(default)]
    pub refresh_expires_at: Option<u64>,
}

pub struct Store {
    dir: PathBuf,
    cipher: XChaCha20Poly1305,
}

impl Store {
    /// Opens the store in `dir`, creating it (mode 0700) if needed.
    ///
    /// # Errors
    /// The directory cannot be created, or the key is not 32 bytes.
    pub fn open(dir: &Path, key: &Secret<Vec<u8>>) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|e| io_error(dir, &e))?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        let cipher = XChaCha20Poly1305::new_from_slice(key.expose())
            .map_err(|_| StoreError::Io("the store key must be 32 bytes".to_owned()))?;
        Ok(Self {
            dir: dir.to_owned(),
            cipher,
        })
    }

    /// The account's record; `None` if it was never stored (never authorized).
    ///
    /// # Errors
    /// The file cannot be read, does not decrypt, or is not a record.
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
        let sealed = bytes.strip_prefix(MAGIC).ok_or(StoreError::Corrupt)?;
        if sealed.len() < NONCE_BYTES {
            return Err(StoreError::Corrupt);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
        let aad = aad(account);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| StoreError::Undecryptable)?;
        let plain = Secret::new(plain);
        serde_json::from_slice(plain.expose())
            .map(Some)
            .map_err(|_| StoreError::Corrupt)
    }

    /// Replaces the account's record atomically and durably.
    ///
    /// # Errors
    /// Encryption or any step of writing failed; the old file is then untouched.
    pub fn save(&self, account: &str, record: &Stored) -> Result<(), StoreError> {
        let _lock = self.lock(account)?;
        self.write(account, record)
    }

    /// Replaces the account's record unless the current one satisfies `keep`; whether it
    /// wrote. Reading and writing happen under the account's lock, so a record another
    /// process stores meanwhile (`mailgate authorize` while the service runs) is never
    /// overwritten by a decision taken on the older one.
    ///
    /// # Errors
    /// As for [`Store::load`] and [`Store::save`].
    pub fn save_unless(
        &self,
        account: &str,
        record: &Stored,
        keep: impl FnOnce(&Stored) -> bool,
    ) -> Result<bool, StoreError> {
        let _lock = self.lock(account)?;
        if self.load(account)?.as_ref().is_some_and(keep) {
            return Ok(false);
        }
        self.write(account, record)?;
        Ok(true)
    }

    /// Holds the account's lock file exclusively until the returned file is dropped
    /// (advisory `flock`: every mailgate process takes it before writing).
    fn lock(&self, account: &str) -> Result<fs::File, StoreError> {
        let path = self.dir.join(format!(".{}.lock", file_name(account)));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error(&path, &e))?;
        file.lock().map_err(|e| io_error(&path, &e))?;
        Ok(file)
    }

    fn write(&self, account: &str, record: &Stored) -> Result<(), StoreError> {
        let plain = Secret::new(record_json(record));
        let mut nonce = [0u8; NONCE_BYTES];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| StoreError::Io("no randomness from the system".to_owned()))?;
        let aad = aad(account);
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain.expose(),
                    aad: &aad,
                },
            )
            .map_err(|_| StoreError::Io("encryption failed".to_owned()))?;
        let path = self.path(account);
        let temp = self
            .dir
            .join(format!(".{}.{}.tmp", file_name(account), hex(&nonce[..8])));
        let written = write_durably(&temp, &[MAGIC.as_slice(), &nonce, &ciphertext].concat())
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
}

/// The record as JSON, the refresh token included (the file is encrypted).
fn record_json(record: &Stored) -> Vec<u8> {
    serde_json::json!({
        "refresh_token": record.refresh_token.as_ref().map(|token| token.expose().clone()),
        "refreshed_at": record.refreshed_at,
        "access_expires_at": record.access_expires_at,
        "refresh_expires_at": record.refresh_expires_at,
    })
    .to_string()
    .into_bytes()
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

fn aad(account: &str) -> Vec<u8> {
    [AAD_PREFIX, account.as_bytes()].concat()
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
    use super::*;

    fn key(byte: u8) -> Secret<Vec<u8>> {
        Secret::new(vec![byte; 32])
    }

    fn record(token: &str) -> Stored {
        Stored {
            refresh_token: Some(Secret::new(token.to_owned())),
            refreshed_at: 1_700_000_000,
            access_expires_at: Some(1_700_003_600),
            refresh_expires_at: None,
        }
    }

    #[test]
    fn a_record_round_trips_encrypted_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("tokens"), &key(7)).unwrap();
        assert_eq!(store.load("alice@contoso.com").unwrap(), None);
        store
            .save("alice@contoso.com", &record("rt-secret-1"))
            .unwrap();
        store
            .save("alice@contoso.com", &record("rt-secret-2"))
            .unwrap();
        assert_eq!(
            store.load("alice@contoso.com").unwrap(),
            Some(record("rt-secret-2"))
        );
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
    fn a_wrong_key_a_swapped_file_and_garbage_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &key(1)).unwrap();
        store.save("alice", &record("rt")).unwrap();
        let other_key = Store::open(dir.path(), &key(2)).unwrap();
        assert_eq!(other_key.load("alice"), Err(StoreError::Undecryptable));
        fs::copy(store.path("alice"), store.path("bob")).unwrap();
        assert_eq!(store.load("bob"), Err(StoreError::Undecryptable));
        fs::write(store.path("carol"), b"MGT1short").unwrap();
        assert_eq!(store.load("carol"), Err(StoreError::Corrupt));
        fs::write(store.path("dave"), b"not ours").unwrap();
        assert_eq!(store.load("dave"), Err(StoreError::Corrupt));
    }

    #[test]
    fn a_conditional_write_keeps_what_another_process_stored_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let service = Store::open(dir.path(), &key(3)).unwrap();
        let authorize = Store::open(dir.path(), &key(3)).unwrap();
        service.save("alice", &record("old")).unwrap();
        // `mailgate authorize` stores a new token while the service decides to forget "old".
        authorize.save("alice", &record("new")).unwrap();
        let forget = |stored: &Stored| {
            stored
                .refresh_token
                .as_ref()
                .is_some_and(|token| token.expose() != "old")
        };
        assert!(
            !service
                .save_unless("alice", &record("gone"), forget)
                .unwrap()
        );
        let kept = service.load("alice").unwrap().unwrap();
        assert_eq!(kept.refresh_token.unwrap().expose(), "new");
        // The lock is released: a writer in another thread is not held up.
        std::thread::scope(|scope| {
            scope.spawn(|| authorize.save("alice", &record("old")).unwrap());
        });
        assert!(
            service
                .save_unless("alice", &record("gone"), forget)
                .unwrap()
        );
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_name("a/../b"), "a%2F..%2Fb");
        assert_eq!(file_name(".hidden"), "%2Ehidden");
        assert_eq!(file_name(&"x".repeat(300)).len(), 64);
    }
}
