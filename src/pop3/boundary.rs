//! Where a POP3 server's byte stream is between two responses, so that mailgate's own `-ERR`
//! may follow without landing inside one. Whether a response is multi-line depends on the
//! command it answers (RFC 1939 3), so the commands are followed too; with PIPELINING
//! (RFC 2449 6.6) several may be owed at once, answered in order.

use std::collections::VecDeque;

use crate::splice::Boundary;

/// How much of a command line is kept to classify it: the longest keyword (4), a space, and
/// enough to see whether an argument follows.
const COMMAND_HEAD: usize = 16;

/// Responses owed before the boundary stops being followed: a client pipelining more than
/// this is never at a boundary again (its session just closes on a stop), and the queue
/// stays bounded whatever it sends.
const MAX_OWED: usize = 4096;

/// Whether a response may continue past its status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One status line.
    Single,
    /// RFC 1939 3: after `+OK`, lines up to one holding only `.`; after `-ERR`, nothing.
    MultiLine,
}

/// Follows both directions after login, line by line.
#[derive(Debug, Default)]
pub struct ResponseBoundary {
    /// The start of the command line being read.
    command: Vec<u8>,
    /// Shapes of the responses owed, in the order the commands were sent.
    owed: VecDeque<Shape>,
    /// Too many commands pipelined to keep track.
    lost: bool,
    /// The start of the response line being read (up to 3 bytes, enough for `.\r\n`), and
    /// its length so far; `None` between lines.
    line: Option<([u8; 3], usize)>,
    /// Inside a multi-line response's body.
    in_body: bool,
}

impl ResponseBoundary {
    /// A command line has ended: note the response it will get.
    fn command_ended(&mut self) {
        let line = std::mem::take(&mut self.command);
        if self.owed.len() >= MAX_OWED {
            self.lost = true;
            return;
        }
        self.owed.push_back(shape(&line));
    }

    /// A response line has ended; `head` holds its first bytes, `len` its length.
    fn line_ended(&mut self, head: [u8; 3], len: usize) {
        if self.in_body {
            // Byte-stuffed lines start `..`; only `.` alone ends the body.
            let end = matches!(
                (len, &head),
                (2, [b'.', b'\n', _]) | (3, [b'.', b'\r', b'\n'])
            );
            self.in_body = !end;
        } else {
            // A line nobody asked for (none owed) is taken as a single-line response.
            let shape = self.owed.pop_front().unwrap_or(Shape::Single);
            self.in_body = shape == Shape::MultiLine && head[0] == b'+';
        }
    }
}

/// RFC 1939 5 and 7: RETR, TOP, and LIST and UIDL without an argument answer in several
/// lines; so do CAPA (RFC 2449 5) and LANG without an argument (RFC 6856 3).
fn shape(line: &[u8]) -> Shape {
    let line = line.trim_ascii_end();
    let (keyword, has_argument) = match line.iter().position(|&b| b == b' ') {
        Some(space) => (&line[..space], !line[space..].trim_ascii().is_empty()),
        None => (line, false),
    };
    let keyword = keyword.to_ascii_uppercase();
    match (keyword.as_slice(), has_argument) {
        (b"RETR" | b"TOP" | b"CAPA", _) | (b"LIST" | b"UIDL" | b"LANG", false) => Shape::MultiLine,
        _ => Shape::Single,
    }
}

