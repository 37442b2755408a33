//! After login with `forward_client: xclient`: the client's own `XCLIENT` and `XFORWARD` never
//! reach the upstream, which trusts mailgate's address for them (Postfix
//! `smtpd_authorized_xclient_hosts`) and would take the client's word for its name and address.
//!
//! [`XclientFilter`] wraps the client stream of the splice. Its reads (client to upstream)
//! follow command lines outside DATA and BDAT content and drop those two commands; its writes
//! (upstream to client) count the upstream's replies and put `502 5.5.1` where the dropped
//! command's reply belongs: RFC 2920 3 has replies come in the order of the commands, so the
//! refusal waits for the replies to every command passed on before it. Other modes splice the
//! bare stream.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The reply in place of a dropped command (RFC 5321 4.2.4: not implemented).
const REFUSAL: &[u8] = b"502 5.5.1 Command not implemented\r\n";
/// Bytes of a command line looked at: its verb, or all of a `BDAT size LAST` line. A line whose
/// verb has not ended by then is no command a server knows, and is refused like XCLIENT.
const HEAD_MAX: usize = 64;
/// Refusals waiting for earlier replies; past this, the client is not read until they are sent
/// (a client piling up refusals while the upstream is slow must not grow memory).
const MAX_WAITING_REFUSALS: usize = 64;

/// Where the client's byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// At the start of a command line, or inside one that is passed on.
    Command { in_line: bool },
    /// Inside a refused line: dropped up to its end.
    Dropping,
    /// After DATA: nothing more is read until the upstream's reply number `reply` says whether
    /// content follows (RFC 5321 4.1.1.4: only after 354).
    AwaitingData { reply: u64 },
    /// Message content, up to the line `.`.
    Content { line: ContentLine },
    /// A BDAT chunk (RFC 3030 2): this many bytes of content, whatever they hold.
    Chunk { left: u64 },
}

/// How much of the current content line could still be the end of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentLine {
    Start,
    /// `.` and nothing but CRs after it so far.
    Dot,
    Other,
}

/// Blanks as Postfix's tokenizer sees them (ISSPACE but LF, which ends the line): before a
/// verb and after it.
fn is_blank(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | 0x0b | 0x0c)
}

/// What the next bytes at a line start are.
enum Verdict {
    /// The line's verb has not ended yet: wait for more bytes.
    Undecided,
    Refuse,
    Pass(Kind),
}

/// What a command passed on leads to once its line ends.
#[derive(Clone, Copy)]
enum Kind {
    Plain,
    Data,
    Bdat(u64),
}

/// The client-to-upstream scanner; no I/O.
struct Commands {
    mode: Mode,
    /// Whether the upstream offers CHUNKING: only then does it read a BDAT chunk as content
    /// (an upstream without it would take the chunk for commands, and so must mailgate).
    chunking: bool,
    /// Replies the upstream owes for the commands passed on so far.
    due: u64,
    /// The kind of the line passed on now.
    kind: Kind,
}

/// One pass of [`Commands::filter`] over some input.
#[derive(Debug, PartialEq, Eq)]
struct Filtered {
    /// Bytes passed on, moved to the front of the input.
    kept: usize,
    /// Bytes dealt with; the rest must be offered again (with more after it, or once DATA's
    /// reply is known).
    consumed: usize,
}

impl Commands {
    fn new(chunking: bool) -> Self {
        Self {
            mode: Mode::Command { in_line: false },
            chunking,
            due: 0,
            kind: Kind::Plain,
        }
    }

