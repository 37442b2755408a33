//! The provider's cryptography, all on `ring`: RS256 JWT verification (RFC 7515/7519) and, for
//! tests, signing; the RSA key inside a certificate or SPKI (a small DER walk); certificate
//! thumbprints (`x5t#S256`, RFC 7515 section 4.1.8); PKCE S256 (RFC 7636 section 4.2); and
//! random opaque tokens.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, RsaKeyPair, UnparsedPublicKey};
use serde_json::{Map, Value};

/// How far in the future `iat` and `nbf` may lie (clocks of client and server differ).
const CLOCK_SKEW_SECS: i64 = 30;

/// A fresh unguessable token: `prefix` and 32 random bytes, base64url.
pub(super) fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("system random source");
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// `count` random values below `bound` (at most 256), without modulo bias.
pub(super) fn random_below(bound: u8, count: usize) -> Vec<u8> {
    let rng = SystemRandom::new();
    // Largest multiple of `bound` that fits a byte; bytes at or above it are drawn again.
    let limit = 256 - (256 % u16::from(bound));
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let mut byte = [0u8; 1];
        rng.fill(&mut byte).expect("system random source");
        if u16::from(byte[0]) < limit {
            out.push(byte[0] % bound);
        }
    }
    out
}

/// Seconds since the Unix epoch, the unit of JWT `exp`, `iat` and `nbf` (RFC 7519 section 2).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// base64url(SHA-256(`cert_der`)): the `x5t#S256` header of a JWT signed with that
/// certificate's key, and what Microsoft identity platform matches client assertions against.
pub fn x5t_s256(cert_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, cert_der))
}

/// The PKCE S256 code challenge for `verifier`: base64url(SHA-256(ASCII(verifier))).
pub fn pkce_s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// Whether `verifier` has the syntax RFC 7636 section 4.1 requires: 43 to 128 characters of
/// `[A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~"`. The same holds for an S256 challenge.
pub(super) fn is_pkce_syntax(verifier: &str) -> bool {
    (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Signs a compact JWS with RS256 (RSASSA-PKCS1-v1_5 with SHA-256) for tests: `header` and
/// `claims` are serialized as given, so a test can also build malformed or hostile tokens.
///
/// # Panics
/// When `pkcs8_der` is not an RSA private key in PKCS#8 DER that ring accepts.
pub fn sign_jwt_rs256(pkcs8_der: &[u8], header: &Value, claims: &Value) -> String {
    let key = RsaKeyPair::from_pkcs8(pkcs8_der).expect("RSA PKCS#8 private key");
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(
        &signature::RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .expect("RSA signing");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// A JWT whose RS256 signature checked out.
pub(super) struct VerifiedJwt {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
}

impl VerifiedJwt {
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header.get(name).and_then(Value::as_str)
    }

    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// A NumericDate claim (RFC 7519 section 2: a JSON number of seconds, fractions allowed).
    pub fn claim_time(&self, name: &str) -> Option<i64> {
        let value = self.claims.get(name)?;
        value
            .as_i64()
            .or_else(|| value.as_f64().map(|f| f.floor() as i64))
    }

    /// Whether `aud` is `expected` or, as RFC 7519 section 4.1.3 allows, an array holding it.
    pub fn audience_is(&self, expected: &str) -> bool {
        match self.claims.get("aud") {
            Some(Value::String(aud)) => aud == expected,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(expected)),
            _ => false,
        }
    }

    /// `exp` required, in the future and at most `max_secs` ahead (of now, and of `iat` when
    /// present); `iat` and `nbf`, when present, not in the future beyond the skew.
    pub fn check_times(&self, now: i64, max_secs: i64) -> Result<(), &'static str> {
        let exp = self.claim_time("exp").ok_or("exp missing")?;
        if exp <= now {
            return Err("assertion expired");
        }
        if exp > now + max_secs + CLOCK_SKEW_SECS {
            return Err("exp too far in the future");
        }
        if let Some(iat) = self.claim_time("iat") {
            if iat > now + CLOCK_SKEW_SECS {
                return Err("iat in the future");
            }
            if exp - iat > max_secs {
                return Err("assertion lifetime too long");
            }
        }
        if self
            .claim_time("nbf")
            .is_some_and(|nbf| nbf > now + CLOCK_SKEW_SECS)
        {
            return Err("nbf in the future");
        }
        Ok(())
    }
}

/// Splits a compact JWS into its three base64url parts (RFC 7515 section 7.1).
fn split_jws(jwt: &str) -> Result<[&str; 3], &'static str> {
    let mut parts = jwt.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(c), Some(s), None) => Ok([h, c, s]),
        _ => Err("not a compact JWS with three parts"),
    }
}