impl Boundary for ResponseBoundary {
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\n');
            let piece = &bytes[..end.map_or(bytes.len(), |end| end + 1)];
            let (mut head, mut len) = self.line.take().unwrap_or(([0; 3], 0));
            for (index, &byte) in piece.iter().enumerate().take(3usize.saturating_sub(len)) {
                head[len + index] = byte;
            }
            len = len.saturating_add(piece.len());
            if end.is_some() {
                self.line_ended(head, len);
            } else {
                self.line = Some((head, len));
            }
            bytes = &bytes[piece.len()..];
        }
    }

    fn at_boundary(&self) -> bool {
        !self.lost && self.owed.is_empty() && self.line.is_none() && !self.in_body
    }

    fn observe_request(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\n');
            let piece = &bytes[..end.unwrap_or(bytes.len())];
            let room = COMMAND_HEAD.saturating_sub(self.command.len());
            self.command
                .extend_from_slice(&piece[..room.min(piece.len())]);
            match end {
                Some(end) => {
                    self.command_ended();
                    bytes = &bytes[end + 1..];
                }
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `commands`, then shows the server's `chunks`; whether it ends at a boundary.
    fn after(commands: &[&[u8]], chunks: &[&[u8]]) -> bool {
        let mut boundary = ResponseBoundary::default();
        for command in commands {
            boundary.observe_request(command);
        }
        for chunk in chunks {
            boundary.observe(chunk);
        }
        boundary.at_boundary()
    }

    #[test]
    fn single_line_responses() {
        assert!(after(&[], &[]));
        assert!(!after(&[b"STAT\r\n"], &[]));
        assert!(!after(&[b"STAT\r\n"], &[b"+OK 2 3"]));
        assert!(after(&[b"STAT\r\n"], &[b"+OK 2 320\r\n"]));
        assert!(after(&[b"LIST 1\r\n"], &[b"+OK 1 120\r\n"]));
        assert!(after(&[b"UIDL 1\r\n"], &[b"+OK 1 abc\r\n"]));
        assert!(after(&[b"DELE 1\r\n", b"NOOP\r\n"], &[b"+OK\r\n+OK\r\n"]));
    }

    #[test]
    fn multi_line_responses_end_with_a_lone_dot() {
        let retr: &[&[u8]] = &[b"RETR 1\r\n"];
        assert!(!after(retr, &[b"+OK 5 octets\r\nhello\r\n"]));
        assert!(!after(retr, &[b"+OK\r\n..\r\n.. not the end\r\n"]));
        assert!(!after(retr, &[b"+OK\r\n.x\r\n"]));
        assert!(after(retr, &[b"+OK\r\nhello\r\n.\r\n"]));
        assert!(after(retr, &[b"+", b"OK\r\nhel", b"lo\r\n.", b"\r", b"\n"]));
        assert!(after(&[b"list\r\n"], &[b"+OK\r\n1 120\r\n.\r\n"]));
        assert!(after(&[b"CAPA\r\n"], &[b"+OK\r\nTOP\r\n.\r\n"]));
        assert!(!after(&[b"TOP 1 0\r\n"], &[b"+OK\r\n"]));
    }

    #[test]
    fn an_error_is_always_single_line() {
        assert!(after(&[b"RETR 9\r\n"], &[b"-ERR no such message\r\n"]));
        assert!(after(&[b"UIDL\r\n"], &[b"-ERR [SYS/TEMP] later\r\n"]));
    }

    #[test]
    fn pipelined_commands_are_answered_in_order() {
        let commands: &[&[u8]] = &[b"STAT\r\nRETR 1\r\nLI", b"ST\r\nQUIT\r\n"];
        assert!(!after(commands, &[b"+OK 1 5\r\n+OK\r\nhi\r\n.\r\n"]));
        assert!(!after(
            commands,
            &[b"+OK 1 5\r\n+OK\r\nhi\r\n.\r\n+OK\r\n1 5\r\n.\r\n"]
        ));
        assert!(after(
            commands,
            &[b"+OK 1 5\r\n+OK\r\nhi\r\n.\r\n+OK\r\n1 5\r\n.\r\n+OK bye\r\n"]
        ));
    }

    #[test]
    fn a_flood_of_pipelined_commands_is_never_at_a_boundary() {
        let flood = b"NOOP\r\n".repeat(MAX_OWED + 1);
        let answers = b"+OK\r\n".repeat(MAX_OWED + 1);
        assert!(!after(&[&flood], &[&answers]));
    }
}
