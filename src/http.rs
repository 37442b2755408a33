//! HTTP towards token sources, password checks and identity providers: one way to build a
//! client (a deadline, no redirects, no Referer, optional extra trust roots), to send a URL's
//! credentials (as basic auth, never in the URL) and to read an answer (bounded).

use std::path::Path;
use std::time::Duration;

use crate::secret::Secret;

/// Answers larger than this are not tokens; refuse them instead of buffering.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why a request got no usable answer: the host it went to and what went wrong, without the
/// rest of its URL or its body (either may hold secrets).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{host}: {failure}")]
pub struct HttpError {
    pub host: String,
    pub failure: Failure,
}

/// What went wrong with a request, in the words an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("name not resolved (DNS)")]
    Dns,
    #[error("connection refused")]
    Refused,
    #[error("timed out")]
    Timeout,
    #[error("certificate not trusted")]
    UntrustedCertificate,
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
    let host = host_of(response.url());
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(HttpError {
                host,
                failure: Failure::TooLarge,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Classifies a transport error, naming its host but not the rest of its URL or its body.
pub fn classify(error: reqwest::Error) -> HttpError {
    let failure = if error.is_timeout() {
        Failure::Timeout
    } else if error.is_dns() {
        Failure::Dns
    } else if causes(&error).any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    }) {
        Failure::Refused
    } else if causes(&error).any(is_untrusted_certificate) {
        Failure::UntrustedCertificate
    } else if error.is_connect() {
        Failure::Connect
    } else {
        Failure::Other
    };
    let host = error.url().map_or_else(|| "?".to_owned(), host_of);
    HttpError { host, failure }
}

fn host_of(url: &url::Url) -> String {
    url.host_str().unwrap_or("?").to_owned()
}

/// The error and what caused it, looking inside I/O errors (which hide what they wrap from
/// `source()`).
fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static))
            .or_else(|| cause.source())
    })
}

fn is_untrusted_certificate(cause: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        cause.downcast_ref::<rustls::Error>(),
        Some(rustls::Error::InvalidCertificate(_))
    )
}

/// A configured URL whose `user:pass@` travels as HTTP basic auth only: the URL kept here,
/// which requests and logs see, has none.
pub struct Endpoint {
    pub url: url::Url,
    basic_auth: Option<(String, Secret<String>)>,
}

impl Endpoint {
    /// # Errors
    /// `url` does not parse (configuration checks refuse that first); the text never quotes it.
    pub fn new(url: &Secret<String>) -> Result<Self, String> {
        let mut url = url::Url::parse(url.expose()).map_err(|_| "not a URL".to_owned())?;
        // A password alone (e.g. from password_file) still means basic auth, with an empty user.
        let basic_auth = (!url.username().is_empty() || url.password().is_some()).then(|| {
            let user = percent_decode(url.username());
            let password = Secret::new(url.password().map(percent_decode).unwrap_or_default());
            (user, password)
        });
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Ok(Self { url, basic_auth })
    }

    /// `request` with the endpoint's basic auth, if it has one.
    pub fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.basic_auth {
            Some((user, password)) => request.basic_auth(user, Some(password.expose())),
            None => request,
        }
    }
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_leaves_the_url_percent_decoded() {
        assert_eq!(percent_decode("p%40ss%3Aw"), "p@ss:w");
        let endpoint = Endpoint::new(&Secret::new("http://u:p%40ss@127.0.0.1/x".into())).unwrap();
        assert_eq!(endpoint.url.as_str(), "http://127.0.0.1/x");
        let (user, password) = endpoint.basic_auth.unwrap();
        assert_eq!((user.as_str(), password.expose().as_str()), ("u", "p@ss"));
    }
}
