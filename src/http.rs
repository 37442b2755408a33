//! HTTP towards token sources and identity providers: one way to build a client (a deadline,
//! no redirects, no Referer, optional extra trust roots) and to read an answer (bounded).

use std::path::Path;
use std::time::Duration;

/// Answers larger than this are not tokens; refuse them instead of buffering.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why a request got no usable answer, without its URL or body (either may hold secrets).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("timed out")]
    Timeout,
    #[error("connection failed")]
    Connect,
    #[error("answer larger than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    #[error("request failed")]
    Other,
}

/// A client for one token source or provider.
///
/// A redirect could send the request (and what it carries) to any host and have mailgate use
/// that host's answer: none is followed, and no Referer is sent.
///
/// # Errors
/// `ca_file` cannot be read, or the client cannot be built.
pub fn client(timeout: Duration, ca_file: Option<&Path>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .referer(false)
        .user_agent(concat!("mailgate/", env!("CARGO_PKG_VERSION")));
    if ca_file.is_some() {
        let tls = crate::tls::client_config(ca_file, true).map_err(|e| e.to_string())?;
        builder = builder.use_preconfigured_tls((*tls).clone());
    }
    builder.build().map_err(|e| format!("HTTP client: {e}"))
}

/// Reads the whole body, refusing more than [`MAX_ANSWER_BYTES`].
///
/// # Errors
/// The body is too large or the transfer failed.
pub async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(HttpError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Classifies a transport error without its URL or body.
pub fn classify(error: reqwest::Error) -> HttpError {
    if error.is_timeout() {
        HttpError::Timeout
    } else if error.is_connect() {
        HttpError::Connect
    } else {
        HttpError::Other
    }
}