    /// Filters `data` in place; each dropped command adds the number of replies that must
    /// precede its refusal to `refusals`.
    fn filter(&mut self, data: &mut [u8], refusals: &mut VecDeque<u64>) -> Filtered {
        let (mut read, mut kept) = (0, 0);
        while read < data.len() {
            let rest = &data[read..];
            let (take, keep) = match self.mode {
                Mode::AwaitingData { .. } => break,
                // Enough refusals wait: the rest is read once they are sent.
                Mode::Command { in_line: false } if refusals.len() >= MAX_WAITING_REFUSALS => break,
                Mode::Command { in_line: false } => match self.verdict(rest) {
                    Verdict::Undecided => break,
                    Verdict::Refuse => {
                        self.mode = Mode::Dropping;
                        (0, false)
                    }
                    Verdict::Pass(kind) => {
                        self.kind = kind;
                        self.mode = Mode::Command { in_line: true };
                        (0, true)
                    }
                },
                Mode::Command { in_line: true } => match line_end(rest) {
                    Some(end) => {
                        self.end_command();
                        (end, true)
                    }
                    None => (rest.len(), true),
                },
                Mode::Dropping => match line_end(rest) {
                    Some(end) => {
                        refusals.push_back(self.due);
                        self.mode = Mode::Command { in_line: false };
                        (end, false)
                    }
                    None => (rest.len(), false),
                },
                Mode::Content { .. } => (self.content(rest), true),
                Mode::Chunk { left } => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    let left = left - take as u64;
                    self.mode = if left == 0 {
                        Mode::Command { in_line: false }
                    } else {
                        Mode::Chunk { left }
                    };
                    (take, true)
                }
            };
            if keep {
                data.copy_within(read..read + take, kept);
                kept += take;
            }
            read += take;
        }
        Filtered {
            kept,
            consumed: read,
        }
    }

    /// At a line start: whether its verb is XCLIENT or XFORWARD, or STARTTLS (TLS from the
    /// client straight to the upstream would hide every later line from this filter, and
    /// the upstream forgets the login at STARTTLS). Leading blanks are skipped, as Postfix's
    /// tokenizer does.
    fn verdict(&self, rest: &[u8]) -> Verdict {
        let head = &rest[..rest.len().min(HEAD_MAX)];
        let start = head
            .iter()
            .position(|&b| !is_blank(b))
            .unwrap_or(head.len());
        let Some(length) = head[start..]
            .iter()
            .position(|&b| is_blank(b) || b == b'\n')
        else {
            return if rest.len() >= HEAD_MAX {
                Verdict::Refuse
            } else {
                Verdict::Undecided
            };
        };
        let verb = &head[start..start + length];
        let is = |name: &str| verb.eq_ignore_ascii_case(name.as_bytes());
        if is("XCLIENT") || is("XFORWARD") || is("STARTTLS") {
            Verdict::Refuse
        } else if is("DATA") {
            Verdict::Pass(Kind::Data)
        } else if is("BDAT") && self.chunking {
            match head.iter().position(|&b| b == b'\n') {
                Some(end) => Verdict::Pass(bdat_size(&head[..end]).map_or(Kind::Plain, Kind::Bdat)),
                // Longer than any BDAT line: the upstream cannot take it for one either.
                None if rest.len() >= HEAD_MAX => Verdict::Pass(Kind::Plain),
                None => Verdict::Undecided,
            }
        } else {
            Verdict::Pass(Kind::Plain)
        }
    }

    /// A command line passed on has ended: one reply is owed for it.
    fn end_command(&mut self) {
        self.due += 1;
        self.mode = match self.kind {
            Kind::Plain => Mode::Command { in_line: false },
            Kind::Data => Mode::AwaitingData { reply: self.due },
            Kind::Bdat(0) => Mode::Command { in_line: false },
            Kind::Bdat(size) => Mode::Chunk { left: size },
        };
    }

    /// Message content up to and including the line `.` (RFC 5321 4.1.1.4; like Postfix,
    /// lines end at LF and every CR before it is dropped, so `.\r\r\n` ends it too); returns
    /// the bytes taken.
    fn content(&mut self, rest: &[u8]) -> usize {
        let Mode::Content { mut line } = self.mode else {
            return 0;
        };
        for (i, &byte) in rest.iter().enumerate() {
            line = match (line, byte) {
                (ContentLine::Dot, b'\n') => {
                    // The message's own reply.
                    self.due += 1;
                    self.mode = Mode::Command { in_line: false };
                    return i + 1;
                }
                (_, b'\n') => ContentLine::Start,
                (ContentLine::Start, b'.') | (ContentLine::Dot, b'\r') => ContentLine::Dot,
                _ => ContentLine::Other,
            };
        }
        self.mode = Mode::Content { line };
        rest.len()
    }

    /// The upstream's reply to DATA has come: content follows only after a 3xx.
    fn data_reply(&mut self, number: u64, code: u8) -> bool {
        if self.mode != (Mode::AwaitingData { reply: number }) {
            return false;
        }
        self.mode = if code == b'3' {
            Mode::Content {
                line: ContentLine::Start,
            }
        } else {
            Mode::Command { in_line: false }
        };
        true
    }
}

