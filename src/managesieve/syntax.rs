//! ManageSieve's words (RFC 5804 4): atoms, strings (quoted or literal) and the parentheses of
//! response codes, read from one framed message; and strings quoted for the wire. No I/O.

use std::fmt;

/// RFC 5804 4: `quoted = DQUOTE *1024QUOTED-CHAR DQUOTE`; longer strings go as literals.
pub const MAX_QUOTED: usize = 1024;

/// One word of a command or response.
#[derive(Clone, PartialEq, Eq)]
pub enum Token {
    /// A command name, `OK`/`NO`/`BYE`, or a response code: as sent, not case-folded.
    Atom(String),
    /// A quoted string or literal, unescaped; may hold SASL data, so `Debug` shows its length.
    String(Vec<u8>),
    Open,
    Close,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Atom(atom) => write!(f, "Atom({atom:?})"),
            Token::String(bytes) => write!(f, "String({} bytes)", bytes.len()),
            Token::Open => f.write_str("Open"),
            Token::Close => f.write_str("Close"),
        }
    }
}

/// The words of one complete message (as the `Fragmentizer` frames it: lines ending in CRLF,
/// or LF as it accepts too, each literal after its announcement). `None` when malformed.
pub fn tokenize(message: &[u8]) -> Option<Vec<Token>> {
    let mut rest = line_end(message)?;
    let mut tokens = Vec::new();
    loop {
        while let [b' ', after @ ..] = rest {
            rest = after;
        }
        let Some(&first) = rest.first() else {
            return Some(tokens);
        };
        let (token, after) = match first {
            b'"' => quoted(&rest[1..])?,
            b'{' => literal(&rest[1..])?,
            b'(' => (Token::Open, &rest[1..]),
            b')' => (Token::Close, &rest[1..]),
            _ => atom(rest)?,
        };
        tokens.push(token);
        rest = after;
    }
}

/// `bytes` without its final line ending.
fn line_end(bytes: &[u8]) -> Option<&[u8]> {
    let line = bytes.strip_suffix(b"\n")?;
    Some(line.strip_suffix(b"\r").unwrap_or(line))
}

fn atom(bytes: &[u8]) -> Option<(Token, &[u8])> {
    let end = bytes
        .iter()
        .position(|b| matches!(b, b' ' | b'(' | b')' | b'"' | b'{'))
        .unwrap_or(bytes.len());
    let (word, rest) = bytes.split_at(end);
    if word.is_empty() || !word.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    let word = String::from_utf8(word.to_vec()).ok()?;
    Some((Token::Atom(word), rest))
}

/// After the opening quote: RFC 5804 4 allows only `\"` and `\\` as escapes, and no CR, LF
/// or NUL.
fn quoted(bytes: &[u8]) -> Option<(Token, &[u8])> {
    let mut value = Vec::new();
    let mut iter = bytes.iter().enumerate();
    while let Some((index, &byte)) = iter.next() {
        match byte {
            b'"' => return Some((Token::String(value), &bytes[index + 1..])),
            b'\\' => match iter.next() {
                Some((_, &escaped @ (b'"' | b'\\'))) => value.push(escaped),
                _ => return None,
            },
            b'\r' | b'\n' | 0 => return None,
            _ => value.push(byte),
        }
        if value.len() > MAX_QUOTED {
            return None;
        }
    }
    None
}

/// After the opening brace: `n}` or `n+}`, the line ending, then `n` octets (RFC 5804 4:
/// clients send `{n+}`, servers `{n}`; both are read the same, without a continuation).
fn literal(bytes: &[u8]) -> Option<(Token, &[u8])> {
    let close = bytes.iter().position(|&b| b == b'}')?;
    let (length, rest) = bytes.split_at(close);
    let length = length.strip_suffix(b"+").unwrap_or(length);
    if length.is_empty() || !length.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let length: usize = std::str::from_utf8(length).ok()?.parse().ok()?;
    let rest = &rest[1..];
    let rest = rest
        .strip_prefix(b"\r\n")
        .or_else(|| rest.strip_prefix(b"\n"))?;
    if rest.len() < length {
        return None;
    }
    let (value, rest) = rest.split_at(length);
    Some((Token::String(value.to_vec()), rest))
}

