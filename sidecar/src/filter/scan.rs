//! Walking JSON text that serde_json has already validated, without parsing it again.
//!
//! Filtering a list used to parse the same bytes four times (the message, its
//! `result`, the list array, then each item for its name), and serde_json's skipping
//! of the members nobody reads was most of the sidecar's CPU on a large `tools/list`.
//! The list filter now validates the message once with serde_json (strict RFC 8259:
//! anything it refuses is still refused) and then finds members and items here, in
//! one pass: a string is skipped to its closing quote, a container by counting
//! brackets outside strings. Keys are compared as agents read them: a key
//! written with escapes is decoded (by serde_json, so a lone surrogate is refused).
//!
//! Precondition: the text is valid JSON. On anything else these functions never panic
//! and never read outside the text, but what they report is unspecified.

use std::borrow::Cow;

/// Index of the first byte at or after `i` that is not JSON whitespace.
pub(crate) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// Index just past the string that opens at `i` (a quote). A plain loop: most strings
/// in a list are a few bytes long, where `memchr`'s setup costs more than it saves.
fn string_end(b: &[u8], i: usize) -> usize {
    let mut j = i + 1;
    while let Some(&c) = b.get(j) {
        match c {
            b'"' => return j + 1,
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
    b.len()
}

/// Index just past the value that starts at `i`.
pub(crate) fn value_end(b: &[u8], i: usize) -> usize {
    match b.get(i) {
        Some(b'"') => string_end(b, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while let Some(&c) = b.get(j) {
                match c {
                    b'"' => {
                        j = string_end(b, j);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return j + 1;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            b.len()
        }
        // A number or a literal: up to the next delimiter.
        _ => {
            let mut j = i;
            while let Some(c) = b.get(j) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                j += 1;
            }
            j
        }
    }
}

/// A member's key as written (between its quotes, escapes not decoded).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Key<'a>(&'a str);

impl<'a> Key<'a> {
    /// The key as an agent reads it; `None` when its escapes do not decode (a lone
    /// surrogate).
    pub(crate) fn decoded(self) -> Option<Cow<'a, str>> {
        if !self.0.contains('\\') {
            return Some(Cow::Borrowed(self.0));
        }
        let quoted = format!("\"{}\"", self.0);
        serde_json::from_str::<String>(&quoted).ok().map(Cow::Owned)
    }
}

/// The members of the object `text`, in order: each key and the raw text of its
/// value; `None` when `text` is not an object.
pub(crate) fn members(text: &str) -> Option<Members<'_>> {
    let at = skip_ws(text.as_bytes(), 0);
    (text.as_bytes().get(at) == Some(&b'{')).then_some(Members {
        text,
        at: at + 1,
        done: false,
    })
}

/// The object that opens `text` (the text may go on after it): its members, and
/// once they are exhausted, where it ends ([`Members::end`]). `None` when `text` does
/// not start with an object.
pub(crate) fn object_at(text: &str) -> Option<Members<'_>> {
    (text.as_bytes().first() == Some(&b'{')).then_some(Members {
        text,
        at: 1,
        done: false,
    })
}

/// The items of the array `text`, in order, as raw text; `None` when `text` is not an
/// array.
pub(crate) fn elements(text: &str) -> Option<Elements<'_>> {
    let at = skip_ws(text.as_bytes(), 0);
    (text.as_bytes().get(at) == Some(&b'[')).then_some(Elements {
        text,
        at: at + 1,
        done: false,
    })
}

/// See [`members`].
pub(crate) struct Members<'a> {
    text: &'a str,
    at: usize,
    done: bool,
}

impl<'a> Members<'a> {
    /// Index just past the object's closing brace, once every member was returned.
    pub(crate) fn end(&self) -> Option<usize> {
        self.done.then_some(self.at)
    }

