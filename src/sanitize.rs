//! Making foreign text (client lines, upstream replies, token-source and identity-provider
//! fields) safe: for logs, control characters escaped and long words redacted; for the wire,
//! printable ASCII only.

use std::fmt;

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

/// Displays a client-supplied value (an account id, an EHLO name) with control characters
/// escaped as `\n`, `\u{1b}` and so on; everything else as is.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        Ok(())
    }
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
            "a\\nINFO forged \\u{1b}[31m"
        );
        assert_eq!(Escaped("bob\r\n").to_string(), "bob\\r\\n");
    }

    #[test]
    fn long_words_are_redacted() {
        let echo = format!("NO unknown {}", "QUFB".repeat(20));
        assert_eq!(for_log(&echo), "NO unknown [redacted]");
    }

    #[test]
    fn wire_text_keeps_printable_ascii() {
        assert_eq!(for_wire("mx\r\n* BYE ü"), "mx* BYE ");
    }
}
