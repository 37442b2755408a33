//! ManageSieve (RFC 5804): the client-facing front end before authentication, the upstream
//! login, the reply table and the response boundary, behind [`ManageSieve`].

pub mod backend;
pub mod boundary;
pub mod frontend;
pub mod reply;
mod syntax;

use crate::config::Protocol;
use crate::frontend::settings::FrontendSettings;
use crate::frontend::{BoxFuture, Dialogue, MailProtocol, OnBehalf};
use crate::login::{BackendError, Closing, Upstream, UpstreamAuth};
use crate::splice::Boundary;
use crate::upstream::Connector;

/// ManageSieve, as a listener knows it.
pub struct ManageSieve;

impl MailProtocol for ManageSieve {
    fn name(&self) -> Protocol {
        Protocol::Managesieve
    }

    fn dialogue(&self, settings: &FrontendSettings) -> Box<dyn Dialogue> {
        Box::new(frontend::ManageSieveDialogue::new(settings))
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

    /// The upstream's capabilities, relayed in the greeting (RFC 5804 1.7).
    fn probe<'a>(
        &'a self,
        connector: &'a Connector,
        _hostname: &'a str,
    ) -> Option<BoxFuture<'a, Result<Vec<String>, BackendError>>> {
        Some(Box::pin(backend::probe_capabilities(connector)))
    }

    /// The probe's session, its capabilities unused.
    fn check_health<'a>(
        &'a self,
        connector: &'a Connector,
        _hostname: &'a str,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { backend::probe_capabilities(connector).await.map(drop) })
    }

    /// Registered at IANA (RFC 7301's registry), beside `imap` and `pop3`.
    fn alpn_id(&self) -> &'static [u8] {
        b"managesieve"
    }
}