    /// The next member's key and where its value starts; the caller walks the value
    /// and says where it ended ([`Members::resume_at`]).
    fn next_key(&mut self) -> Option<(Key<'a>, usize)> {
        if self.done {
            return None;
        }
        let b = self.text.as_bytes();
        let mut i = skip_ws(b, self.at);
        if b.get(i) == Some(&b',') {
            i = skip_ws(b, i + 1);
        }
        if b.get(i) != Some(&b'"') {
            self.done = true;
            self.at = (i + 1).min(b.len());
            return None;
        }
        let key_end = string_end(b, i);
        let colon = skip_ws(b, key_end);
        let start = skip_ws(b, colon + 1);
        match self.text.get(i + 1..key_end.saturating_sub(1)) {
            Some(key) if b.get(colon) == Some(&b':') && start < b.len() => {
                self.at = start;
                Some((Key(key), start))
            }
            _ => {
                self.done = true;
                self.at = b.len();
                None
            }
        }
    }

    /// Go on after a value that ended at `end`.
    fn resume_at(&mut self, end: usize) {
        self.at = end.max(self.at + 1).min(self.text.len());
    }

    /// The next member's key, and where its value starts and ends in the text.
    fn next_span(&mut self) -> Option<(Key<'a>, usize, usize)> {
        let (key, start) = self.next_key()?;
        let end = value_end(self.text.as_bytes(), start);
        self.resume_at(end);
        Some((key, start, end))
    }
}

impl<'a> Iterator for Members<'a> {
    type Item = (Key<'a>, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let (key, start, end) = self.next_span()?;
        Some((key, self.text.get(start..end)?))
    }
}

/// See [`elements`].
pub(crate) struct Elements<'a> {
    text: &'a str,
    at: usize,
    done: bool,
}

impl<'a> Iterator for Elements<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.done {
            return None;
        }
        let b = self.text.as_bytes();
        let mut i = skip_ws(b, self.at);
        if b.get(i) == Some(&b',') {
            i = skip_ws(b, i + 1);
        }
        if matches!(b.get(i), None | Some(b']')) {
            self.done = true;
            return None;
        }
        let end = value_end(b, i);
        self.at = end;
        self.text.get(i..end)
    }
}

/// What a walk over a value found: its replacement, if any, and its length in bytes.
pub(crate) type Walked = Result<(Option<String>, usize), ()>;

/// The object that opens `text` with the value of every member named `key` replaced by
/// what `inner` makes of it, and the object's length. `inner` is given the text from
/// the value's first byte to the end and says how long the value was (so no value is
/// walked twice); `None` keeps it. Everything else, keys and whitespace included, is
/// copied byte for byte. `Err` when `text` does not open with an object, a key does
/// not decode, or `inner` fails; `Ok((None, _))` when nothing was replaced.
pub(crate) fn replace_values(
    text: &str,
    key: &str,
    mut inner: impl FnMut(&str) -> Walked,
) -> Walked {
    let mut members = object_at(text).ok_or(())?;
    let mut out: Option<String> = None;
    let mut copied = 0;
    while let Some((name, start)) = members.next_key() {
        let rest = text.get(start..).ok_or(())?;
        if name.decoded().ok_or(())? != key {
            members.resume_at(value_end(text.as_bytes(), start));
            continue;
        }
        let (new, len) = inner(rest)?;
        members.resume_at(start + len);
        if let Some(new) = new {
            let out = out.get_or_insert_with(|| String::with_capacity(text.len()));
            out.push_str(text.get(copied..start).ok_or(())?);
            out.push_str(&new);
            copied = start + len;
        }
    }
    let end = members.end().ok_or(())?;
    let out = match out {
        Some(mut out) => {
            out.push_str(text.get(copied..end).ok_or(())?);
            Some(out)
        }
        None => None,
    };
    Ok((out, end))
}

