//! Framing client input into CRLF-terminated lines (SMTP, POP3), with a limit on a line's
//! length and a way to skip a counted chunk (SMTP BDAT).

/// A framed client line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// Up to and including the LF.
    Complete(Vec<u8>),
    /// A line longer than the limit, already discarded up to its LF.
    TooLong,
}

/// Frames client input into lines without I/O, holding at most `max_line` bytes of an
/// unfinished line plus one read. The limit bounds every line (RFC 4954 4 lets AUTH lines and
/// SASL responses be longer than other commands), since the framer cannot know the verb
/// before the line ends.
pub(crate) struct LineBuffer {
    max_line: usize,
    buffer: Vec<u8>,
    /// Inside an oversized line: drop everything up to the next LF.
    overflowing: bool,
    /// Bytes of a refused BDAT chunk still to drop (RFC 3030 2).
    skip: usize,
}

impl LineBuffer {
    pub(crate) fn new(max_line: usize) -> Self {
        Self {
            max_line,
            buffer: Vec::new(),
            overflowing: false,
            skip: 0,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The longest line framed.
    pub(crate) fn max_line(&self) -> usize {
        self.max_line
    }

    pub(crate) fn buffered(&self) -> usize {
        self.buffer.len()
    }

    pub(crate) fn discard(&mut self, bytes: usize) {
        self.skip = self.skip.saturating_add(bytes);
    }

    pub(crate) fn next_line(&mut self) -> Option<Line> {
        if self.skip > 0 {
            let n = self.skip.min(self.buffer.len());
            self.buffer.drain(..n);
            self.skip -= n;
            if self.skip > 0 {
                return None;
            }
        }
        match self.buffer.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                if std::mem::take(&mut self.overflowing) || line.len() > self.max_line {
                    Some(Line::TooLong)
                } else {
                    Some(Line::Complete(line))
                }
            }
            None => {
                if self.overflowing || self.buffer.len() > self.max_line {
                    self.overflowing = true;
                    self.buffer.clear();
                }
                None
            }
        }
    }

    /// What the client sent after the last framed line.
    pub(crate) fn into_rest(self) -> Vec<u8> {
        self.buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MAX_LINE_LENGTH;

    #[test]
    fn frames_lines_and_keeps_the_rest() {
        let mut lines = LineBuffer::new(DEFAULT_MAX_LINE_LENGTH);
        lines.push(b"NOOP\r\nMAIL FROM:<a>\r\nRCPT");
        assert_eq!(
            lines.next_line(),
            Some(Line::Complete(b"NOOP\r\n".to_vec()))
        );
        assert_eq!(
            lines.next_line(),
            Some(Line::Complete(b"MAIL FROM:<a>\r\n".to_vec()))
        );
        assert_eq!(lines.next_line(), None);
        assert_eq!(lines.into_rest(), b"RCPT");
    }

    #[test]
    fn oversized_line_is_dropped_to_its_end() {
        let mut lines = LineBuffer::new(DEFAULT_MAX_LINE_LENGTH);
        lines.push(&vec![b'x'; DEFAULT_MAX_LINE_LENGTH + 1]);
        assert_eq!(lines.next_line(), None);
        assert!(lines.buffer.is_empty());
        lines.push(b"xxxx\r\nNOOP\r\n");
        assert_eq!(lines.next_line(), Some(Line::TooLong));
        assert_eq!(
            lines.next_line(),
            Some(Line::Complete(b"NOOP\r\n".to_vec()))
        );
    }

    #[test]
    fn discards_a_refused_chunk() {
        let mut lines = LineBuffer::new(DEFAULT_MAX_LINE_LENGTH);
        lines.discard(5);
        lines.push(b"ab");
        assert_eq!(lines.next_line(), None);
        lines.push(b"cdeNOOP\r\n");
        assert_eq!(
            lines.next_line(),
            Some(Line::Complete(b"NOOP\r\n".to_vec()))
        );
    }
}
