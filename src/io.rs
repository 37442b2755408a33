//! Stream plumbing: a boxed stream type (so STARTTLS can swap what is underneath),
//! [`PrefixedIo`], which replays bytes already read before the stream's own, writes with a
//! deadline, and the lingering close that lets a goodbye arrive.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};

/// How long a closing connection keeps reading what the client still sends. A client that
/// reads its goodbye closes within a round trip; this bounds the rest (nginx lingers 5 s per
/// read, 30 s in all, for HTTP bodies far larger than a pipeline of mail commands).
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// How much of it is read and thrown away: more than a client pipelines before it reads
/// (RFC 2920 5: about one TCP window), little enough that a sender cannot keep mailgate busy.
pub const LINGER_MAX_BYTES: usize = 256 * 1024;

/// How many connections may linger at once, in the whole process. Each holds a descriptor for
/// up to [`LINGER_TIMEOUT`]: uncapped, one address refused in a loop would hold its connect rate
/// times that, and run mailgate out of descriptors. Past the cap a connection closes at once,
/// so only a flood risks a goodbye cut short; a few hundred covers ordinary bursts of refusals
/// and evictions with little of a typical 1,024-descriptor limit.
pub const MAX_LINGERING: usize = 256;
static LINGERING: Semaphore = Semaphore::const_new(MAX_LINGERING);

/// Any duplex byte stream a session can run over: TCP, TLS over TCP, or an in-memory pipe in tests.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub type BoxedIo = Box<dyn Io>;

/// Bytes read from a peer at once by [`read_more`].
const READ_CHUNK: usize = 4096;

/// `io`, replaying `read_ahead` first: what a login read from the upstream past its last
/// answer belongs to the client.
pub fn replaying(read_ahead: Vec<u8>, io: BoxedIo) -> BoxedIo {
    if read_ahead.is_empty() {
        io
    } else {
        Box::new(PrefixedIo::new(read_ahead, io))
    }
}

/// Reads once from `io` and appends what arrived to `buffer`.
///
/// # Errors
/// The read fails, or `UnexpectedEof` when the peer closed the connection.
pub async fn read_more(io: &mut BoxedIo, buffer: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; READ_CHUNK];
    let n = io.read(&mut chunk).await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        ));
    }
    buffer.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Writes all of `bytes` and flushes, giving up at `deadline`, so that a peer that never reads
/// cannot hold a session (and its slot) forever.
///
/// # Errors
/// The write fails, or `TimedOut` when the deadline passes first.
pub async fn write_all_by<S: AsyncWrite + Unpin + ?Sized>(
    io: &mut S,
    bytes: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    let write = async {
        io.write_all(bytes).await?;
        io.flush().await
    };
    timeout_at(deadline, write)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer does not read"))?
}

/// Ends a connection whose goodbye was just written, as nginx's `lingering_close` does: shuts
/// down writing (the FIN follows the goodbye), then reads and discards what the client still
/// sends until it closes too, [`LINGER_TIMEOUT`] passes or [`LINGER_MAX_BYTES`] were read. The
/// caller drops the stream afterwards. Closing at once with client input unread makes the
/// kernel reset the connection, and the reset throws away the part of the goodbye the client
/// has not received yet. Returns at once, for the caller to close, while [`MAX_LINGERING`]
/// other connections linger.
pub async fn linger<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(io: &mut S) {
    let Ok(_lingering) = LINGERING.try_acquire() else {
        return;
    };
    let drain = async {
        if io.shutdown().await.is_err() {
            return;
        }
        let mut discard = [0u8; 4096];
        let mut left = LINGER_MAX_BYTES;
        while left > 0 {
            match io.read(&mut discard).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = timeout_at(Instant::now() + LINGER_TIMEOUT, drain).await;
}

/// Ends a session with its last words: writes `goodbye` (a refusal, `* BYE`, `LOGOUT`,
/// `QUIT`) within `timeout`, then [`linger`]s, so that the peer reads it and closes first (a
/// server then logs a clean logout rather than a dropped connection). No answer is read; a
/// peer that does not take the goodbye is just closed.
pub async fn say_goodbye<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    io: &mut S,
    goodbye: &[u8],
    timeout: Duration,
) {
    if write_all_by(io, goodbye, Instant::now() + timeout)
        .await
        .is_ok()
    {
        linger(io).await;
    }
}

/// A stream whose first reads return `prefix`, then the inner stream's bytes.
///
/// Front ends read ahead of the login command; whatever the client pipelined after it
/// belongs to the upstream and is replayed from here. The prefix is freed once consumed.
pub struct PrefixedIo<S> {
    prefix: Vec<u8>,
    position: usize,
    inner: S,
}

impl<S> PrefixedIo<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            position: 0,
            inner,
        }
    }

    /// True once every prefixed byte has been read.
    pub fn prefix_consumed(&self) -> bool {
        self.position >= self.prefix.len()
    }

    pub fn into_parts(self) -> (Vec<u8>, S) {
        let mut prefix = self.prefix;
        prefix.drain(..self.position);
        (prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix_consumed() {
            let remaining = &this.prefix[this.position..];
            let n = remaining.len().min(buf.remaining());
            buf.put_slice(&remaining[..n]);
            this.position += n;
            if this.prefix_consumed() {
                this.prefix = Vec::new();
                this.position = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn replays_prefix_then_inner() {
        let (mut near, far) = tokio::io::duplex(64);
        near.write_all(b" world").await.unwrap();
        drop(near);
        let mut io = PrefixedIo::new(b"hello".to_vec(), far);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }

    #[tokio::test(start_paused = true)]
    async fn lingering_sends_the_end_and_stops_at_the_peers_close_or_the_bounds() {
        // The peer closes after reading: the linger ends with it.
        let (mut near, mut far) = tokio::io::duplex(64);
        far.write_all(b"unread").await.unwrap();
        let peer = tokio::spawn(async move {
            let mut said = Vec::new();
            far.read_to_end(&mut said).await.unwrap();
            said
        });
        near.write_all(b"* BYE\r\n").await.unwrap();
        let started = Instant::now();
        linger(&mut near).await;
        assert_eq!(peer.await.unwrap(), b"* BYE\r\n");
        assert!(started.elapsed() < LINGER_TIMEOUT);
        // A peer that never closes is given up on.
        let (mut near, _far) = tokio::io::duplex(64);
        let started = Instant::now();
        linger(&mut near).await;
        assert_eq!(started.elapsed(), LINGER_TIMEOUT);
        // Nor may it keep mailgate reading.
        let (mut near, mut far) = tokio::io::duplex(64 * 1024);
        let flood = tokio::spawn(async move {
            let chunk = [b'x'; 1024];
            while far.write_all(&chunk).await.is_ok() {}
        });
        let started = Instant::now();
        linger(&mut near).await;
        assert!(started.elapsed() < LINGER_TIMEOUT);
        drop(near);
        flood.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_reads_times_out() {
        let (mut near, _far) = tokio::io::duplex(8);
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let error = write_all_by(&mut near, &[0u8; 64], deadline)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