fn decode_object(part: &str) -> Result<Map<String, Value>, &'static str> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| "JWT part is not base64url")?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err("JWT part is not a JSON object"),
    }
}

/// The claims of `jwt` WITHOUT checking anything: only to find out whose key verifies it.
pub(super) fn peek_claims(jwt: &str) -> Result<Map<String, Value>, &'static str> {
    decode_object(split_jws(jwt)?[1])
}

/// Verifies `jwt` as RS256 or PS256 (RSASSA-PSS, what Microsoft now asks of client
/// assertions) under `rsa_public_key` (PKCS#1 `RSAPublicKey` DER, from [`rsa_public_key`]).
/// Refuses any other `alg`, including `none`; claims are not checked.
pub(super) fn verify_rs256(jwt: &str, rsa_public_key: &[u8]) -> Result<VerifiedJwt, &'static str> {
    let [header_b64, claims_b64, sig_b64] = split_jws(jwt)?;
    let header = decode_object(header_b64)?;
    let algorithm: &dyn signature::VerificationAlgorithm =
        match header.get("alg").and_then(Value::as_str) {
            Some("RS256") => &signature::RSA_PKCS1_2048_8192_SHA256,
            Some("PS256") => &signature::RSA_PSS_2048_8192_SHA256,
            _ => return Err("alg is neither RS256 nor PS256"),
        };
    // RFC 7515 section 4.1.11: extensions listed in `crit` must be understood; none are here.
    if header.contains_key("crit") {
        return Err("unsupported crit header");
    }
    let sig = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| "signature is not base64url")?;
    let signing_input = &jwt[..header_b64.len() + 1 + claims_b64.len()];
    UnparsedPublicKey::new(algorithm, rsa_public_key)
        .verify(signing_input.as_bytes(), &sig)
        .map_err(|_| "bad signature")?;
    let claims = decode_object(claims_b64)?;
    Ok(VerifiedJwt { header, claims })
}

// --- DER ------------------------------------------------------------------------------------

const TAG_SEQUENCE: u8 = 0x30;
const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;
const TAG_VERSION: u8 = 0xa0; // [0] EXPLICIT Version in TBSCertificate (RFC 5280 section 4.1)
/// 1.2.840.113549.1.1.1 rsaEncryption (RFC 8017 appendix A.1).
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// One DER element: its tag, contents, and the bytes after it.
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), &'static str> {
    let (&tag, rest) = input.split_first().ok_or("DER: truncated")?;
    let (&first, rest) = rest.split_first().ok_or("DER: truncated")?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form; 0x80 (indefinite length) is BER, never DER.
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err("DER: bad length");
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err("DER: truncated");
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], tag: u8) -> Result<(&[u8], &[u8]), &'static str> {
    match tlv(input)? {
        (t, contents, rest) if t == tag => Ok((contents, rest)),
        _ => Err("DER: unexpected element"),
    }
}

/// The RSA public key (PKCS#1 `RSAPublicKey` DER, what ring verifies with) inside `der`, which
/// is either an X.509 certificate or a SubjectPublicKeyInfo (`openssl pkey -pubout -outform
/// DER`).
pub(super) fn rsa_public_key(der: &[u8]) -> Result<Vec<u8>, &'static str> {
    let (outer, trailing) = expect(der, TAG_SEQUENCE)?;
    if !trailing.is_empty() {
        return Err("DER: trailing bytes");
    }
    let (first, _) = expect(outer, TAG_SEQUENCE)?;
    let spki = if tlv(first)?.0 == TAG_OID {
        // SubjectPublicKeyInfo: SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey }.
        outer
    } else {
        // Certificate: SEQUENCE { tbsCertificate, ... }; TBSCertificate (RFC 5280 4.1):
        // [0] version OPTIONAL, serialNumber, signature, issuer, validity, subject, spki.
        let mut rest = first;
        if tlv(rest)?.0 == TAG_VERSION {
            rest = tlv(rest)?.2;
        }
        rest = expect(rest, TAG_INTEGER)?.1;
        for _ in 0..4 {
            rest = expect(rest, TAG_SEQUENCE)?.1;
        }
        expect(rest, TAG_SEQUENCE)?.0
    };
    let (algorithm, rest) = expect(spki, TAG_SEQUENCE)?;
    let (oid, _) = expect(algorithm, TAG_OID)?;
    if oid != OID_RSA_ENCRYPTION {
        return Err("not an RSA key");
    }
    let (bits, _) = expect(rest, TAG_BIT_STRING)?;
    match bits.split_first() {
        Some((0, key)) => Ok(key.to_vec()),
        _ => Err("DER: bad bit string"),
    }
}
