//! [`SmtpSink`]: a tiny in-process SMTP server that accepts every message and keeps it for
//! assertions (Dovecot's submission service relays to it).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Lines longer than this end the session (RFC 5321 section 4.5.3.1.6 allows 1000 octets in
/// text lines; generous here because the sink is no place to test limits).
const MAX_LINE: usize = 64 * 1024;
/// A session idle this long is closed.
const IDLE: Duration = Duration::from_secs(60);

/// One message as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The MAIL FROM address, without the angle brackets.
    pub from: String,
    /// The RCPT TO addresses, without angle brackets.
    pub rcpts: Vec<String>,
    /// The message after dot-unstuffing, lines ending in CRLF, without the final `.` line.
    pub data: Vec<u8>,
}

impl ReceivedMessage {
    pub fn data_str(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT on 127.0.0.1; stops when dropped.
pub struct SmtpSink {
    addr: SocketAddr,
    messages: watch::Receiver<Vec<ReceivedMessage>>,
    _task: AbortOnDrop,
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind SMTP sink on 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let (tx, rx) = watch::channel(Vec::new());
        let tx = Arc::new(tx);
        let task = tokio::spawn(async move {
            let mut sessions = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let tx = tx.clone();
                        sessions.spawn(async move {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(600),
                                session(stream, tx),
                            )
                            .await;
                        });
                    }
                    Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                }
            }
        });
        SmtpSink {
            addr,
            messages: rx,
            _task: AbortOnDrop(task),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every message so far.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.messages.borrow().clone()
    }

    /// Waits until at least `n` messages arrived; returns all of them, or `None` on timeout.
    pub async fn wait_for_messages(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Option<Vec<ReceivedMessage>> {
        let mut rx = self.messages.clone();
        let wait = async move { rx.wait_for(|m| m.len() >= n).await.map(|m| m.clone()) };
        tokio::time::timeout(timeout, wait).await.ok()?.ok()
    }

    /// Waits for the first message.
    ///
    /// # Panics
    /// When none arrives within `timeout`.
    pub async fn wait_for_message(&self, timeout: Duration) -> ReceivedMessage {
        self.wait_for_messages(1, timeout)
            .await
            .unwrap_or_else(|| panic!("no message reached the SMTP sink within {timeout:?}"))
            .remove(0)
    }
}

fn strip_path(arg: &str) -> String {
    // "FROM:<a@b> SIZE=10" -> "a@b"
    let after_colon = arg
        .split_once(':')
        .map(|(_, v)| v)
        .unwrap_or("")
        .trim_start();
    let path = after_colon.split_whitespace().next().unwrap_or("");
    path.trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}

async fn read_line(reader: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> Option<()> {
    line.clear();
    let n = tokio::time::timeout(IDLE, reader.read_until(b'\n', line))
        .await
        .ok()?
        .ok()?;
    (n > 0 && line.len() <= MAX_LINE).then_some(())
}

async fn session(stream: TcpStream, tx: Arc<watch::Sender<Vec<ReceivedMessage>>>) -> Option<()> {
    let mut reader = BufReader::new(stream);
    reader
        .get_mut()
        .write_all(b"220 sink.localhost ESMTP test sink\r\n")
        .await
        .ok()?;
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    let mut line = Vec::new();
    loop {
        read_line(&mut reader, &mut line).await?;
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        let (verb, arg) = text.split_once(' ').unwrap_or((&text, ""));
        let reply: &[u8] = match verb.to_ascii_uppercase().as_str() {
            "EHLO" => b"250-sink.localhost\r\n250-8BITMIME\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250 ENHANCEDSTATUSCODES\r\n",
            "HELO" => b"250 sink.localhost\r\n",
            "MAIL" => {
                from = Some(strip_path(arg));
                rcpts.clear();
                b"250 2.1.0 Ok\r\n"
            }
            "RCPT" => {
                if from.is_none() {
                    b"503 5.5.1 MAIL first\r\n"
                } else {
                    rcpts.push(strip_path(arg));
                    b"250 2.1.5 Ok\r\n"
                }
            }
            "DATA" => {
                if from.is_none() || rcpts.is_empty() {
                    b"503 5.5.1 MAIL and RCPT first\r\n"
                } else {
                    reader
                        .get_mut()
                        .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                        .await
                        .ok()?;
                    let mut data = Vec::new();
                    loop {
                        read_line(&mut reader, &mut line).await?;
                        if line == b".\r\n" || line == b".\n" {
                            break;
                        }
                        // RFC 5321 section 4.5.2: drop the first of a leading dot pair.
                        let content = if line.starts_with(b"..") { &line[1..] } else { &line[..] };
                        data.extend_from_slice(content);
                    }
                    let message = ReceivedMessage {
                        from: from.take().unwrap_or_default(),
                        rcpts: std::mem::take(&mut rcpts),
                        data,
                    };
                    tx.send_modify(|m| m.push(message));
                    b"250 2.0.0 Ok: queued\r\n"
                }
            }
            "RSET" => {
                from = None;
                rcpts.clear();
                b"250 2.0.0 Ok\r\n"
            }
            "NOOP" => b"250 2.0.0 Ok\r\n",
            "QUIT" => {
                let _ = reader.get_mut().write_all(b"221 2.0.0 Bye\r\n").await;
                return Some(());
            }
            _ => b"502 5.5.2 Command not implemented\r\n",
        };
        reader.get_mut().write_all(reply).await.ok()?;
    }
}
