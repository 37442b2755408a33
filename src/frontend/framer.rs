//! Framing messages of lines plus literals (IMAP, ManageSieve) with imap-codec's
//! `Fragmentizer`, while keeping an exact account of the bytes it has not consumed yet so they
//! can be handed on.

use std::io;

use imap_codec::fragmentizer::{FragmentInfo, Fragmentizer, LiteralAnnouncement};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read from the peer per read call. Reads happen only when the `Fragmentizer` has consumed
/// everything, so this also bounds what [`Framer`] holds besides the current message.
const READ_CHUNK: usize = 4096;

/// A `Fragmentizer` plus a mirror of its private unparsed buffer.
///
/// The `Fragmentizer` never gives back bytes it has not parsed; once a login completes, those
/// bytes belong to the upstream. Fragment end indices count every byte of the message, even
/// bytes dropped beyond the size limit, so the mirror stays exact.
pub(crate) struct Framer {
    fragmentizer: Fragmentizer,
    /// The bytes enqueued in the `Fragmentizer` that it has not consumed yet.
    unparsed: Vec<u8>,
    /// How many bytes of the current message the `Fragmentizer` has consumed.
    message_position: usize,
}

/// What a client may send in one message before login: its longest line and literal, and
/// both together (the listener's `max_line_length` and `max_literal_size`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientLimits {
    pub(crate) max_line: usize,
    pub(crate) max_literal: usize,
}

impl ClientLimits {
    pub(crate) fn max_message(self) -> usize {
        self.max_line.saturating_add(self.max_literal)
    }
}

/// The next thing a client's message holds, judged against its [`ClientLimits`].
#[derive(Debug)]
pub(crate) enum Framed {
    /// A literal announced at the end of a line; `fits` when neither it, nor the line before
    /// it, nor the message so far passes a limit. The protocol decides what comes next.
    Literal {
        announcement: LiteralAnnouncement,
        fits: bool,
    },
    /// A complete message; `refused` when its last line, a literal or the whole passed a
    /// limit (or the message was marked with [`Framer::poison_message`]).
    Message { refused: bool },
}

impl Framer {
    /// A framer for a client's messages: one holds at most `limits.max_message()` bytes (the
    /// limits are validated to fit in a `u32`).
    pub(crate) fn for_client(limits: ClientLimits) -> Self {
        Self::new(u32::try_from(limits.max_message()).unwrap_or(u32::MAX))
    }

    /// The next literal announcement or complete message from bytes already received; `None`
    /// when more bytes are needed.
    pub(crate) fn next_framed(&mut self, limits: ClientLimits) -> Option<Framed> {
        loop {
            let fragment = self.progress()?;
            let line_too_long = matches!(fragment, FragmentInfo::Line { .. })
                && fragment.range().len() > limits.max_line;
            if let FragmentInfo::Line {
                announcement: Some(announcement),
                ..
            } = fragment
            {
                let length = announcement.length as usize;
                let fits = !line_too_long
                    && length <= limits.max_literal
                    && self.message_len().saturating_add(length) <= limits.max_message();
                return Some(Framed::Literal { announcement, fits });
            }
            if self.fragmentizer.is_message_complete() {
                let refused = line_too_long
                    || self.fragmentizer.is_message_poisoned()
                    || self.fragmentizer.is_max_message_size_exceeded();
                return Some(Framed::Message { refused });
            }
        }
    }

    pub(crate) fn new(max_message_size: u32) -> Self {
        Self {
            fragmentizer: Fragmentizer::new(max_message_size),
            unparsed: Vec::new(),
            message_position: 0,
        }
    }

    /// The next fragment from bytes already received, or `None` when more bytes are needed.
    pub(crate) fn progress(&mut self) -> Option<FragmentInfo> {
        if self.fragmentizer.is_message_complete() {
            self.message_position = 0;
        }
        match self.fragmentizer.progress() {
            // A fragment that is not complete yet consumes every enqueued byte.
            None => {
                self.message_position += self.unparsed.len();
                self.unparsed.clear();
                None
            }
            Some(fragment) => {
                let end = fragment.range().end;
                let consumed = end.saturating_sub(self.message_position);
                self.unparsed.drain(..consumed.min(self.unparsed.len()));
                self.message_position = end;
                Some(fragment)
            }
        }
    }

    /// Reads once from `reader` and enqueues what arrived. `Ok(false)` means end of stream.
    ///
    /// # Errors
    /// Whatever the read returns.
    pub(crate) async fn fill<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> io::Result<bool> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = reader.read(&mut chunk).await?;
        self.enqueue(&chunk[..n]);
        Ok(n > 0)
    }

    pub(crate) fn enqueue(&mut self, bytes: &[u8]) {
        self.fragmentizer.enqueue_bytes(bytes);
        self.unparsed.extend_from_slice(bytes);
    }

    /// Bytes received and not yet framed.
    pub(crate) fn buffered(&self) -> usize {
        self.unparsed.len()
    }

    /// Bytes of the current message so far, including any dropped beyond the size limit.
    pub(crate) fn message_len(&self) -> usize {
        self.message_position
    }

    /// Drops the rest of the current message; only safe after refusing a synchronizing
    /// literal, whose bytes the peer will then not send.
    pub(crate) fn skip_message(&mut self) {
        self.fragmentizer.skip_message();
        self.message_position = 0;
    }

    /// Marks the current message as refused once complete.
    pub(crate) fn poison_message(&mut self) {
        self.fragmentizer.poison_message();
    }

    pub(crate) fn fragmentizer(&self) -> &Fragmentizer {
        &self.fragmentizer
    }

    /// The bytes received after the last framed fragment.
    pub(crate) fn into_unparsed(self) -> Vec<u8> {
        self.unparsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_all(framer: &mut Framer) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        while framer.progress().is_some() {
            if framer.fragmentizer().is_message_complete() {
                messages.push(framer.fragmentizer().message_bytes().to_vec());
            }
        }
        messages
    }

    #[test]
    fn unparsed_bytes_follow_the_last_message() {
        let mut framer = Framer::new(64);
        framer.enqueue(b"a LOGIN {1+}\r\nu p\r\nb SELECT INBOX\r\n");
        assert!(framer.progress().is_some());
        assert!(framer.progress().is_some());
        assert!(framer.progress().is_some());
        assert!(framer.fragmentizer().is_message_complete());
        assert_eq!(framer.into_unparsed(), b"b SELECT INBOX\r\n");
    }

    #[test]
    fn partial_lines_and_oversized_messages_keep_the_count() {
        let mut framer = Framer::new(8);
        framer.enqueue(b"a NOOP and more");
        assert!(framer.progress().is_none());
        framer.enqueue(b" text\r\nb NOOP\r\nc");
        let messages = frame_all(&mut framer);
        assert_eq!(messages, [b"a NOOP a".to_vec(), b"b NOOP\r\n".to_vec()]);
        assert_eq!(framer.into_unparsed(), b"");
    }

    #[test]
    fn skipped_literal_restarts_at_the_next_line() {
        let mut framer = Framer::new(16);
        framer.enqueue(b"a LOGIN {999}\r\nb NOOP\r\nc");
        assert!(framer.progress().is_some());
        assert!(!framer.fragmentizer().is_message_complete());
        framer.skip_message();
        assert!(framer.progress().is_some());
        assert_eq!(framer.fragmentizer().message_bytes(), b"b NOOP\r\n");
        assert!(framer.progress().is_none());
        assert_eq!(framer.message_len(), 1);
    }
}
