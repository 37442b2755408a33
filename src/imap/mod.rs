//! IMAP: the client-facing front end before authentication and the upstream login.

use crate::config::Protocol;
use crate::frontend::settings::FrontendSettings;
use crate::frontend::{BoxFuture, Dialogue, MailProtocol, OnBehalf};
use crate::login::{BackendError, Closing, Upstream, UpstreamAuth};
use crate::splice::Boundary;
use crate::upstream::Connector;

pub mod backend;
pub mod boundary;
pub mod frontend;
pub mod reply;

/// IMAP4rev1 (RFC 9051's predecessor, RFC 3501) as mailgate speaks it.
pub struct Imap;

impl MailProtocol for Imap {
    fn name(&self) -> Protocol {
        Protocol::Imap
    }

    fn dialogue(&self, settings: &FrontendSettings) -> Box<dyn Dialogue> {
        Box::new(frontend::ImapDialogue::new(settings))
    }

    fn goodbye(&self, why: Closing, _hostname: &str) -> Vec<u8> {
        reply::closing(why).into_bytes()
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

    /// Registered at IANA (RFC 7301's registry).
    fn alpn_id(&self) -> &'static [u8] {
        b"imap"
    }
}