/// `bytes` as a quoted string, or `None` when it cannot be one (too long, not UTF-8, or
/// holding CR, LF or NUL).
pub fn quote(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    if bytes.len() > MAX_QUOTED || text.contains(['\r', '\n', '\0']) {
        return None;
    }
    Some(format!(
        "\"{}\"",
        text.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// Words as one line in quoted form, or `None` when a string cannot be quoted.
pub fn render(tokens: &[Token]) -> Option<String> {
    let mut line = String::new();
    let mut after_open = true;
    for token in tokens {
        if !after_open && *token != Token::Close {
            line.push(' ');
        }
        match token {
            Token::Atom(atom) => line.push_str(atom),
            Token::String(bytes) => line.push_str(&quote(bytes)?),
            Token::Open => line.push('('),
            Token::Close => line.push(')'),
        }
        after_open = *token == Token::Open;
    }
    Some(line)
}

/// A capability line (RFC 5804 1.7: a name and an optional value, both strings) as its
/// upper-cased name and its value (empty when absent); `None` for anything else.
pub fn capability(line: &str) -> Option<(String, String)> {
    let tokens = tokenize(format!("{line}\r\n").as_bytes())?;
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).ok();
    match tokens.as_slice() {
        [Token::String(name)] => Some((text(name)?.to_ascii_uppercase(), String::new())),
        [Token::String(name), Token::String(value)] => {
            Some((text(name)?.to_ascii_uppercase(), text(value)?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(text: &str) -> Token {
        Token::String(text.as_bytes().to_vec())
    }

    fn atom(text: &str) -> Token {
        Token::Atom(text.to_owned())
    }

    #[test]
    fn commands_with_quoted_strings_and_literals() {
        assert_eq!(
            tokenize(b"Authenticate \"PLAIN\" {5+}\r\nab\"\\c\r\n"),
            Some(vec![
                atom("Authenticate"),
                string("PLAIN"),
                string("ab\"\\c")
            ])
        );
        assert_eq!(
            tokenize(b"NOOP \"a\\\"b\\\\\"\r\n"),
            Some(vec![atom("NOOP"), string("a\"b\\")])
        );
        assert_eq!(
            tokenize(b"X {3}\nabc\n"),
            Some(vec![atom("X"), string("abc")])
        );
        assert_eq!(tokenize(b"\r\n"), Some(vec![]));
    }

    #[test]
    fn responses_with_codes() {
        assert_eq!(
            tokenize(b"NO (TRYLATER) \"busy\"\r\n"),
            Some(vec![
                atom("NO"),
                Token::Open,
                atom("TRYLATER"),
                Token::Close,
                string("busy")
            ])
        );
        let tokens = tokenize(b"OK (SASL \"eA==\") \"Logged in.\"\r\n").unwrap();
        assert_eq!(
            render(&tokens).unwrap(),
            "OK (SASL \"eA==\") \"Logged in.\""
        );
    }

    #[test]
    fn malformed_input_is_refused() {
        for bad in [
            &b"NOOP \"a\\nb\"\r\n"[..],
            b"NOOP \"open\r\n",
            b"NOOP {5+}\r\nabc\r\n",
            b"NOOP {x}\r\n\r\n",
            b"NOOP {}\r\n\r\n",
            b"NO\x01OP\r\n",
            b"NOOP",
        ] {
            assert_eq!(tokenize(bad), None, "{bad:?}");
        }
        let long = format!("NOOP \"{}\"\r\n", "a".repeat(MAX_QUOTED + 1));
        assert_eq!(tokenize(long.as_bytes()), None);
        let longest = format!("NOOP \"{}\"\r\n", "a".repeat(MAX_QUOTED));
        assert!(tokenize(longest.as_bytes()).is_some());
    }

    #[test]
    fn quoting_escapes_or_refuses() {
        assert_eq!(quote(b"a\"b\\").unwrap(), "\"a\\\"b\\\\\"");
        assert_eq!(quote(b"a\r\nOK"), None);
        assert_eq!(quote(&[0xff]), None);
    }

    #[test]
    fn capability_lines() {
        assert_eq!(
            capability("\"sieve\" \"fileinto vacation\""),
            Some(("SIEVE".to_owned(), "fileinto vacation".to_owned()))
        );
        assert_eq!(
            capability("\"STARTTLS\""),
            Some(("STARTTLS".to_owned(), String::new()))
        );
        assert_eq!(capability("SIEVE \"x\""), None);
        assert_eq!(capability("\"A\" \"b\" \"c\""), None);
    }
}
