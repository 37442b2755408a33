//! IMAP: the client-facing front end before authentication and the upstream login.

pub mod backend;
pub mod boundary;
pub(crate) mod framer;
pub mod frontend;
pub mod reply;
