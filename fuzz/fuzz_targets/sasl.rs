//! SASL as both sides speak it: decoding what clients send (base64, PLAIN, LOGIN), and the
//! messages mailgate builds for upstreams from a token source's user name and token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::login::Credentials;
use mailgate::sasl::{self, Mechanism, SaslError, SaslServer, SaslStep, ServerMechanism};
use mailgate::secret::Secret;
use mailgate::token::auth_server::{is_usable_token, is_usable_user};
use mailgate_fuzz::assert_usable_account;

fuzz_target!(|data: &[u8]| {
    // What decodes re-encodes to the same bytes.
    if let Ok(raw) = sasl::decode_base64(data) {
        let encoded = sasl::encode_base64(&raw);
        let again = sasl::decode_base64(encoded.expose().as_bytes()).expect("own base64");
        assert_eq!(again.expose(), raw.expose());
    }
    check(sasl::decode_plain(&Secret::new(data.to_vec())));

    // Two responses, split at the first NUL: LOGIN's user name and password.
    let (first, second) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &data[..0]),
    };
    for mechanism in [ServerMechanism::Plain, ServerMechanism::Login] {
        check(exchange(mechanism, first, second));
    }

    if let (Ok(user), Ok(token)) = (std::str::from_utf8(first), std::str::from_utf8(second))
        && is_usable_user(user)
        && is_usable_token(token)
    {
        check_upstream_messages(user, token);
    }
});

/// Runs a server exchange with `first` as the initial response and `second` as the next one.
fn exchange(
    mechanism: ServerMechanism,
    first: &[u8],
    second: &[u8],
) -> Result<Credentials, SaslError> {
    let mut step = SaslServer::start(mechanism, Some(Secret::new(first.to_vec())));
    for _ in 0..2 {
        match step {
            SaslStep::Done(result) => return result,
            SaslStep::Challenge { server, .. } => step = server.step(Secret::new(second.to_vec())),
        }
    }
    panic!("{mechanism:?} asked for a third response");
}

fn check(result: Result<Credentials, SaslError>) {
    if let Ok(credentials) = result {
        assert_usable_account(&credentials.account);
    }
}

/// A user name and token that passed the token source's checks keep every field in place.
fn check_upstream_messages(user: &str, token: &str) {
    let token = Secret::new(token.to_owned());
    let bearer = format!("auth=Bearer {}", token.expose());
    let xoauth2 = Mechanism::XOAuth2.initial_response(user, &token, "mx.fuzz", 993);
    let fields: Vec<&[u8]> = xoauth2.expose().split(|&b| b == 1).collect();
    assert_eq!(
        fields,
        [
            format!("user={user}").as_bytes(),
            bearer.as_bytes(),
            b"",
            b""
        ]
    );

    let oauthbearer = Mechanism::OAuthBearer.initial_response(user, &token, "mx.fuzz", 993);
    let fields: Vec<&[u8]> = oauthbearer.expose().split(|&b| b == 1).collect();
    assert_eq!(fields.len(), 6, "{fields:?}");
    assert_eq!(
        fields[1..],
        [
            &b"host=mx.fuzz"[..],
            b"port=993",
            bearer.as_bytes(),
            b"",
            b""
        ]
    );
    // RFC 5801: the gs2 header is `n,a=<saslname>,` with `,` and `=` escaped in the name.
    let saslname = fields[0]
        .strip_prefix(b"n,a=")
        .and_then(|rest| rest.strip_suffix(b","))
        .expect("gs2 header");
    assert!(!saslname.contains(&b','));
    let unescaped = String::from_utf8_lossy(saslname)
        .replace("=2C", ",")
        .replace("=3D", "=");
    assert_eq!(unescaped, user);
}
