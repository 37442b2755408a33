//! Checking the password a client presents: `any` (the user name is the account id and the
//! password is not checked) or `static` (argon2 PHC hashes per account).

use std::collections::HashMap;

use argon2::{Argon2, PasswordHash, PasswordVerifier};

use crate::config::{ClientAuthConfig, ClientAuthMode};
use crate::sasl::Credentials;
use crate::secret::Secret;

pub enum ClientAuth {
    Any,
    Static(HashMap<String, Secret<String>>),
}

impl ClientAuth {
    pub fn new(config: &ClientAuthConfig) -> Self {
        match config.mode {
            ClientAuthMode::Any => ClientAuth::Any,
            ClientAuthMode::Static => ClientAuth::Static(
                config
                    .accounts
                    .iter()
                    .map(|(account, hash)| (account.clone(), hash.clone()))
                    .collect(),
            ),
        }
    }

    /// Whether the client may act as `credentials.account`.
    ///
    /// Argon2 is deliberately slow, so it runs off the async workers.
    pub async fn verify(&self, credentials: &Credentials) -> bool {
        let ClientAuth::Static(accounts) = self else {
            return true;
        };
        let Some(hash) = accounts.get(&credentials.account).cloned() else {
            return false;
        };
        let password = credentials.password.clone();
        tokio::task::spawn_blocking(move || verify_hash(&hash, &password))
            .await
            .unwrap_or(false)
    }
}

fn verify_hash(hash: &Secret<String>, password: &Secret<String>) -> bool {
    PasswordHash::new(hash.expose()).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.expose().as_bytes(), &parsed)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordHasher;
    use argon2::password_hash::SaltString;

    fn credentials(account: &str, password: &str) -> Credentials {
        Credentials {
            account: account.into(),
            password: Secret::new(password.into()),
        }
    }

    #[tokio::test]
    async fn static_mode_checks_the_hash() {
        let salt = SaltString::from_b64("c29tZXNhbHRzb21lc2FsdA").unwrap();
        let hash = Argon2::default()
            .hash_password(b"right", &salt)
            .unwrap()
            .to_string();
        let auth = ClientAuth::Static(HashMap::from([("alice".into(), Secret::new(hash))]));
        assert!(auth.verify(&credentials("alice", "right")).await);
        assert!(!auth.verify(&credentials("alice", "wrong")).await);
        assert!(!auth.verify(&credentials("bob", "right")).await);
        assert!(ClientAuth::Any.verify(&credentials("x", "")).await);
    }
}
