//! SMTP submission: the client-facing front end before authentication, the upstream login, and
//! after it the reply boundary and the `xclient` mode's command filter.

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
pub mod xclient_filter;

/// SMTP submission (RFC 6409) with AUTH (RFC 4954) as mailgate speaks it.
pub struct Smtp;

impl MailProtocol for Smtp {
    fn name(&self) -> Protocol {
        Protocol::Smtp
    }

    fn dialogue(&self, settings: &FrontendSettings) -> Box<dyn Dialogue> {
        Box::new(frontend::SmtpDialogue::new(settings))
    }

    fn goodbye(&self, why: Closing, hostname: &str) -> Vec<u8> {
        reply::failure(why.into(), hostname).to_bytes()
    }

    fn boundary(&self) -> Box<dyn Boundary> {
        Box::new(boundary::ReplyBoundary::default())
    }

    fn log_in_upstream<'a>(
        &'a self,
        connector: &'a Connector,
        auth: &'a UpstreamAuth,
        on_behalf: OnBehalf<'a>,
    ) -> BoxFuture<'a, Result<Upstream, BackendError>> {
        Box::pin(backend::login(
            connector,
            auth,
            on_behalf.helo,
            on_behalf.origin,
        ))
    }

    /// The EHLO extensions the front end relays.
    fn probe<'a>(
        &'a self,
        connector: &'a Connector,
        hostname: &'a str,
    ) -> Option<BoxFuture<'a, Result<Vec<String>, BackendError>>> {
        Some(Box::pin(backend::probe_extensions(connector, hostname)))
    }

    /// The probe's session, its extensions unused.
    fn check_health<'a>(
        &'a self,
        connector: &'a Connector,
        hostname: &'a str,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            backend::probe_extensions(connector, hostname)
                .await
                .map(drop)
        })
    }

    /// SMTP has no id in the IANA registry, and its clients offer none, so `smtp` only lets
    /// a client that names the protocol through.
    fn alpn_id(&self) -> &'static [u8] {
        b"smtp"
    }
}
