//! The protocols mailgate speaks, chosen by their name in the configuration: the one place
//! that knows them all. Everything else holds a [`MailProtocol`].

use crate::config::Protocol;
use crate::frontend::MailProtocol;
use crate::{imap, managesieve, pop3, smtp};

/// The implementation of the protocol `name`.
pub fn named(name: Protocol) -> &'static dyn MailProtocol {
    match name {
        Protocol::Imap => &imap::Imap,
        Protocol::Smtp => &smtp::Smtp,
        Protocol::Pop3 => &pop3::Pop3,
        Protocol::Managesieve => &managesieve::ManageSieve,
    }
}
