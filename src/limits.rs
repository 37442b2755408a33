//! What a client may get wrong before authentication, counted the same way by every front end.

/// Errors of any kind (malformed, misplaced or unknown commands) before the session is closed.
/// Counted in total, not consecutively, so that interleaving NOOPs does not reset the count:
/// enough for a client probing extensions, few enough to shed a peer that speaks no mail protocol.
pub const MAX_ERRORS: u32 = 10;

/// Failed logins per connection before the session is closed: a typo or two is forgiven, while
/// guessing costs a reconnect every few tries (RFC 4954 4 leaves the number to servers).
pub const MAX_LOGIN_FAILURES: u32 = 3;

/// Counts one session's errors and failed logins.
#[derive(Debug, Default)]
pub struct Strikes {
    errors: u32,
    login_failures: u32,
}

/// Whether the session may go on after a strike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Too many errors: say why and close.
    TooManyErrors,
    /// Too many failed logins: say why and close.
    TooManyFailures,
}

impl Strikes {
    pub fn error(&mut self) -> Verdict {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            Verdict::TooManyErrors
        } else {
            Verdict::Continue
        }
    }

    pub fn login_failed(&mut self) -> Verdict {
        self.login_failures += 1;
        if self.login_failures >= MAX_LOGIN_FAILURES {
            Verdict::TooManyFailures
        } else {
            Verdict::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_failures_are_counted_separately() {
        let mut strikes = Strikes::default();
        for _ in 1..MAX_LOGIN_FAILURES {
            assert_eq!(strikes.login_failed(), Verdict::Continue);
        }
        for _ in 1..MAX_ERRORS {
            assert_eq!(strikes.error(), Verdict::Continue);
        }
        assert_eq!(strikes.error(), Verdict::TooManyErrors);
        assert_eq!(strikes.login_failed(), Verdict::TooManyFailures);
    }
}
