//! Where a ManageSieve server's byte stream is between two responses, so that mailgate's own
//! `BYE` may follow without landing inside one: after the line of an `OK`, `NO` or `BYE`
//! (RFC 5804 1.2), never inside a literal (a GETSCRIPT answer) or the lines before it.

use crate::splice::Boundary;

/// Follows server responses byte by byte.
pub struct ResponseBoundary {
    at_response_end: bool,
    /// Octets of a literal still to come.
    literal: u64,
    /// The first word of the current line, as far as seen (enough for `BYE` and one more).
    word: [u8; 4],
    word_len: usize,
    /// The first word has ended (or the line continues after a literal).
    word_done: bool,
    in_quote: bool,
    escaped: bool,
    /// A literal announcement `{n}` / `{n+}` seen at the end of the line so far.
    announcement: Announcement,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Announcement {
    None,
    Digits(u64),
    Plus(u64),
    Closed(u64),
}

impl Default for ResponseBoundary {
    /// Splicing starts right after the `OK` to AUTHENTICATE: between two responses.
    fn default() -> Self {
        Self {
            at_response_end: true,
            literal: 0,
            word: [0; 4],
            word_len: 0,
            word_done: false,
            in_quote: false,
            escaped: false,
            announcement: Announcement::None,
        }
    }
}

impl ResponseBoundary {
    fn byte(&mut self, byte: u8) {
        if self.literal > 0 {
            self.literal -= 1;
            return;
        }
        if byte == b'\n' {
            self.line_end();
            return;
        }
        self.at_response_end = false;
        if !self.word_done {
            if byte.is_ascii_alphabetic() && self.word_len < self.word.len() {
                self.word[self.word_len] = byte.to_ascii_uppercase();
                self.word_len += 1;
            } else {
                self.word_done = true;
            }
        }
        self.announcement = match (self.announcement, byte) {
            _ if self.in_quote => Announcement::None,
            (_, b'{') => Announcement::Digits(0),
            (Announcement::Digits(n), b'0'..=b'9') => {
                Announcement::Digits(n.saturating_mul(10).saturating_add(u64::from(byte - b'0')))
            }
            (Announcement::Digits(n), b'+') => Announcement::Plus(n),
            (Announcement::Digits(n) | Announcement::Plus(n), b'}') => Announcement::Closed(n),
            (Announcement::Closed(n), b'\r') => Announcement::Closed(n),
            _ => Announcement::None,
        };
        // RFC 5804 4: inside a quoted string only `\"` and `\\` are escapes.
        match byte {
            _ if self.escaped => self.escaped = false,
            b'\\' if self.in_quote => self.escaped = true,
            b'"' => self.in_quote = !self.in_quote,
            _ => {}
        }
    }

    fn line_end(&mut self) {
        if let Announcement::Closed(length) = self.announcement {
            // The line goes on after the literal: its first word is already known.
            self.literal = length;
            self.announcement = Announcement::None;
            self.word_done = true;
            self.at_response_end = false;
            return;
        }
        let word = &self.word[..self.word_len];
        self.at_response_end = matches!(word, b"OK" | b"NO" | b"BYE");
        self.word_len = 0;
        self.word_done = false;
        self.in_quote = false;
        self.escaped = false;
        self.announcement = Announcement::None;
    }
}

impl Boundary for ResponseBoundary {
    fn observe(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.byte(byte);
        }
    }

    fn at_boundary(&self) -> bool {
        self.at_response_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(chunks: &[&[u8]]) -> bool {
        let mut boundary = ResponseBoundary::default();
        for chunk in chunks {
            boundary.observe(chunk);
        }
        boundary.at_boundary()
    }

    #[test]
    fn responses_end_at_ok_no_bye() {
        assert!(after(&[]));
        assert!(after(&[b"OK \"Done\"\r\n"]));
        assert!(after(&[b"no (NONEXISTENT) \"gone\"\r\n"]));
        assert!(after(&[b"BYE\r\n"]));
        assert!(!after(&[b"OK \"Do"]));
        assert!(!after(&[b"\"script\" ACTIVE\r\n"]));
        assert!(after(&[b"\"script\" ACTIVE\r\n\"b\"\r\nO", b"K\r\n"]));
        assert!(!after(&[b"OKAY\r\n"]));
        assert!(!after(&[b"NOTE\r\n"]));
    }

    #[test]
    fn literals_are_skipped_whole() {
        let script = b"{15}\r\nOK\r\nkeep;\r\nNO\r\n\r\nOK\r\n";
        assert!(after(&[script]));
        assert!(!after(&[&script[..12]]));
        assert!(!after(&[&script[..20]]));
        // A literal in a response's text, split across reads.
        assert!(!after(&[b"NO {4", b"}\r\nOK\r\n"]));
        assert!(after(&[b"NO {4", b"}\r\nOK\r\n", b"\r\n"]));
        assert!(after(&[b"OK (TAG {2+}\r\nab) \"x\"\r\n"]));
    }

    #[test]
    fn braces_inside_quoted_strings_announce_nothing() {
        assert!(after(&[b"NO \"odd {3}\\\" {4}\"\r\n"]));
        assert!(!after(&[b"\"a {3}\"x{2}\r\n"]));
    }
}
