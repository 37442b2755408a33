//! Copying bytes both ways after authentication, with an idle timeout, byte counters, and a
//! stop that ends at a point where a goodbye does not corrupt the stream.
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
    /// The `stop` future completed (shutdown). `at_boundary`: everything read from the
    /// upstream reached the client and ended between two responses, so a goodbye of our own
    /// can follow without corrupting the stream.
    Stopped {
        at_boundary: bool,
    },
}

impl SpliceEnd {
    /// The `outcome` field of the session's closing log line.
    pub fn label(self) -> &'static str {
        match self {
            SpliceEnd::Closed => "closed",
            SpliceEnd::IdleTimeout => "idle_timeout",
            SpliceEnd::Stopped { .. } => "shutdown",
        }
    }
}

/// Follows the upstream-to-client byte stream to tell whether it is between two responses.
/// Protocols implement it (IMAP: not inside a line or literal; SMTP: after a final reply line).
pub trait Boundary: Send {
    /// Sees every chunk on its way to the client, in order.
    fn observe(&mut self, bytes: &[u8]);
    /// Whether the bytes seen so far end exactly between two responses.
    fn at_boundary(&self) -> bool;
    /// Sees every chunk on its way to the upstream, in order, for protocols whose response
    /// shape depends on the command (POP3's multi-line replies).
    fn observe_request(&mut self, _bytes: &[u8]) {}
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

/// How a splice ends when asked to stop.
pub struct Stop<F> {
    /// Completes when the splice should stop.
    pub signal: F,
    /// After the signal, how long bytes already read may take to reach their reader; reading
    /// stops at once.
    pub flush_timeout: Duration,
}

/// Copies `client` <-> `upstream` until both directions end, nothing moves for `idle_timeout`,
/// or `stop.signal` completes. EOF on one side is passed on as a write shutdown to the other.
/// Every chunk towards the client is shown to `boundary` first.
///
/// # Errors
/// The first I/O error on either side.
pub async fn splice<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle_timeout: Duration,
    counters: &Counters,
    boundary: &mut dyn Boundary,
    stop: Stop<impl Future<Output = ()>>,
) -> (io::Result<SpliceEnd>, Transferred)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut outbound = Pump::default();
    let mut inbound = Pump::default();
    let mut last_activity = Instant::now();
    let idle = tokio::time::sleep(idle_timeout);
    let signal = stop.signal;
    let flush_deadline = tokio::time::sleep(Duration::MAX);
    let mut stopping = false;
    tokio::pin!(idle, signal, flush_deadline);
    let result = poll_fn(|cx| {
        if !stopping && signal.as_mut().poll(cx).is_ready() {
            stopping = true;
            flush_deadline
                .as_mut()
                .reset(Instant::now() + stop.flush_timeout);
        }
        if stopping {
            // Only what was already read goes on; the goodbye depends on where it ended.
            let up = outbound.deliver(cx, &mut *upstream)?;
            let down = inbound.deliver(cx, &mut *client)?;
            if up.is_ready() && down.is_ready() {
                let at_boundary = boundary.at_boundary();
                return Poll::Ready(Ok(SpliceEnd::Stopped { at_boundary }));
            }
            if flush_deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(SpliceEnd::Stopped { at_boundary: false }));
            }
            return Poll::Pending;
        }
        let before = (outbound.total, inbound.total);
        let up = outbound.poll(
            cx,
            &mut *client,
            &mut *upstream,
            &counters.client_to_upstream,
            &mut Requests(&mut *boundary),
        )?;
        let down = inbound.poll(
            cx,
            &mut *upstream,
            &mut *client,
            &counters.upstream_to_client,
            boundary,
        )?;
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Ok(SpliceEnd::Closed));
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

/// The client-to-upstream direction, shown to the boundary as requests.
struct Requests<'a>(&'a mut dyn Boundary);

impl Boundary for Requests<'_> {
    fn observe(&mut self, bytes: &[u8]) {
        self.0.observe_request(bytes);
    }

    fn at_boundary(&self) -> bool {
        true
    }
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
        boundary: &mut dyn Boundary,
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
            boundary.observe(data);
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

    /// Writes out what was read but not yet delivered, and flushes it.
    fn deliver<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
    ) -> Poll<io::Result<()>> {
        ready!(self.drain_backlog(cx, writer))?;
        if self.needs_flush {
            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
            self.needs_flush = false;
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

    /// Between responses when the last byte seen ended a line.
    #[derive(Default)]
    struct Lines {
        last: Option<u8>,
    }

    impl Boundary for Lines {
        fn observe(&mut self, bytes: &[u8]) {
            self.last = bytes.last().copied().or(self.last);
        }

        fn at_boundary(&self) -> bool {
            self.last.is_none_or(|b| b == b'\n')
        }
    }

    fn never() -> Stop<std::future::Pending<()>> {
        Stop {
            signal: std::future::pending(),
            flush_timeout: Duration::from_secs(1),
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
            &mut Lines::default(),
            never(),
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
            &mut Lines::default(),
            never(),
        )
        .await;
        assert_eq!(end.unwrap(), SpliceEnd::IdleTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(18));
        drop(talker);
    }

    /// Splices `sent` from the upstream to a client whose pipe holds `room` bytes and who
    /// reads nothing until the splice has ended; stops after 100 ms. Returns the end and what
    /// the client then finds in its pipe.
    async fn stop_after(sent: &[u8], room: usize) -> (SpliceEnd, Vec<u8>) {
        let (mut client_far, mut client) = duplex(room);
        let (mut upstream, mut upstream_far) = duplex(256 * 1024);
        upstream_far.write_all(sent).await.unwrap();
        let stop = Stop {
            signal: tokio::time::sleep(Duration::from_millis(100)),
            flush_timeout: Duration::from_millis(200),
        };
        let (end, _) = splice(
            &mut client,
            &mut upstream,
            Duration::from_secs(60),
            &counters(),
            &mut Lines::default(),
            stop,
        )
        .await;
        drop(client);
        let mut received = Vec::new();
        client_far.read_to_end(&mut received).await.unwrap();
        (end.unwrap(), received)
    }

    #[tokio::test]
    async fn a_stop_delivers_what_was_read_and_says_where_it_ended() {
        let (end, received) = stop_after(b"* 1 EXISTS\r\n", 1024).await;
        assert_eq!(end, SpliceEnd::Stopped { at_boundary: true });
        assert_eq!(received, b"* 1 EXISTS\r\n");
        let (end, _) = stop_after(b"* 1 FETCH (BODY[] {10}\r\n01234", 1024).await;
        assert_eq!(end, SpliceEnd::Stopped { at_boundary: false });
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_not_waited_for_past_the_flush_timeout() {
        let sent = vec![b'x'; 100_000];
        let started = Instant::now();
        let (end, _) = stop_after(&sent, 16).await;
        assert_eq!(end, SpliceEnd::Stopped { at_boundary: false });
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
