//! Proofs of passwords: HMAC-SHA256 (RFC 2104) of the user name and the password under a key
//! drawn at random when the check (or the throttle, for wrong passwords it counted) is built,
//! or, for a throttle the replicas share, derived from their sealing key. What is remembered
//! is never the password, and without the key it cannot even be tested against guesses.

use ring::hmac;
use ring::rand::SystemRandom;

use crate::login::Credentials;
use crate::token::Proof;

pub struct Prover(hmac::Key);

impl Prover {
    /// # Errors
    /// The system's random source failed.
    pub fn new() -> Result<Self, String> {
        hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .map(Self)
            .map_err(|_| "no random key for remembering passwords".to_owned())
    }

    /// Proofs under `key`: equal wherever the key is the same.
    pub fn keyed(key: hmac::Key) -> Self {
        Self(key)
    }

    /// The proof of `credentials`: equal for equal user names and passwords, and only then.
    pub fn proof(&self, credentials: &Credentials) -> Proof {
        self.proof_of(&credentials.account, credentials.password.expose())
    }

    /// The proof of `account` and `password`, for callers that hold them apart.
    pub fn proof_of(&self, account: &str, password: &str) -> Proof {
        let account = account.as_bytes();
        let mut context = hmac::Context::with_key(&self.0);
        // Length first, so that ("ab", "c") and ("a", "bc") differ.
        context.update(&(account.len() as u64).to_be_bytes());
        context.update(account);
        context.update(password.as_bytes());
        let mut proof = [0u8; 32];
        proof.copy_from_slice(context.sign().as_ref());
        Proof(proof)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn credentials(account: &str, password: &str) -> Credentials {
        Credentials {
            account: account.into(),
            password: Secret::new(password.into()),
        }
    }

    #[test]
    fn proofs_differ_unless_user_and_password_are_the_same() {
        let prover = Prover::new().unwrap();
        let proof = |account, password| prover.proof(&credentials(account, password));
        assert_eq!(proof("alice", "right"), proof("alice", "right"));
        assert_ne!(proof("alice", "right"), proof("alice", "wrong"));
        assert_ne!(proof("ab", "c"), proof("a", "bc"));
        let other = Prover::new().unwrap();
        assert_ne!(
            proof("alice", "right"),
            other.proof(&credentials("alice", "right"))
        );
        assert_eq!(
            format!("{:?}", proof("alice", "right")),
            "Proof([keyed hash])"
        );
    }
}
