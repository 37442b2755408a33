//! Copying bytes both ways after authentication, with an idle timeout and byte counters.
//!
//! An idle session holds no copy buffer: each read lands in a buffer on the polling thread's
//! stack and is written straight on; only when the writer pushes back is the remainder moved
//! to the heap, and that is freed as soon as it drains. Ten thousand idle sessions therefore
//! cost their sockets and a little bookkeeping, not 2 x 10,000 buffers.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// One read's worth: loopback and LAN segments arrive in up to 64 KiB pieces, and reading two
/// of them per call halves the syscalls of a bulk FETCH. Uninitialised stack memory, so it
/// costs nothing to set up, and far below a tokio worker's 2 MiB stack.
const CHUNK: usize = 128 * 1024;

/// Why a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides closed (or one closed and the other followed).
    Closed,
    IdleTimeout,
    /// The `stop` future completed (shutdown).
    Stopped,
}

impl SpliceEnd {
    /// The `outcome` field of the session's closing log line.
    pub fn label(self) -> &'static str {
        match self {
            SpliceEnd::Closed => "closed",
            SpliceEnd::IdleTimeout => "idle_timeout",
            SpliceEnd::Stopped => "shutdown",
        }
    }
}

/// Bytes moved in each direction, for the session's closing log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// Counters that each chunk is added to as it moves.
pub struct Counters {
    pub client_to_upstream: Counter,
    pub upstream_to_client: Counter,
}

/// Copies `client` <-> `upstream` until both directions end, nothing moves for `idle_timeout`,
/// or `stop` completes. EOF on one side is passed on as a write shutdown to the other.
///
/// # Errors
/// The first I/O error on either side.
pub async fn splice<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle_timeout: Duration,
    counters: &Counters,
    stop: impl Future<Output = ()>,
) -> (io::Result<SpliceEnd>, Transferred)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut outbound = Pump::default();
    let mut inbound = Pump::default();
    let mut last_activity = Instant::now();
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle, stop);
    let result = poll_fn(|cx| {
        let before = (outbound.total, inbound.total);
        let up = outbound.poll(
            cx,
            &mut *client,
            &mut *upstream,
            &counters.client_to_upstream,
        )?;
        let down = inbound.poll(
            cx,
            &mut *upstream,
            &mut *client,
            &counters.upstream_to_client,
        )?;
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Ok(SpliceEnd::Closed));
        }
        if stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(SpliceEnd::Stopped));
        }
        if before != (outbound.total, inbound.total) {
            last_activity = Instant::now();
        }
        // The timer is moved only when it fires, not on every chunk.
        while idle.as_mut().poll(cx).is_ready() {
            let deadline = last_activity + idle_timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(Ok(SpliceEnd::IdleTimeout));
            }
            idle.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    let transferred = Transferred {
        client_to_upstream: outbound.total,
        upstream_to_client: inbound.total,
    };
    (result, transferred)
}

/// One direction of the copy.
#[derive(Default)]
struct Pump {
    /// Bytes read but not yet accepted by the writer; empty (unallocated) in the steady state.
    backlog: Vec<u8>,
    written: usize,
    needs_flush: bool,
    reader_done: bool,
    finished: bool,
    total: u64,
}

impl Pump {
    /// Moves bytes until the reader or writer would block; Ready once EOF was passed on.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        counter: &Counter,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.drain_backlog(cx, writer))?;
            if self.reader_done {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [MaybeUninit::<u8>::uninit(); CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    if self.needs_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.needs_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(result) => result?,
            }
            let data = buf.filled();
            if data.is_empty() {
                self.reader_done = true;
                continue;
            }
            self.total += data.len() as u64;
            counter.inc_by(data.len() as u64);
            self.needs_flush = true;
            let sent = match write_all_ready(cx, writer, data)? {
                WriteProgress::All => continue,
                WriteProgress::Blocked(sent) => sent,
            };
            self.backlog.extend_from_slice(&data[sent..]);
            self.written = 0;
            return Poll::Pending;
        }
    }

    /// Writes the backlog out; frees it once empty.
    fn drain_backlog<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
    ) -> Poll<io::Result<()>> {
        while self.written < self.backlog.len() {
            let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.backlog[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if !self.backlog.is_empty() {
            self.backlog = Vec::new();
            self.written = 0;
        }
        Poll::Ready(Ok(()))
    }
}

/// Either everything was written, or the writer blocked after `sent` bytes.
enum WriteProgress {
    All,
    Blocked(usize),
}

fn write_all_ready<W: AsyncWrite + Unpin + ?Sized>(
    cx: &mut Context<'_>,
    writer: &mut W,
    data: &[u8],
) -> io::Result<WriteProgress> {
    let mut sent = 0;
    while sent < data.len() {
        match Pin::new(&mut *writer).poll_write(cx, &data[sent..]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => sent += n,
            Poll::Ready(Err(error)) => return Err(error),
            Poll::Pending => return Ok(WriteProgress::Blocked(sent)),
        }
    }
    Ok(WriteProgress::All)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    fn counters() -> Counters {
        Counters {
            client_to_upstream: Counter::default(),
            upstream_to_client: Counter::default(),
        }
    }

    #[tokio::test]
    async fn copies_both_ways_through_a_small_pipe_and_counts() {
        let (mut client_far, mut client) = duplex(7);
        let (mut upstream, mut upstream_far) = duplex(5);
        let counters = counters();
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let expected = payload.clone();
        let pusher = tokio::spawn(async move {
            client_far.write_all(&payload).await.unwrap();
            client_far.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client_far.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let echo = tokio::spawn(async move {
            let mut got = Vec::new();
            upstream_far.read_to_end(&mut got).await.unwrap();
            upstream_far.write_all(b"bye").await.unwrap();
            upstream_far.shutdown().await.unwrap();
            got
        });
        let (end, moved) = splice(
            &mut client,
            &mut upstream,
            Duration::from_secs(5),
            &counters,
            std::future::pending(),
        )
        .await;
        assert_eq!(end.unwrap(), SpliceEnd::Closed);
        drop((client, upstream));
        assert_eq!(echo.await.unwrap(), expected);
        assert_eq!(pusher.await.unwrap(), b"bye");
        assert_eq!(moved.client_to_upstream, 100_000);
        assert_eq!(moved.upstream_to_client, 3);
        assert_eq!(counters.client_to_upstream.get(), 100_000);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_counts_from_last_activity() {
        let (mut client_far, mut client) = duplex(64);
        let (mut upstream, _upstream_far) = duplex(64);
        let counters = counters();
        let started = Instant::now();
        let talker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(8)).await;
            client_far.write_all(b"x").await.unwrap();
            client_far
        });
        let (end, _) = splice(
            &mut client,
            &mut upstream,
            Duration::from_secs(10),
            &counters,
            std::future::pending(),
        )
        .await;
        assert_eq!(end.unwrap(), SpliceEnd::IdleTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(18));
        drop(talker);
    }

    #[tokio::test]
    async fn stop_ends_the_splice() {
        let (_client_far, mut client) = duplex(64);
        let (mut upstream, _upstream_far) = duplex(64);
        let (end, _) = splice(
            &mut client,
            &mut upstream,
            Duration::from_secs(60),
            &counters(),
            async {},
        )
        .await;
        assert_eq!(end.unwrap(), SpliceEnd::Stopped);
    }
}
