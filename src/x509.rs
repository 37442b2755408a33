//! What mailgate reads from an X.509 certificate itself (RFC 5280 4.1): when it expires and
//! its public key, with a DER reader just big enough for the fields before them. rustls checks
//! the rest where it matters, during handshakes.

use std::path::Path;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use time::OffsetDateTime;

/// The parts of a certificate mailgate looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate<'a> {
    /// The end of the validity period.
    pub not_after: OffsetDateTime,
    /// The DER `SubjectPublicKeyInfo`, tag and length included.
    pub public_key_info: &'a [u8],
}

/// The tag of the optional `[0] EXPLICIT` version at the start of a TBSCertificate.
const VERSION_TAG: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// Reads `der`, a certificate.
///
/// # Errors
/// It is not DER, or not shaped like a certificate up to its public key.
pub fn parse(der: &[u8]) -> Result<Certificate<'_>, String> {
    read(der).ok_or_else(|| "not an X.509 certificate".to_owned())
}

fn read(der: &[u8]) -> Option<Certificate<'_>> {
    let (_, certificate, _) = element(der)?;
    let (_, tbs, _) = element(certificate)?;
    let (tag, _, after_version) = element(tbs)?;
    let mut fields = if tag == VERSION_TAG {
        after_version
    } else {
        tbs
    };
    // serialNumber, signature, issuer
    for _ in 0..3 {
        fields = element(fields)?.2;
    }
    let (_, validity, after_validity) = element(fields)?;
    let (_, _, after_not_before) = element(validity)?;
    let (tag, not_after, _) = element(after_not_before)?;
    // subject
    let after_subject = element(after_validity)?.2;
    let (_, _, after_key) = element(after_subject)?;
    Some(Certificate {
        not_after: time_of(tag, not_after)?,
        public_key_info: &after_subject[..after_subject.len() - after_key.len()],
    })
}

/// One DER element: its tag, its contents and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: the low bits count the length's bytes; a certificate needs at most four.
        let count = usize::from(first & 0x7f);
        if !(1..=4).contains(&count) {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(count)?;
        let length = bytes
            .iter()
            .fold(0usize, |length, &byte| length << 8 | usize::from(byte));
        (length, rest)
    };
    let (contents, rest) = rest.split_at_checked(length)?;
    Some((tag, contents, rest))
}

/// UTCTime `YYMMDDHHMMSSZ` (years 1950 to 2049) or GeneralizedTime `YYYYMMDDHHMMSSZ`, the two
/// forms RFC 5280 4.1.2.5 allows.
fn time_of(tag: u8, text: &[u8]) -> Option<OffsetDateTime> {
    let digits = text.strip_suffix(b"Z")?;
    let (year, rest) = match tag {
        UTC_TIME => {
            let (year, rest) = digits.split_at_checked(2)?;
            let year = number(year)?;
            (if year < 50 { 2000 + year } else { 1900 + year }, rest)
        }
        GENERALIZED_TIME => {
            let (year, rest) = digits.split_at_checked(4)?;
            (number(year)?, rest)
        }
        _ => return None,
    };
    if rest.len() != 10 {
        return None;
    }
    let two = |at: usize| number(&rest[at..at + 2]).and_then(|n| u8::try_from(n).ok());
    let month = time::Month::try_from(two(0)?).ok()?;
    let date = time::Date::from_calendar_date(i32::from(year), month, two(2)?).ok()?;
    let at = date.with_hms(two(4)?, two(6)?, two(8)?).ok()?;
    Some(at.assume_utc())
}

fn number(digits: &[u8]) -> Option<u16> {
    digits.iter().try_fold(0u16, |n, &digit| {
        digit
            .is_ascii_digit()
            .then(|| n * 10 + u16::from(digit - b'0'))
    })
}

/// When the first certificate in `cert_file` (a PEM chain) expires.
///
/// # Errors
/// The file is unreadable, holds no certificate, or one that does not parse.
pub fn earliest_expiry(cert_file: &Path) -> Result<OffsetDateTime, String> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let mut earliest: Option<OffsetDateTime> = None;
    for certificate in &chain {
        let at = parse(certificate)?.not_after;
        earliest = Some(earliest.map_or(at, |earliest| earliest.min(at)));
    }
    earliest.ok_or_else(|| "no PEM certificate in it".to_owned())
}

/// Days from `now` until `at`, rounded down; negative once past.
pub fn days_left(at: OffsetDateTime, now: SystemTime) -> i64 {
    (at - OffsetDateTime::from(now)).whole_days()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_time_forms_are_read() {
        let utc = time_of(UTC_TIME, b"491231235959Z").unwrap();
        assert_eq!((utc.year(), utc.day(), utc.second()), (2049, 31, 59));
        assert_eq!(time_of(UTC_TIME, b"500101000000Z").unwrap().year(), 1950);
        let general = time_of(GENERALIZED_TIME, b"20500101120000Z").unwrap();
        assert_eq!((general.year(), general.hour()), (2050, 12));
        assert!(time_of(UTC_TIME, b"491231235959").is_none());
        assert!(time_of(UTC_TIME, b"4912312359Z").is_none());
        assert!(time_of(0x04, b"491231235959Z").is_none());
    }

    #[test]
    fn lengths_in_long_form_are_read_and_bounded() {
        let mut long = vec![0x04, 0x82, 0x01, 0x00];
        long.extend([7u8; 256]);
        long.push(0x05);
        let (tag, contents, rest) = element(&long).unwrap();
        assert_eq!((tag, contents.len(), rest), (0x04, 256, &[0x05][..]));
        assert!(element(&[0x04, 0x85, 1, 1, 1, 1, 1]).is_none());
        assert!(element(&[0x04, 0x03, 1]).is_none());
    }
}
