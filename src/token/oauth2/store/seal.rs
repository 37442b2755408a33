//! How every backend seals a record: XChaCha20-Poly1305 with the account id as associated
//! data, so a record copied to another account's name does not open, and a backend (a file
//! system, Redis) never holds a token in clear.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ring::rand::{SecureRandom as _, SystemRandom};

use super::StoreError;
use crate::secret::Secret;

/// Marks the format, so a future format can be told apart.
const MAGIC: &[u8; 4] = b"MGT1";
const NONCE_BYTES: usize = 24;
/// Bound to the account id so that records cannot be swapped between accounts.
const AAD_PREFIX: &[u8] = b"mailgate token store v1\0";

pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl Sealer {
    /// # Errors
    /// The key is not 32 bytes.
    pub fn new(key: &Secret<Vec<u8>>) -> Result<Self, StoreError> {
        let cipher = XChaCha20Poly1305::new_from_slice(key.expose())
            .map_err(|_| StoreError::Io("the store key must be 32 bytes".to_owned()))?;
        Ok(Self { cipher })
    }

    /// `plain` sealed for `account`: magic, a random nonce, the ciphertext.
    ///
    /// # Errors
    /// The system gave no randomness.
    pub fn seal(&self, account: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_BYTES];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| StoreError::Io("no randomness from the system".to_owned()))?;
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &aad(account),
                },
            )
            .map_err(|_| StoreError::Io("encryption failed".to_owned()))?;
        Ok([MAGIC.as_slice(), &nonce, &ciphertext].concat())
    }

    /// What [`Sealer::seal`] sealed for `account`.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for bytes not in this format; [`StoreError::Undecryptable`]
    /// for another key, another account, or altered bytes (they cannot be told apart).
    pub fn open(&self, account: &str, sealed: &[u8]) -> Result<Secret<Vec<u8>>, StoreError> {
        let sealed = sealed.strip_prefix(MAGIC).ok_or(StoreError::Corrupt)?;
        if sealed.len() < NONCE_BYTES {
            return Err(StoreError::Corrupt);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad(account),
                },
            )
            .map(Secret::new)
            .map_err(|_| StoreError::Undecryptable)
    }
}

fn aad(account: &str) -> Vec<u8> {
    [AAD_PREFIX, account.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_open_only_for_their_account_and_key() {
        let sealer = Sealer::new(&Secret::new(vec![3; 32])).unwrap();
        let sealed = sealer.seal("alice", b"rt-secret").unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("rt-secret"));
        assert_eq!(
            sealer.open("alice", &sealed).unwrap().expose(),
            b"rt-secret"
        );
        assert_eq!(sealer.open("bob", &sealed), Err(StoreError::Undecryptable));
        let other = Sealer::new(&Secret::new(vec![4; 32])).unwrap();
        assert_eq!(other.open("alice", &sealed), Err(StoreError::Undecryptable));
        assert_eq!(sealer.open("alice", b"MGT1short"), Err(StoreError::Corrupt));
        assert_eq!(sealer.open("alice", b"not ours"), Err(StoreError::Corrupt));
    }
}