/// The offset just past the first LF in `bytes`.
fn line_end(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n').map(|i| i + 1)
}

/// The chunk size of a well-formed `BDAT size [LAST]` line (RFC 3030 4); anything else is
/// left to the upstream as a plain command, whose reply comes at once.
fn bdat_size(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_ascii_whitespace();
    words.next()?;
    let size = words.next()?;
    let last = words.next();
    if words.next().is_some() || last.is_some_and(|last| !last.eq_ignore_ascii_case("LAST")) {
        return None;
    }
    if !size.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Postfix reads the size into an off_t: a larger one is a syntax error to it, and what
    // follows is read as commands.
    size.parse::<i64>()
        .ok()
        .and_then(|size| u64::try_from(size).ok())
}

/// The upstream-to-client side: counts complete replies (RFC 5321 4.2.1: a reply ends with a
/// line whose code is not followed by `-`).
#[derive(Clone, Copy, Default)]
struct Replies {
    /// Complete replies written to the client.
    seen: u64,
    /// The current line's position and its first four bytes, as far as seen.
    line: [u8; 4],
    len: usize,
    /// The code's first digit of the reply under way.
    code: Option<u8>,
}

impl Replies {
    /// Follows `bytes`; calls `done(number, first digit, closing)` for each reply that ends in
    /// them, `closing` for a 421 (RFC 5321 3.8: the server closes the channel after it).
    fn observe(&mut self, bytes: &[u8], mut done: impl FnMut(u64, u8, bool)) {
        for &byte in bytes {
            if byte == b'\n' {
                let last = self.len < 4 || self.line[3] != b'-';
                if last {
                    self.seen += 1;
                    let closing = self.len >= 3 && self.line[..3] == *b"421";
                    done(self.seen, self.code.take().unwrap_or(b'0'), closing);
                }
                self.len = 0;
                continue;
            }
            if self.len == 0 && self.code.is_none() {
                self.code = Some(byte);
            }
            if self.len < 4 {
                self.line[self.len] = byte;
            }
            self.len += 1;
        }
    }

    /// The offset in `bytes` just past the end of reply number `number`, if it ends there.
    fn end_of(&self, bytes: &[u8], number: u64) -> Option<usize> {
        let mut probe = *self;
        let mut end = None;
        let mut offset = 0;
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            offset += line.len();
            probe.observe(line, |seen, _, _| {
                if seen == number {
                    end = Some(offset);
                }
            });
            if end.is_some() {
                return end;
            }
        }
        None
    }
}

/// The client stream of an `xclient` session; see the module documentation.
pub struct XclientFilter<S> {
    inner: S,
    commands: Commands,
    replies: Replies,
    /// Client bytes read but not yet passed on: a line start whose verb is incomplete, or what
    /// came after DATA before its reply. Empty (unallocated) in the steady state.
    held: Vec<u8>,
    /// For each refusal not yet sent, how many replies must reach the client before it.
    refusals: VecDeque<u64>,
    /// Refusals on their way to the client, and how much of them is written.
    out: Vec<u8>,
    out_written: usize,
    /// The reader, parked while DATA's reply or the refusals are awaited.
    reader: Option<Waker>,
    /// A 421 went to the client: nothing may follow it, refusals included.
    closed: bool,
}

