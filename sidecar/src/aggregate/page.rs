//! Pages of a merged list, and the cursor that says where each server's list stands.
//!
//! A merged list is every server's visible part, in a fixed order (the unprefixed
//! server first, then by name). A page holds at most [`PAGE_ITEMS`] items; its
//! `nextCursor` names the server whose part the next page starts in and how far into
//! it, so a server that fails (or recovers) between pages moves no other server's
//! place. The cursor is opaque to the agent (base64url of a small JSON array) and
//! valid under the configuration that gave it: after a snapshot change, or for a cursor
//! the sidecar did not give, the answer is MCP's invalid-params error (`-32602`), and
//! the agent lists again from the start (a `list_changed` notification tells it to).
//! Nothing in a cursor is trusted: it only picks where to start in the agent's own
//! visible items.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ProxyError;
use crate::snapshot::Route;

/// Items of one page, at most.
pub const PAGE_ITEMS: usize = 1000;
/// Longest cursor taken (the sidecar's are far shorter).
const MAX_CURSOR: usize = 1024;
/// Format of the cursors this sidecar gives.
const CURSOR_FORMAT: u64 = 1;

/// Where a route's part goes in a merged list: the unprefixed server first, then by name.
pub(super) fn order(route: &Route) -> (bool, &str) {
    (!route.prefix.is_empty(), &route.name)
}

/// A merged list: the items, and where each server's part starts.
#[derive(Debug, Default)]
pub(super) struct Merged {
    pub items: Vec<String>,
    parts: Vec<Part>,
}

#[derive(Debug)]
struct Part {
    prefixed: bool,
    server: String,
    start: usize,
}

impl Merged {
    /// The items pushed from here on are `route`'s (parts come in [`order`]).
    pub(super) fn start_part(&mut self, route: &Route) {
        let (prefixed, server) = order(route);
        self.parts.push(Part {
            prefixed,
            server: server.to_owned(),
            start: self.items.len(),
        });
    }

    /// Index of the first item of `part`'s successor (or the end).
    fn end_of(&self, part: usize) -> usize {
        self.parts
            .get(part + 1)
            .map_or(self.items.len(), |p| p.start)
    }
}

/// Where a page starts: `offset` items into `server`'s part.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Cursor {
    prefixed: bool,
    server: String,
    offset: usize,
}

/// The cursor a list request carries: `None` for the first page; an error for one
/// this sidecar did not give under configuration `version`.
pub(super) fn requested(
    params: Option<&RawValue>,
    version: &str,
) -> Result<Option<Cursor>, ProxyError> {
    #[derive(Deserialize)]
    struct Params {
        #[serde(default)]
        cursor: Option<String>,
    }
    let cursor = params
        .and_then(|p| serde_json::from_str::<Params>(p.get()).ok())
        .and_then(|p| p.cursor);
    let Some(cursor) = cursor else {
        return Ok(None);
    };
    decode(&cursor, version).map(Some).ok_or_else(|| {
        ProxyError::InvalidParams(
            "cursor: not one this sidecar gave under its current configuration; list again without one"
                .to_owned(),
        )
    })
}

fn decode(cursor: &str, version: &str) -> Option<Cursor> {
    if cursor.len() > MAX_CURSOR {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let (format, given, prefixed, server, offset): (u64, String, bool, String, usize) =
        serde_json::from_slice(&bytes).ok()?;
    (format == CURSOR_FORMAT && given == version).then_some(Cursor {
        prefixed,
        server,
        offset,
    })
}

fn encode(version: &str, prefixed: bool, server: &str, offset: usize) -> String {
    let text = serde_json::json!([CURSOR_FORMAT, version, prefixed, server, offset]).to_string();
    URL_SAFE_NO_PAD.encode(text)
}

/// The page of `merged` that `cursor` starts (the first without one), and the cursor
/// of the next page when there is more.
pub(super) fn page<'m>(
    merged: &'m Merged,
    cursor: Option<&Cursor>,
    version: &str,
) -> (&'m [String], Option<String>) {
    let len = merged.items.len();
    let start = match cursor {
        None => 0,
        Some(c) => match merged.parts.iter().position(|p| p.server == c.server) {
            Some(i) => (merged.parts[i].start + c.offset).min(merged.end_of(i)),
            // Its server is missing now: on from the first part ordered after it.
            None => merged
                .parts
                .iter()
                .find(|p| (p.prefixed, p.server.as_str()) > (c.prefixed, c.server.as_str()))
                .map_or(len, |p| p.start),
        },
    };
    let end = start.saturating_add(PAGE_ITEMS).min(len);
    let next = (end < len)
        .then(|| merged.parts.iter().rev().find(|p| p.start <= end))
        .flatten()
        .map(|p| encode(version, p.prefixed, &p.server, end - p.start));
    (&merged.items[start..end], next)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merged list of `parts` (server, items, prefixed).
    fn merged(parts: &[(&str, usize, bool)]) -> Merged {
        let mut m = Merged::default();
        for (server, n, prefixed) in parts {
            m.parts.push(Part {
                prefixed: *prefixed,
                server: (*server).to_owned(),
                start: m.items.len(),
            });
            for i in 0..*n {
                m.items.push(format!("\"{server}-{i}\""));
            }
        }
        m
    }

    /// Every item, page by page, following the cursors as an agent does.
    fn walk(m: &Merged) -> (Vec<String>, usize) {
        let (mut all, mut pages, mut cursor) = (Vec::new(), 0, None);
        loop {
            let (items, next) = page(m, cursor.as_ref(), "v1");
            all.extend(items.iter().cloned());
            pages += 1;
            let Some(next) = next else { break };
            cursor = Some(decode(&next, "v1").expect("a cursor of ours"));
        }
        (all, pages)
    }

    #[test]
    fn pages_cover_every_item_once_across_servers() {
        let m = merged(&[("", 3, false), ("a", 1500, true), ("b", 700, true)]);
        let (all, pages) = walk(&m);
        assert_eq!(all, m.items);
        assert_eq!(pages, 3);
        // A short list is one page without a cursor.
        let small = merged(&[("a", 10, true)]);
        assert_eq!(page(&small, None, "v1").1, None);
    }

    #[test]
    fn a_server_gone_between_pages_moves_no_other_servers_place() {
        let before = merged(&[("a", 1200, true), ("b", 5, true), ("c", 5, true)]);
        let (_, next) = page(&before, None, "v1");
        let cursor = decode(&next.expect("more"), "v1").expect("ours");
        assert_eq!(cursor.server, "a");
        // `a` fails before the second page: it starts with `b`.
        let after = merged(&[("b", 5, true), ("c", 5, true)]);
        let (items, next) = page(&after, Some(&cursor), "v1");
        assert_eq!(items.first().map(String::as_str), Some("\"b-0\""));
        assert_eq!(items.len(), 10);
        assert_eq!(next, None);
    }

    #[test]
    fn cursors_of_another_configuration_or_not_ours_are_refused() {
        let m = merged(&[("a", 1001, true)]);
        let next = page(&m, None, "v1").1.expect("more");
        assert!(decode(&next, "v2").is_none());
        assert!(decode("bm90IG91cnM", "v1").is_none());
        assert!(decode(&"A".repeat(2000), "v1").is_none());
        let raw = RawValue::from_string(format!("{{\"cursor\":\"{next}\"}}")).expect("JSON");
        assert!(requested(Some(&raw), "v2").is_err());
        assert!(requested(Some(&raw), "v1").expect("ours").is_some());
    }
}
