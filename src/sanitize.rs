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
    fn wire_text_keeps_printable_ascii() {
        assert_eq!(for_wire("mx\r\n* BYE ü"), "mx* BYE ");
    }
}
