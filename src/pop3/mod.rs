//! POP3 (RFC 1939 with RFC 2449, RFC 2595, RFC 3206 and RFC 5034): the client-facing front end
//! before authentication, the upstream login, and after it the response boundary.

pub mod backend;
pub mod boundary;
pub mod frontend;
pub mod reply;

use crate::config::Protocol;
use crate::frontend::settings::FrontendSettings;
use crate::frontend::{BoxFuture, Dialogue, MailProtocol, OnBehalf};
use crate::login::{BackendError, Closing, Upstream, UpstreamAuth};
use crate::splice::Boundary;
use crate::upstream::Connector;

/// POP3 as a listener's protocol.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pop3;

impl MailProtocol for Pop3 {
    fn name(&self) -> Protocol {
        Protocol::Pop3
    }

    fn dialogue(&self, settings: &FrontendSettings) -> Box<dyn Dialogue> {
        Box::new(frontend::Pop3Dialogue::new(settings))
    }

    fn goodbye(&self, why: Closing, hostname: &str) -> Vec<u8> {
        reply::goodbye(why, hostname)
    }

    fn boundary(&self) -> Box<dyn Boundary> {
        Box::new(boundary::ResponseBoundary::default())
    }

    fn log_in_upstream<'a>(
        &'a self,
        connector: &'a Connector,
        auth: &'a UpstreamAuth,
        on_behalf: OnBehalf<'a>,
    ) -> BoxFuture<'a, Result<Upstream, BackendError>> {
        Box::pin(backend::login(connector, auth, on_behalf.origin))
    }

    /// Nothing of the upstream's is relayed before login: its CAPA describes the maildrop,
    /// which clients ask for again after login (RFC 2449 5).
    fn probe<'a>(
        &'a self,
        _connector: &'a Connector,
        _hostname: &'a str,
    ) -> Option<BoxFuture<'a, Result<Vec<String>, BackendError>>> {
        None
    }

    fn check_health<'a>(
        &'a self,
        connector: &'a Connector,
        _hostname: &'a str,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(backend::check_health(connector))
    }

    /// RFC 7301's registry (RFC 8314 7) names POP3 `pop3`.
    fn alpn_id(&self) -> &'static [u8] {
        b"pop3"
    }
}
