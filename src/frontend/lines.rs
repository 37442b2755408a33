//! Framing client bytes into lines for the line-based protocols (SMTP, POP3): each line up to
//! and including its LF, a line over the limit reported once and dropped to its LF, and bytes
//! the dialogue says to skip (a refused SMTP BDAT chunk) thrown away unread.

/// One framed client line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// Up to and including the LF.
    Complete(Vec<u8>),
    /// A line longer than the limit, already discarded up to its LF.
    TooLong,
}

/// Client bytes not yet framed, holding at most one line's limit (plus the last read) at once.
#[derive(Debug)]
pub struct LineBuffer {
    buffer: Vec<u8>,
    max_line: usize,
    /// The line being read passed the limit: what comes up to its LF is dropped.
    overflowing: bool,
    /// Bytes still to be thrown away before the next line.
    skip: usize,
}

impl LineBuffer {
    /// A framer for lines of at most `max_line` bytes, LF included.
    pub fn new(max_line: usize) -> Self {
        Self {
            buffer: Vec::new(),
            max_line,
            overflowing: false,
            skip: 0,
        }
    }

    /// The longest line taken, LF included.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Takes bytes read from the client.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes taken but not yet framed.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Throws the next `bytes` bytes away, whenever they arrive.
    pub fn discard(&mut self, bytes: usize) {
        self.skip = self.skip.saturating_add(bytes);
    }

    /// The next line; `None` until one has arrived whole (or, too long, to its LF).
    pub fn next_line(&mut self) -> Option<Line> {
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
    pub fn into_rest(self) -> Vec<u8> {
        self.buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64;

    #[test]
    fn frames_lines_and_keeps_the_rest() {
        let mut lines = LineBuffer::new(MAX);
        lines.push(b"NOOP\r\nUSER a\nPA");
        assert_eq!(
            lines.next_line(),
            Some(Line::Complete(b"NOOP\r\n".to_vec()))
        );
        assert_eq!(
            lines.next_line(),
            Some(Line::Complete(b"USER a\n".to_vec()))
        );
        assert_eq!(lines.next_line(), None);
        assert_eq!(lines.buffered(), 2);
        assert_eq!(lines.into_rest(), b"PA");
    }

    #[test]
    fn an_oversized_line_is_reported_once_and_dropped_to_its_end() {
        let mut lines = LineBuffer::new(MAX);
        lines.push(&[b'x'; MAX + 1]);
        assert_eq!(lines.next_line(), None);
        assert_eq!(lines.buffered(), 0);
        lines.push(b"xxxx\r\nNOOP\r\n");
        assert_eq!(lines.next_line(), Some(Line::TooLong));
        assert_eq!(
            lines.next_line(),
            Some(Line::Complete(b"NOOP\r\n".to_vec()))
        );
        let mut whole = LineBuffer::new(4);
        whole.push(b"ABCD\r\n");
        assert_eq!(whole.next_line(), Some(Line::TooLong));
    }

    #[test]
    fn discards_a_counted_chunk() {
        let mut lines = LineBuffer::new(MAX);
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
