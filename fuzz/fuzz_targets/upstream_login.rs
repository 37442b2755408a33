//! The upstream side of a login against a hostile server: the server's bytes are the input.
//! The first byte picks the protocol, STARTTLS, mechanism, client forwarding and whether a
//! token or a password is sent; the rest is everything the server says, then it closes.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mailgate::config::{ForwardClient, MechanismSetting, TlsMode, UpstreamConfig};
use mailgate::forward::Origin;
use mailgate::login::{BackendError, UpstreamAuth};
use mailgate::sasl;
use mailgate::secret::Secret;
use mailgate::upstream::Connector;
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
                    host: "localhost".to_owned(),
                    port,
                    tls,
                    ca_file: None,
                    system_roots: true,
                    mechanism,
                    connect_timeout: Duration::from_secs(5),
                    max_concurrent_connects: 1,
                    forward_client,
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

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, script)) = data.split_first() else {
        return;
    };
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
        let server = async {
            let (mut socket, _) = upstream.listener.accept().await.expect("accept");
            let _ = socket.write_all(script).await;
            let _ = socket.shutdown().await;
            let mut heard = Vec::new();
            let _ = socket.read_to_end(&mut heard).await;
        };
        let login = async {
            let outcome = if knobs & 1 == 0 {
                mailgate::imap::backend::login(connector, &auth, origin.as_ref()).await
            } else {
                mailgate::smtp::backend::login(connector, &auth, "client.fuzz", origin.as_ref())
                    .await
            };
            match outcome {
                Ok(logged_in) => assert!(!logged_in.completion.contains(['\r', '\n'])),
                Err(error) => assert_no_secret(&error, &auth),
            }
            // Dropping the connection ends the server's read.
        };
        tokio::join!(server, login);
    });
});

/// An upstream may echo what it was sent; errors (which get logged) must not carry it.
fn assert_no_secret(error: &BackendError, auth: &UpstreamAuth) {
    let text = format!("{error} {error:?}");
    for sent in sasl::sent_forms(auth, None) {
        let sent = String::from_utf8_lossy(sent.expose());
        assert!(!text.contains(sent.as_ref()), "{text}");
    }
}
