//! Making foreign text (client lines, upstream replies, token-source and identity-provider
//! fields) safe: for logs, control characters escaped and long words and echoed secrets
//! redacted; for the wire, printable ASCII only.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// Words longer than this in foreign text are replaced before logging: base64 of even a short
/// token is longer, while human-readable words and host names rarely are.
const MAX_LOGGED_WORD: usize = 40;

/// Foreign text to put in a log line: control characters escaped (so a value cannot forge a
/// line or send terminal escapes) and long words, which may be echoed tokens or SASL payloads,
/// replaced by `[redacted]`.
pub fn for_log(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            if word.chars().count() > MAX_LOGGED_WORD {
                "[redacted]".to_owned()
            } else {
                Escaped(word).to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Pieces of a secret at least this long are redacted wherever they appear: shorter ones are
/// too little of a token to matter and too likely to occur by chance.
const MIN_ECHO: usize = 12;

/// A base64 echo of [`MIN_ECHO`] characters has at least this many equal to one of the three
/// encodings of the whole secret: padding carries no data, and the character before it has zero
/// bits where the whole encoding has the next byte's.
const MIN_EXACT_BASE64: usize = 9;

/// `text` with every piece of a secret in `sent` of [`MIN_ECHO`] characters or more replaced by
/// `[redacted]`: the plain bytes, or base64 of any part of them. Servers may quote what they
/// refuse in short words, which [`for_log`] lets through.
///
/// Base64 of a part starting at byte `i` equals the encoding of the secret from `i mod 3` on,
/// except for its last group, so three encodings per secret cover every alignment.
pub fn without_echoes(text: &str, sent: &[&[u8]]) -> String {
    let bytes = text.as_bytes();
    let mut hidden = vec![false; bytes.len()];
    let plain: HashSet<&[u8]> = sent.iter().flat_map(|s| s.windows(MIN_ECHO)).collect();
    for (start, window) in bytes.windows(MIN_ECHO).enumerate() {
        if plain.contains(window) {
            hidden[start..start + MIN_ECHO].fill(true);
        }
    }
    let encodings: Vec<String> = sent
        .iter()
        .flat_map(|secret| (0..3).filter_map(|skip| secret.get(skip..)))
        .map(|rest| BASE64.encode(rest))
        .collect();
    let encoded: HashSet<&[u8]> = encodings
        .iter()
        .flat_map(|encoding| encoding.as_bytes().windows(MIN_EXACT_BASE64))
        .collect();
    for run in base64_runs(bytes) {
        let words = &bytes[run.clone()];
        if words.len() >= MIN_ECHO
            && words
                .windows(MIN_EXACT_BASE64)
                .any(|window| encoded.contains(window))
        {
            hidden[run].fill(true);
        }
    }
    let mut shown = String::with_capacity(text.len());
    let mut in_redaction = false;
    for (at, c) in text.char_indices() {
        if hidden[at..at + c.len_utf8()].contains(&true) {
            if !in_redaction {
                shown.push_str("[redacted]");
            }
            in_redaction = true;
        } else {
            shown.push(c);
            in_redaction = false;
        }
    }
    shown
}

/// The maximal runs of base64 characters (padding included) in `bytes`.
fn base64_runs(bytes: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let is_base64 = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
    let mut at = 0;
    std::iter::from_fn(move || {
        let start = at + bytes[at..].iter().position(is_base64)?;
        let len = bytes[start..]
            .iter()
            .position(|b| !is_base64(b))
            .unwrap_or(bytes.len() - start);
        at = start + len;
        Some(start..at)
    })
}

/// Client-supplied values longer than this are cut when logged: an account id is short, and
/// a 9 KB one must not fill the logs.
const MAX_LOGGED_VALUE: usize = 128;

/// Displays a client-supplied value (an account id, an EHLO name) with control characters
/// and invisible formatting characters escaped as `\n`, `\u{1b}`, `\u{2028}` and so on,
/// cut after [`MAX_LOGGED_VALUE`] characters; everything else as is.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX_LOGGED_VALUE {
                return f.write_str("...");
            }
            if is_hidden(c) {
                write!(f, "{}", c.escape_unicode())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        Ok(())
    }
}

/// Control characters, and the Unicode characters that break or reorder lines on a screen
/// without showing: line and paragraph separators, bidirectional controls, zero-width
/// characters and the byte-order mark.
pub fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}')
}

/// Text to put on the wire in a reply of our own: printable ASCII and spaces only, so it can
/// neither end the line early nor smuggle another response.
pub fn for_wire(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_logs() {
        assert_eq!(
            for_log("a\nINFO forged \u{1b}[31m"),
            "a\\u{a}INFO forged \\u{1b}[31m"
        );
        assert_eq!(Escaped("bob\r\n").to_string(), "bob\\u{d}\\u{a}");
        assert_eq!(
            Escaped("mallory\u{2028} INFO forged\u{202e}").to_string(),
            "mallory\\u{2028} INFO forged\\u{202e}"
        );
        assert_eq!(Escaped(&"x".repeat(500)).to_string().len(), 131);
    }

    #[test]
    fn long_words_are_redacted() {
        let echo = format!("NO unknown {}", "QUFB".repeat(20));
        assert_eq!(for_log(&echo), "NO unknown [redacted]");
    }

    #[test]
    fn echoes_of_twelve_characters_are_redacted_at_every_alignment() {
        let message = b"user=a@b.c\x01auth=Bearer SECRETTOKENabc123xyz\x01\x01";
        let sent: &[&[u8]] = &[b"SECRETTOKENabc123xyz", message];
        for part in [&message[19..], b"TOKENabc", b"ETTOKEN", b"SECRETTOKENa"] {
            let encoded = BASE64.encode(part);
            assert_eq!(
                without_echoes(&format!("NO {encoded}."), sent),
                "NO [redacted]."
            );
        }
        let whole = BASE64.encode(message);
        for split in whole.as_bytes().chunks(12) {
            let split = std::str::from_utf8(split).unwrap();
            assert_eq!(
                without_echoes(&format!("x {split} y"), sent),
                "x [redacted] y"
            );
        }
        assert_eq!(
            without_echoes("NO Bearer SECRETTOKENab ü", sent),
            "NO [redacted] ü"
        );
    }

    #[test]
    fn short_pieces_and_other_text_are_kept() {
        let sent: &[&[u8]] = &[b"SECRETTOKENabc123xyz"];
        let text = "NO [AUTHENTICATIONFAILED] Invalid credentials SECRETTOKEN U0VDUkVU";
        assert_eq!(without_echoes(text, sent), text);
    }

    #[test]
    fn wire_text_keeps_printable_ascii() {
        assert_eq!(for_wire("mx\r\n* BYE ü"), "mx* BYE ");
    }
}
