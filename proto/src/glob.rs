//! Shell-style globs for identities, tool names, resource URIs and prompt names.
//!
//! Only `*` (any run of characters, including none) and `?` (exactly one character) are
//! special; everything else matches itself. There are no character classes and no
//! escaping: names in MCP are plain identifiers or URIs, and a small, obvious language
//! is easier to audit in a security policy than a clever one. Matching is linear in
//! the length of name and pattern (no backtracking blow-up on hostile input).

/// Does `name` match `pattern`?
pub fn matches(pattern: &str, name: &str) -> bool {
    let p = pattern.as_bytes();
    let n = name.as_bytes();
    let (mut pi, mut ni) = (0usize, 0usize);
    // Position of the last `*` seen in the pattern, and where in the name it started.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == n[ni] => {
                // `?` must consume one whole UTF-8 character, not one byte.
                let width = if c == b'?' { utf8_width(n[ni]) } else { 1 };
                pi += 1;
                ni += width;
            }
            _ => match star {
                Some((sp, sn)) => {
                    // Let the last `*` swallow one more character and retry.
                    let next = sn + utf8_width(n[sn]);
                    star = Some((sp, next));
                    pi = sp + 1;
                    ni = next;
                }
                None => return false,
            },
        }
    }
    p[pi.min(p.len())..].iter().all(|&c| c == b'*') && ni == n.len()
}

/// Is there anything special in `pattern`?
pub fn is_literal(pattern: &str) -> bool {
    !pattern.contains(['*', '?'])
}

fn utf8_width(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xff => 4,
        // A continuation byte cannot start a character of a valid &str.
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn literal_and_wildcards() {
        assert!(matches("get_issue", "get_issue"));
        assert!(!matches("get_issue", "get_issues"));
        assert!(matches("get_*", "get_issue"));
        assert!(matches("get_*", "get_"));
        assert!(!matches("get_*", "list_issues"));
        assert!(matches("*", ""));
        assert!(matches("*_repo", "delete_repo"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        assert!(matches("agents/*", "agents/triage"));
        assert!(matches("file:///docs/*", "file:///docs/a/b.md"));
        assert!(matches("t?st", "test"));
        assert!(!matches("t?st", "tst"));
        assert!(matches("?", "é"));
        assert!(matches("*é", "café"));
        assert!(!matches("", "x"));
        assert!(matches("", ""));
    }

    #[test]
    fn hostile_patterns_stay_linear() {
        let name = "a".repeat(10_000);
        let pattern = format!("{}b", "*a".repeat(50));
        assert!(!matches(&pattern, &name));
    }
}
