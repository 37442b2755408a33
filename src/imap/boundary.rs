//! Where an IMAP server's byte stream is between two responses, so that mailgate's own
//! `* BYE` may follow without landing inside a line or a literal (RFC 9051 2.2.2, 4.3).

use crate::splice::Boundary;

/// The longest line ending that can announce a literal: `~{` (RFC 3516 literal8), 20 digits
/// (a u64), `}` and CR.
const ANNOUNCEMENT_TAIL: usize = 24;

/// Follows server responses: lines, and the literals announced as `{N}` at a line's end.
pub struct ResponseBoundary {
    /// Bytes of the current literal still to come.
    literal_left: u64,
    /// Whether the last byte seen ended a line (and no literal followed).
    at_line_start: bool,
    /// The last bytes of the current line, to read a literal announcement at its end.
    tail: [u8; ANNOUNCEMENT_TAIL],
    tail_len: usize,
}

impl Default for ResponseBoundary {
    /// Splicing starts right after the login's tagged completion: between two responses.
    fn default() -> Self {
        Self {
            literal_left: 0,
            at_line_start: true,
            tail: [0; ANNOUNCEMENT_TAIL],
            tail_len: 0,
        }
    }
}

impl ResponseBoundary {
    fn remember(&mut self, segment: &[u8]) {
        if segment.len() >= ANNOUNCEMENT_TAIL {
            self.tail
                .copy_from_slice(&segment[segment.len() - ANNOUNCEMENT_TAIL..]);
            self.tail_len = ANNOUNCEMENT_TAIL;
            return;
        }
        let keep = (ANNOUNCEMENT_TAIL - segment.len()).min(self.tail_len);
        self.tail
            .copy_within(self.tail_len - keep..self.tail_len, 0);
        self.tail[keep..keep + segment.len()].copy_from_slice(segment);
        self.tail_len = keep + segment.len();
    }

    /// The size of the literal the finished line announces, if it ends in `{N}` CR.
    fn announced_literal(&self) -> Option<u64> {
        let line = &self.tail[..self.tail_len];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let digits = line.strip_suffix(b"}")?;
        let open = digits.iter().rposition(|&b| b == b'{')?;
        std::str::from_utf8(&digits[open + 1..]).ok()?.parse().ok()
    }
}

impl Boundary for ResponseBoundary {
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.literal_left > 0 {
                let skipped = self.literal_left.min(bytes.len() as u64);
                self.literal_left -= skipped;
                bytes = &bytes[skipped as usize..];
                continue;
            }
            match bytes.iter().position(|&b| b == b'\n') {
                None => {
                    self.remember(bytes);
                    self.at_line_start = false;
                    return;
                }
                Some(end) => {
                    self.remember(&bytes[..end]);
                    match self.announced_literal() {
                        // The response goes on after the literal, on the same line.
                        Some(size) if size > 0 => {
                            self.literal_left = size;
                            self.at_line_start = false;
                        }
                        Some(_) => self.at_line_start = false,
                        None => self.at_line_start = true,
                    }
                    self.tail_len = 0;
                    bytes = &bytes[end + 1..];
                }
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.at_line_start && self.literal_left == 0
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
    fn lines_and_literals() {
        assert!(after(&[]));
        assert!(after(&[b"* 3 EXISTS\r\n"]));
        assert!(!after(&[b"* 3 EXI"]));
        assert!(!after(&[b"* 1 FETCH (BODY[] {5}\r\nab"]));
        assert!(!after(&[b"* 1 FETCH (BODY[] {5}\r\nabcde"]));
        assert!(after(&[b"* 1 FETCH (BODY[] {5}\r\nabcde)\r\n"]));
        // A literal holding what looks like line ends and announcements.
        assert!(!after(&[b"* 1 FETCH (BODY[] {9}\r\n{2}\r\n\r\n\r\n"]));
        assert!(after(&[b"* 1 FETCH (BODY[] {9}\r\n{2}\r\n\r\n\r\n)\r\n"]));
        assert!(after(&[
            b"* 1 FETCH (BINARY[] ~{2}\r\nab)\r\na OK done\r\n"
        ]));
    }

    #[test]
    fn announcements_split_across_chunks() {
        assert!(!after(&[
            b"* 1 FETCH (BODY[] {1",
            b"2}\r",
            b"\n0123456789a"
        ]));
        assert!(after(&[
            b"* 1 FETCH (BODY[] {1",
            b"2}\r",
            b"\n0123456789ab",
            b")\r\n"
        ]));
        let long_line = [&b"* OK "[..], &[b'x'; 100], b"{3}\r\n"].concat();
        assert!(!after(&[&long_line[..50], &long_line[50..]]));
    }
}
