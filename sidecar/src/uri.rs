//! Resource URIs read the way servers read them.
//!
//! Servers built on the official SDKs hand `params.uri` to a WHATWG URL parser before
//! they look a resource up: dot segments (`/../`, `/./`, also spelled `%2e`) are
//! resolved, tabs and newlines vanish, leading and trailing spaces and C0 controls are
//! dropped, the scheme (and a special scheme's host) is lowercased, `\` is `/` in
//! `http`/`file` URLs. Other servers compare the string as sent. A resource rule must
//! hold for both readings, so the sidecar accepts a URI only when the two agree: when
//! the WHATWG reading, spelled out, is the URI as sent, up to percent-encoding that
//! changes no meaning (`%41` is `A`, `%C3%A9` is `é`, `%20` is a space). Any other URI
//! is refused, naming the form to send instead. Policy then judges that one meaning,
//! with every such escape decoded; the bytes forwarded are the agent's own.
//!
//! Percent-escapes of delimiters (`%2F`, `%3F`, …), of `%`, `\` and of control
//! characters keep their escape: they mean something else than the character.
//!
//! This module does not match globs (see [`crate::policy`]).

use std::borrow::Cow;

use crate::proxy::truncate;

/// Why a resource URI was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("resource URI {0:?} is not an absolute URI")]
    NotAbsolute(String),
    #[error("resource URI {sent:?} is read by servers as {normal:?}; send it in that form")]
    NotNormal { sent: String, normal: String },
    #[error("resource URI {0:?} has percent-escapes that are not UTF-8")]
    NotUtf8(String),
}

/// The meaning of `uri` as policy judges it, or why it cannot be judged.
pub fn canonical(uri: &str) -> Result<Cow<'_, str>, UriError> {
    let parsed = url::Url::parse(uri).map_err(|_| UriError::NotAbsolute(truncate(uri)))?;
    let sent = decode(uri).ok_or_else(|| UriError::NotUtf8(truncate(uri)))?;
    let normal = decode(parsed.as_str()).ok_or_else(|| UriError::NotUtf8(truncate(uri)))?;
    if sent == normal {
        return Ok(sent);
    }
    // `https://host` and `https://host/` name the same thing for every reader.
    if parsed.path() == "/"
        && parsed.query().is_none()
        && parsed.fragment().is_none()
        && normal.strip_suffix('/') == Some(&*sent)
    {
        return Ok(sent);
    }
    Err(UriError::NotNormal {
        sent: truncate(uri),
        normal: truncate(&normal),
    })
}

/// Does `%XX` decoding to `byte` change nothing a URL parser sees?
fn meaningless_escape(byte: u8) -> bool {
    match byte {
        // Controls, space's neighbours in meaning are kept; `%` and `\` too.
        0x00..=0x1f | 0x7f | b'%' | b'\\' => false,
        // RFC 3986 gen-delims and sub-delims: an escape means "not a delimiter".
        b':' | b'/' | b'?' | b'#' | b'[' | b']' | b'@' | b'!' | b'$' | b'&' | b'\'' | b'('
        | b')' | b'*' | b'+' | b',' | b';' | b'=' => false,
        _ => true,
    }
}

/// `text` with every meaningless percent-escape decoded; `None` if the result is not
/// UTF-8.
fn decode(text: &str) -> Option<Cow<'_, str>> {
    if !text.contains('%') {
        return Some(Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            && meaningless_escape(byte)
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(uri: &str) -> String {
        canonical(uri)
            .unwrap_or_else(|e| panic!("{uri}: {e}"))
            .into_owned()
    }

    #[test]
    fn uris_in_normal_form_are_judged_as_sent() {
        for uri in [
            "test://static/resource/1",
            "docs://public/readme.md",
            "file:///tmp/a.txt",
            "https://example.com/a?b=c#d",
            "urn:isbn:0451450523",
            "docs://public/a%2Fb",
            "docs://x/%25",
        ] {
            assert_eq!(ok(uri), uri);
        }
        assert_eq!(ok("https://example.com"), "https://example.com");
    }

    #[test]
    fn escapes_that_change_nothing_are_judged_decoded() {
        assert_eq!(ok("docs://%73ecret/x"), "docs://secret/x");
        assert_eq!(ok("docs://public/caf%C3%A9"), "docs://public/café");
        assert_eq!(ok("docs://public/café"), "docs://public/café");
        assert_eq!(ok("docs://public/a%20b"), "docs://public/a b");
        assert_eq!(ok("docs://public/a b"), "docs://public/a b");
        // A URI template (completion/complete) keeps its braces.
        assert_eq!(ok("file:///{path}"), "file:///{path}");
    }

    #[test]
    fn uris_a_server_reads_otherwise_are_refused_with_their_normal_form() {
        for (sent, normal) in [
            ("docs://public/../secret", "docs://public/secret"),
            ("docs://host/public/../secret", "docs://host/secret"),
            ("docs://host/public/%2e%2e/secret", "docs://host/secret"),
            ("docs://host/public/./secret", "docs://host/public/secret"),
            ("DOCS://host/x", "docs://host/x"),
            ("docs://host/se\tcret", "docs://host/secret"),
            ("docs://host/se\ncret", "docs://host/secret"),
            (" docs://host/secret", "docs://host/secret"),
            ("docs://host/secret\u{1}", "docs://host/secret"),
            ("file:///public\\..\\secret", "file:///secret"),
            ("HTTPS://EXAMPLE.com/x", "https://example.com/x"),
        ] {
            match canonical(sent) {
                Err(UriError::NotNormal { normal: n, .. }) => assert_eq!(n, normal, "{sent:?}"),
                other => panic!("{sent:?}: {other:?}"),
            }
        }
        assert!(matches!(
            canonical("readme.md"),
            Err(UriError::NotAbsolute(_))
        ));
        assert!(matches!(canonical(""), Err(UriError::NotAbsolute(_))));
        assert!(matches!(
            canonical("docs://x/%FF"),
            Err(UriError::NotUtf8(_))
        ));
    }
}
