//! Where an SMTP server's byte stream is between two replies, so that mailgate's own `421`
//! may follow without landing inside a reply (RFC 5321 4.2.1: a multi-line reply ends with the
//! line whose code is followed by a space, or by nothing).

use crate::splice::Boundary;

/// Follows server replies line by line.
pub struct ReplyBoundary {
    /// Whether the last byte seen ended the last line of a reply.
    at_reply_end: bool,
    /// The first four bytes of the current line (code and separator), as far as seen.
    head: [u8; 4],
    head_len: usize,
}

impl Default for ReplyBoundary {
    /// Splicing starts right after the `235` reply: between two replies.
    fn default() -> Self {
        Self {
            at_reply_end: true,
            head: [0; 4],
            head_len: 0,
        }
    }
}

impl Boundary for ReplyBoundary {
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\n');
            let line = &bytes[..end.unwrap_or(bytes.len())];
            let wanted = (4 - self.head_len).min(line.len());
            self.head[self.head_len..self.head_len + wanted].copy_from_slice(&line[..wanted]);
            self.head_len += wanted;
            let Some(end) = end else {
                self.at_reply_end = false;
                return;
            };
            // A continuation line has `-` after the code.
            self.at_reply_end = self.head_len < 4 || self.head[3] != b'-';
            self.head_len = 0;
            bytes = &bytes[end + 1..];
        }
    }

    fn at_boundary(&self) -> bool {
        self.at_reply_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(chunks: &[&[u8]]) -> bool {
        let mut boundary = ReplyBoundary::default();
        for chunk in chunks {
            boundary.observe(chunk);
        }
        boundary.at_boundary()
    }

    #[test]
    fn single_and_multi_line_replies() {
        assert!(after(&[]));
        assert!(after(&[b"250 2.1.0 Ok\r\n"]));
        assert!(!after(&[b"250 2.1"]));
        assert!(!after(&[b"250-mx\r\n250-SIZE 10\r\n"]));
        assert!(after(&[b"250-mx\r\n250-SIZE 10\r\n250 OK\r\n"]));
        assert!(!after(&[b"25", b"0-mx\r\n"]));
        assert!(after(&[b"25", b"0-mx\r\n2", b"50 OK\r\n"]));
    }
}
