//! The upstream side of a login against a hostile server: the server's bytes are the input.
//! The first byte picks the protocol, STARTTLS, mechanism, client forwarding and whether a
//! token or a password is sent; the rest is everything the server says, then it closes. For
//! protocols that probe what the upstream advertises (SMTP, ManageSieve), the same bytes also
//! answer the probe; for ManageSieve, the greeting a client would be shown is checked.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mailgate::config::{ForwardClient, MechanismSetting, Protocol, TlsMode, UpstreamConfig};
use mailgate::forward::Origin;
use mailgate::frontend::OnBehalf;
use mailgate::frontend::settings::TlsOffer;
use mailgate::login::{BackendError, UpstreamAuth};
use mailgate::secret::Secret;
use mailgate::upstream::Connector;
use mailgate::{managesieve, protocols, sasl};
use mailgate_fuzz::network_runtime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TOKEN: &str = "fuzz-token-3vY8qL";
const PASSWORD: &str = "fuzz-password-Kp2x";

const TLS_MODES: [TlsMode; 2] = [TlsMode::None, TlsMode::Starttls];
const MECHANISMS: [MechanismSetting; 3] = [
    MechanismSetting::Auto,
    MechanismSetting::Xoauth2,
    MechanismSetting::Oauthbearer,
];
const FORWARDS: [ForwardClient; 4] = [
    ForwardClient::None,
    ForwardClient::Id,
    ForwardClient::Xclient,
    ForwardClient::ProxyV2,
];

struct Upstream {
    listener: TcpListener,
    /// One per combination of TLS mode, mechanism and forwarding, all to `listener`.
    connectors: Vec<Connector>,
}

/// Built once: a listener on loopback and a connector for every setting.
async fn upstream() -> &'static Upstream {
    static UPSTREAM: OnceLock<Upstream> = OnceLock::new();
    if let Some(upstream) = UPSTREAM.get() {
        return upstream;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let mut connectors = Vec::new();
    for tls in TLS_MODES {
        for mechanism in MECHANISMS {
            for forward_client in FORWARDS {
                let config = UpstreamConfig {
                    ca_file: None,
                    system_roots: true,
                    mechanism,
                    connect_timeout: Duration::from_secs(5),
                    max_concurrent_connects: 1,
                    forward_client,
                    ..UpstreamConfig::new("localhost".to_owned(), port, tls)
                };
                connectors.push(Connector::new(&config).expect("connector"));
            }
        }
    }
    UPSTREAM.get_or_init(|| Upstream {
        listener,
        connectors,
    })
}

/// Bits 0 and 6 of the first byte: the first seeds (IMAP and SMTP only) keep their meaning.
const PROTOCOLS: [Protocol; 4] = [
    Protocol::Imap,
    Protocol::Smtp,
    Protocol::Pop3,
    Protocol::Managesieve,
];

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, script)) = data.split_first() else {
        return;
    };
    let protocol = protocols::named(PROTOCOLS[usize::from(knobs & 1 | (knobs >> 5) & 0b10)]);
    network_runtime().block_on(async {
        let upstream = upstream().await;
        let connector = &upstream.connectors[usize::from(knobs >> 1) % upstream.connectors.len()];
        let auth = if knobs & 0b1000_0000 == 0 {
            UpstreamAuth::Bearer {
                user: "alice@fuzz".to_owned(),
                token: Secret::new(TOKEN.to_owned()),
            }
        } else {
            UpstreamAuth::Password {
                user: "alice@fuzz".to_owned(),
                password: Secret::new(PASSWORD.to_owned()),
            }
        };
        let origin = Origin::new("192.0.2.7:50000".parse().ok(), "127.0.0.1:993".parse().ok());
        let on_behalf = OnBehalf {
            helo: "client.fuzz",
            origin: origin.as_ref(),
        };
        let login = async {
            match protocol.log_in_upstream(connector, &auth, on_behalf).await {
                Ok(logged_in) => assert!(!logged_in.completion.contains(['\r', '\n'])),
                Err(error) => assert_no_secret(&error, &auth),
            }
            // Dropping the connection ends the server's read.
        };
        tokio::join!(serve(&upstream.listener, script), login);
        if let Some(probe) = protocol.probe(connector, "mx.fuzz") {
            let (_, found) = tokio::join!(serve(&upstream.listener, script), probe);
            if let Ok(capabilities) = found
                && protocol.name() == Protocol::Managesieve
            {
                check_relayed(&capabilities);
            }
        }
    });
});

/// Accepts one connection, says `script`, closes its side and reads until mailgate closes.
async fn serve(listener: &TcpListener, script: &[u8]) {
    let (mut socket, _) = listener.accept().await.expect("accept");
    let _ = socket.write_all(script).await;
    let _ = socket.shutdown().await;
    let mut heard = Vec::new();
    let _ = socket.read_to_end(&mut heard).await;
}

/// What a client is shown of an upstream's capabilities: CRLF lines of quoted strings, with
/// mailgate's own SASL list the only one (a relayed `"SASL"` would offer what mailgate does
/// not take).
fn check_relayed(capabilities: &[String]) {
    let greeting = managesieve::reply::greeting(capabilities, TlsOffer::Optional, "mx.fuzz");
    let body = greeting
        .strip_suffix("\r\n")
        .expect("the greeting ends its line");
    let mut sasl = 0;
    for line in body.split("\r\n") {
        assert!(
            !line.chars().any(|c| c.is_ascii_control()),
            "control character in {line:?}"
        );
        assert!(line.starts_with('"') || line.starts_with("OK "), "{line:?}");
        sasl += usize::from(line.starts_with("\"SASL\" "));
    }
    assert_eq!(sasl, 1, "{greeting:?}");
}

/// An upstream may echo what it was sent; errors (which get logged) must not carry it.
fn assert_no_secret(error: &BackendError, auth: &UpstreamAuth) {
    let text = format!("{error} {error:?}");
    for sent in sasl::sent_forms(auth, None) {
        let sent = String::from_utf8_lossy(sent.expose());
        assert!(!text.contains(sent.as_ref()), "{text}");
    }
}