/// [`replace_values`] for an `inner` that takes the value's exact text.
pub(crate) fn value_walk(
    mut inner: impl FnMut(&str) -> Result<Option<String>, ()>,
) -> impl FnMut(&str) -> Walked {
    move |rest: &str| {
        let len = value_end(rest.as_bytes(), 0);
        Ok((inner(rest.get(..len).ok_or(())?)?, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<(String, String)> {
        members(text)
            .expect("an object")
            .map(|(k, v)| (k.decoded().expect("key").into_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn members_are_found_as_serde_json_reads_them() {
        let text = r#" { "a" : 1 , "b\"}" :"x\\\"}]" ,"c":{"d":[1,{"e":"]}"}]}, "n\u0061me":null,"f":-1.5e3,"g":true}  "#;
        assert_eq!(
            keys(text),
            vec![
                ("a".to_owned(), "1".to_owned()),
                ("b\"}".to_owned(), r#""x\\\"}]""#.to_owned()),
                ("c".to_owned(), r#"{"d":[1,{"e":"]}"}]}"#.to_owned()),
                ("name".to_owned(), "null".to_owned()),
                ("f".to_owned(), "-1.5e3".to_owned()),
                ("g".to_owned(), "true".to_owned()),
            ]
        );
        assert!(keys("{}").is_empty());
        assert!(members("[1]").is_none());
        // Whatever the scanner finds, serde_json finds the same members.
        let parsed: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).expect("valid");
        for (k, v) in keys(text) {
            let raw: serde_json::Value = serde_json::from_str(&v).expect("a value");
            assert_eq!(parsed.get(&k), Some(&raw), "{k}");
        }
    }

    #[test]
    fn elements_and_lone_surrogate_keys() {
        let items: Vec<&str> = elements(r#"[ {"a":"[,"} , 2,"s" ,[[]] ]"#)
            .expect("an array")
            .collect();
        assert_eq!(items, vec![r#"{"a":"[,"}"#, "2", r#""s""#, "[[]]"]);
        assert_eq!(elements("[ ]").expect("array").count(), 0);
        assert!(elements("{}").is_none());
        let (key, _) = members(r#"{"\ud800":1}"#)
            .expect("object")
            .next()
            .expect("member");
        assert!(key.decoded().is_none());
    }

    #[test]
    fn an_object_in_a_longer_text_reports_where_it_ends() {
        let text = r#"{"a":{"b":"}"}, "c" : 1 } ,{"d":2}]"#;
        let mut object = object_at(text).expect("an object");
        assert_eq!(object.end(), None);
        assert_eq!(object.by_ref().count(), 2);
        assert_eq!(
            object.end().map(|e| &text[..e]),
            Some(r#"{"a":{"b":"}"}, "c" : 1 }"#)
        );
        let mut empty = object_at("{ }]").expect("an object");
        assert_eq!(empty.next().map(|_| ()), None);
        assert_eq!(empty.end(), Some(3));
        assert!(object_at(" {}").is_none());
    }

    #[test]
    fn replacing_keeps_every_other_byte() {
        let text = "{ \"result\" : [1,2] , \"x\":3,\"res\\u0075lt\":[4]} tail";
        let wrap = |v: &str| Ok(Some(format!("<{v}>")));
        let (out, len) = replace_values(text, "result", value_walk(wrap)).expect("keys decode");
        assert_eq!(
            out.as_deref(),
            Some("{ \"result\" : <[1,2]> , \"x\":3,\"res\\u0075lt\":<[4]>}")
        );
        assert_eq!(&text[len..], " tail");
        let none = |_: &str| Ok(Some(String::new()));
        assert_eq!(
            replace_values(text, "none", value_walk(none)),
            Ok((None, len))
        );
        let keep = |_: &str| Ok(None);
        assert_eq!(
            replace_values(r#"{"\udc00":1}"#, "a", value_walk(keep)),
            Err(())
        );
        assert_eq!(replace_values("[1]", "a", value_walk(keep)), Err(()));
    }

    #[test]
    fn truncated_text_neither_panics_nor_reads_past_its_end() {
        let text = r#"{"a":[1,{"b":"c\"}"#;
        for end in 0..=text.len() {
            let part = &text[..end];
            let _ = members(part).map(Iterator::count);
            let _ = elements(part).map(Iterator::count);
            let _ = replace_values(part, "a", value_walk(|_| Ok(Some(String::new()))));
        }
    }
}
