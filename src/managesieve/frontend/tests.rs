//! The dialogue fed hostile byte sequences: it never panics and every byte it sends is a
//! well-formed ManageSieve response line.

use std::time::Duration;

use super::*;

/// Pieces clients could send, glued at random: framing, quoting and SASL edge cases.
const PIECES: [&str; 24] = [
    "AUTHENTICATE ",
    "\"PLAIN\" ",
    "\"LOGIN\"",
    "{5+}\r\n",
    "{3}\r\n",
    "{99999+}\r\n",
    "{4294967295}\r\n",
    "\"",
    "\\",
    "\r\n",
    "\n",
    "NOOP ",
    "CAPABILITY",
    "STARTTLS",
    "LOGOUT",
    "\"*\"",
    "\"AGFsaWNlAHJpZ2h0\"",
    "AGFsaWNlAHdyb25n",
    "(",
    ")",
    "\0",
    "\u{ff}\u{202e}",
    "PUTSCRIPT \"a\" ",
    " ",
];

fn settings() -> FrontendSettings {
    FrontendSettings {
        hostname: "mx.test".to_owned(),
        pre_auth_timeout: Duration::from_secs(60),
        pre_auth_lifetime: Duration::from_secs(300),
        client: None,
        starttls: None,
        max_line_length: 128,
        max_literal_size: 64,
        local: None,
    }
}

/// xorshift64: deterministic, so a failure is reproducible.
struct Random(u64);

impl Random {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % n as u64).unwrap()
    }
}

/// Each line of `bytes` is a response (`OK`, `NO`, `BYE`) or a string line (a capability
/// or a challenge), as a client's parser expects.
fn assert_well_formed(bytes: &[u8]) {
    let text = std::str::from_utf8(bytes).unwrap();
    assert!(text.ends_with("\r\n"), "{text:?}");
    for line in text.split_terminator("\r\n") {
        let tokens = syntax::tokenize(format!("{line}\r\n").as_bytes()).unwrap();
        match tokens.first() {
            Some(Token::Atom(status)) => {
                assert!(["OK", "NO", "BYE"].contains(&status.as_str()), "{line:?}")
            }
            Some(Token::String(_)) => {}
            _ => panic!("{line:?}"),
        }
    }
}

#[test]
fn hostile_input_gets_well_formed_responses() {
    let mut random = Random(0x5eed_cafe_f00d_d00d);
    let upstream = || vec!["\"SIEVE\" \"fileinto\"".to_owned()];
    for _ in 0..3000 {
        let mut session = ManageSieveDialogue::new(&settings());
        assert_well_formed(&session.greeting(&upstream));
        let input: String = (0..random.below(40))
            .map(|_| PIECES[random.below(PIECES.len())])
            .collect();
        let mut rest = input.as_bytes();
        'session: while !rest.is_empty() {
            let (chunk, after) = rest.split_at(random.below(rest.len()) + 1);
            rest = after;
            session.push(chunk);
            while let Some(step) = session.next_step(&upstream) {
                let step = match step {
                    Step::LogIn { .. } => session.login_failed(LoginError::ALL[random.below(9)]),
                    step => step,
                };
                match step {
                    Step::Reply(bytes) => assert_well_formed(&bytes),
                    Step::Close(bytes) => {
                        assert_well_formed(&bytes);
                        break 'session;
                    }
                    Step::StartTls(_) | Step::LogIn { .. } => panic!("{input:?}: {step:?}"),
                }
            }
        }
    }
}
