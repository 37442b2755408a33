//! The session loop before login, for every protocol: reads under deadlines, batches replies,
//! runs STARTTLS and the login, says goodbye, and hands a logged-in session over.

use std::future::Future;
use std::io;

use tokio::io::AsyncReadExt;
use tokio::time::{Instant, timeout_at};

use super::{Dialogue, Step};
use crate::frontend::settings::FrontendSettings;
use crate::io::{BoxedIo, PrefixedIo, linger, write_all_by};
use crate::login::{Authenticator, Closing, Credentials, GOODBYE_TIMEOUT, Handoff, LoginRequest};
use crate::sanitize::Escaped;

/// Bytes read from the client at once.
const READ_CHUNK: usize = 4096;

/// Runs `dialogue` with the client until it logs in, leaves, or is closed.
///
/// Returns `Ok(Some(_))` after a successful login, with everything the client pipelined after
/// the login command replayed first from [`Handoff::client`]. Returns `Ok(None)` when the
/// session ended: the client left or closed the stream; it was silent for
/// `settings.pre_auth_timeout` or did not log in within `settings.pre_auth_lifetime`; the
/// dialogue closed it (too many errors or failed logins); a STARTTLS handshake failed; or
/// `stop` completed (mailgate is shutting down, or closes the session to make room). Each of
/// those but the client's own close and a failed handshake gets the dialogue's goodbye.
///
/// # Errors
/// Reading from or writing to the client failed, or a reply was not read in time.
pub async fn serve<A: Authenticator>(
    client: BoxedIo,
    authenticator: &A,
    dialogue: Box<dyn Dialogue>,
    settings: &FrontendSettings,
    stop: impl Future<Output = Closing>,
) -> io::Result<Option<Handoff<BoxedIo>>> {
    tokio::pin!(stop);
    let upstream = || authenticator.upstream_capabilities();
    let mut conn = Conn {
        client,
        dialogue,
        out: Vec::new(),
        lifetime_end: settings.lifetime_end(),
        settings,
    };
    conn.out = conn.dialogue.greeting(&upstream);
    loop {
        let Some(mut step) = conn.dialogue.next_step(&upstream) else {
            // `timeout_at` fires only while a read waits: a client that always has the next
            // commands waiting would never meet its lifetime, so it is checked here too.
            if Instant::now() >= conn.lifetime_end {
                return conn.goodbye(Closing::LifetimeOver).await;
            }
            conn.flush().await?;
            let deadline = conn.deadline();
            let read = tokio::select! {
                read = conn.read_more(deadline) => read?,
                why = &mut stop => return conn.goodbye(why).await,
            };
            match read {
                Input::Data => continue,
                Input::Closed => return Ok(None),
                Input::TimedOut => return conn.goodbye(conn.timed_out()).await,
            }
        };
        // A failed login yields a further step, so steps are run until one settles.
        loop {
            match step {
                Step::Reply(bytes) => conn.out.extend(bytes),
                Step::Close(bytes) => {
                    conn.out.extend(bytes);
                    conn.flush().await?;
                    linger(&mut conn.client).await;
                    return Ok(None);
                }
                Step::StartTls(bytes) => {
                    conn.out.extend(bytes);
                    conn.flush().await?;
                    let Some(tls) = &settings.starttls else {
                        return Ok(None);
                    };
                    let deadline = conn.deadline();
                    let Some(client) = tls.accept(conn.client, deadline).await else {
                        return Ok(None);
                    };
                    conn.client = client;
                    conn.dialogue.tls_started();
                }
                Step::LogIn { credentials, helo } => {
                    conn.flush().await?;
                    let account = credentials.account.clone();
                    let lifetime_end = conn.lifetime_end;
                    let result = tokio::select! {
                        result = authenticator.login(request(credentials, helo, settings)) => result,
                        why = &mut stop => return conn.goodbye(why).await,
                        () = tokio::time::sleep_until(lifetime_end) => {
                            return conn.goodbye(Closing::LifetimeOver).await;
                        }
                        () = conn.hung_up() => return Ok(None),
                    };
                    match result {
                        Ok(upstream) => {
                            let reply = conn.dialogue.logged_in(&upstream.completion);
                            conn.out.extend(reply);
                            conn.flush().await?;
                            tracing::info!(account = %Escaped(&account), "client authenticated");
                            let rest = conn.dialogue.into_rest();
                            return Ok(Some(Handoff {
                                client: PrefixedIo::new(rest, conn.client),
                                upstream,
                                account,
                            }));
                        }
                        Err(error) => {
                            tracing::info!(account = %Escaped(&account), %error, "client login failed");
                            step = conn.dialogue.login_failed(error);
                            continue;
                        }
                    }
                }
            }
            break;
        }
    }
}

fn request(
    credentials: Credentials,
    helo: Option<String>,
    settings: &FrontendSettings,
) -> LoginRequest {
    LoginRequest {
        credentials,
        helo,
        client: settings.client,
        local: settings.local,
    }
}

/// The client stream, its dialogue, the replies not yet sent, and the session's deadlines.
struct Conn<'a> {
    client: BoxedIo,
    dialogue: Box<dyn Dialogue>,
    out: Vec<u8>,
    lifetime_end: Instant,
    settings: &'a FrontendSettings,
}

enum Input {
    Data,
    Closed,
    TimedOut,
}

impl Conn<'_> {
    fn deadline(&self) -> Instant {
        self.settings.next_deadline(self.lifetime_end)
    }

    /// Sends the pending replies, giving up at the deadline so a client that never reads
    /// cannot pin the session.
    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let deadline = self.deadline();
            write_all_by(&mut self.client, &self.out, deadline).await?;
            self.out.clear();
        }
        Ok(())
    }

    async fn read_more(&mut self, deadline: Instant) -> io::Result<Input> {
        let mut chunk = [0u8; READ_CHUNK];
        match timeout_at(deadline, self.client.read(&mut chunk)).await {
            Err(_) => Ok(Input::TimedOut),
            Ok(Ok(0)) => Ok(Input::Closed),
            Ok(Ok(n)) => {
                self.dialogue.push(&chunk[..n]);
                Ok(Input::Data)
            }
            Ok(Err(error)) => Err(error),
        }
    }

    /// Why a read timed out: the session's lifetime, or the client's silence.
    fn timed_out(&self) -> Closing {
        if Instant::now() >= self.lifetime_end {
            Closing::LifetimeOver
        } else {
            Closing::IdleTimeout
        }
    }

    /// Sends the pending replies and the goodbye for `why`, briefly: the client may be the
    /// reason the session ends.
    async fn goodbye<T>(&mut self, why: Closing) -> io::Result<Option<T>> {
        self.out.extend(self.dialogue.goodbye(why));
        let deadline = Instant::now() + GOODBYE_TIMEOUT;
        write_all_by(&mut self.client, &self.out, deadline).await?;
        linger(&mut self.client).await;
        Ok(None)
    }

    /// Completes when the client hangs up while its login runs, so that the login (its
    /// password check, its token fetch) is dropped instead of finishing for no one. What the
    /// client pipelines meanwhile is kept for the upstream, up to the dialogue's
    /// [`Dialogue::max_pending`]; past that, reading waits for the login.
    async fn hung_up(&mut self) {
        let mut chunk = [0u8; READ_CHUNK];
        while self.dialogue.buffered() < self.dialogue.max_pending() {
            match self.client.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => self.dialogue.push(&chunk[..n]),
            }
        }
        std::future::pending().await
    }
}
