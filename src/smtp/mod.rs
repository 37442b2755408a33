//! SMTP submission: the client-facing front end before authentication, the upstream login, and
//! after it the reply boundary and the `xclient` mode's command filter.

pub mod backend;
pub mod boundary;
pub mod frontend;
pub mod reply;
pub mod xclient_filter;