impl<S> XclientFilter<S> {
    /// `chunking`: whether the upstream offers CHUNKING (BDAT).
    pub fn new(inner: S, chunking: bool) -> Self {
        Self {
            inner,
            commands: Commands::new(chunking),
            replies: Replies::default(),
            held: Vec::new(),
            refusals: VecDeque::new(),
            out: Vec::new(),
            out_written: 0,
            reader: None,
            closed: false,
        }
    }

    /// Whether reading the client waits: for DATA's reply, or for refusals to go out.
    fn paused(&self) -> bool {
        matches!(self.commands.mode, Mode::AwaitingData { .. })
            || self.refusals.len() >= MAX_WAITING_REFUSALS
    }

    fn wake_reader(&mut self) {
        if let Some(waker) = self.reader.take() {
            waker.wake();
        }
    }
}

impl<S: AsyncWrite + Unpin> XclientFilter<S> {
    /// Sends every refusal that is due (all replies before it are out) and flushes them.
    fn poll_refusals(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed {
            self.refusals.clear();
        }
        while self
            .refusals
            .front()
            .is_some_and(|&number| number <= self.replies.seen)
        {
            self.refusals.pop_front();
            self.out.extend_from_slice(REFUSAL);
            self.wake_reader();
        }
        if self.out.is_empty() {
            return Poll::Ready(Ok(()));
        }
        while self.out_written < self.out.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_written += n;
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.out = Vec::new();
        self.out_written = 0;
        Poll::Ready(Ok(()))
    }

    /// Runs the scanner over `held` into `buf`; `None` when it needs more input first.
    fn filter_held(&mut self, buf: &mut ReadBuf<'_>) -> Option<()> {
        let room = buf.remaining().min(self.held.len());
        let filtered = self
            .commands
            .filter(&mut self.held[..room], &mut self.refusals);
        buf.put_slice(&self.held[..filtered.kept]);
        self.held.drain(..filtered.consumed);
        if self.held.is_empty() {
            self.held = Vec::new();
        }
        (filtered.kept > 0 || filtered.consumed > 0).then_some(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for XclientFilter<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.poll_refusals(cx))?;
            if this.paused() {
                this.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let before = buf.filled().len();
            if !this.held.is_empty() && this.filter_held(buf).is_some() {
                if buf.filled().len() > before {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // Either nothing is held, or a line start that needs more bytes after it.
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let read = buf.filled().len() - before;
            if read == 0 {
                // EOF; an unfinished line start is dropped with it.
                return Poll::Ready(Ok(()));
            }
            if !this.held.is_empty() {
                this.held.extend_from_slice(&buf.filled()[before..]);
                buf.set_filled(before);
                continue;
            }
            let data = &mut buf.filled_mut()[before..];
            let filtered = this.commands.filter(data, &mut this.refusals);
            this.held.extend_from_slice(&data[filtered.consumed..]);
            buf.set_filled(before + filtered.kept);
            if filtered.kept > 0 {
                // A refusal due now goes out without waiting for the next read.
                if let Poll::Ready(Err(error)) = this.poll_refusals(cx) {
                    return Poll::Ready(Err(error));
                }
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for XclientFilter<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_refusals(cx))?;
        // Up to the reply after which the next refusal goes.
        let limit = this
            .refusals
            .front()
            .and_then(|&number| this.replies.end_of(buf, number))
            .unwrap_or(buf.len());
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..limit]))?;
        let (commands, reader, closed) = (&mut this.commands, &mut this.reader, &mut this.closed);
        this.replies.observe(&buf[..n], |number, code, closing| {
            *closed |= closing;
            if commands.data_reply(number, code)
                && let Some(waker) = reader.take()
            {
                waker.wake();
            }
        });
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_refusals(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_refusals(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
