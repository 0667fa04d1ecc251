//! Leading-comment routing directives (`/* causeway:replica */`, `-- causeway:key=user:42`).
//!
//! Hand-written on purpose: it runs on every uncached statement and only has to look at the
//! comments before the first token, so a byte scanner is far cheaper than asking the parser.

use super::{Hints, RouteHint};

/// Prefix that marks a comment word as a Causeway directive (matched case-insensitively).
const PREFIX: &str = "causeway:";

/// Extracts the directives from the comments that precede the first SQL token; the flag tells
/// whether any code follows them (false for empty, blank or comment-only strings).
pub(crate) fn parse_hints(sql: &str) -> (Hints, bool) {
    let mut hints = Hints::default();
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            // Same whitespace set as PostgreSQL's scanner (`space` in scan.l).
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c' => i += 1,
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                let start = i + 2;
                let end = bytes[start..]
                    .iter()
                    .position(|&b| b == b'\n' || b == b'\r')
                    .map_or(bytes.len(), |p| start + p);
                apply_comment(&sql[start..end], &mut hints);
                i = end;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let start = i + 2;
                let Some((body_end, next)) = block_comment_end(bytes, start) else {
                    // Unterminated comment: the parser will reject the statement anyway, and a
                    // half-written comment is not a trustworthy directive.
                    return (Hints::default(), false);
                };
                apply_comment(&sql[start..body_end], &mut hints);
                i = next;
            }
            _ => return (hints, true),
        }
    }
    (hints, false)
}

/// Finds the end of a block comment whose body starts at `start`; PostgreSQL block comments
/// nest, so `/* a /* b */ c */` is one comment. Returns (body end, index after `*/`).
fn block_comment_end(bytes: &[u8], start: usize) -> Option<(usize, usize)> {
    let mut depth = 1usize;
    let mut i = start;
    while i + 1 < bytes.len() {
        if bytes[i] == b'/' && bytes[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if bytes[i] == b'*' && bytes[i + 1] == b'/' {
            depth -= 1;
            if depth == 0 {
                return Some((i, i + 2));
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    None
}

/// Applies every directive found in one comment body. Words are separated by whitespace or
/// commas; once a word carries the `causeway:` prefix, later unprefixed words of the same
/// comment are directives too (`/* causeway:primary, key=user:42 */`).
fn apply_comment(body: &str, hints: &mut Hints) {
    let mut active = false;
    for word in body.split(|c: char| c.is_whitespace() || c == ',') {
        if word.is_empty() {
            continue;
        }
        let directive = match strip_prefix_ci(word, PREFIX) {
            Some(rest) => {
                active = true;
                rest
            }
            None if active => word,
            None => continue,
        };
        apply_directive(directive, hints);
    }
}

/// Applies one `name[=value]` directive; unknown names and invalid values are ignored.
fn apply_directive(directive: &str, hints: &mut Hints) {
    let (name, value) = match directive.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (directive, None),
    };
    match (name.to_ascii_lowercase().as_str(), value) {
        ("primary", None) => hints.route = Some(RouteHint::Primary),
        ("replica", None) => hints.route = Some(RouteHint::Replica),
        ("route", Some(v)) => {
            if v.eq_ignore_ascii_case("primary") {
                hints.route = Some(RouteHint::Primary);
            } else if v.eq_ignore_ascii_case("replica") {
                hints.route = Some(RouteHint::Replica);
            }
        }
        ("key", Some(v)) if !v.is_empty() => hints.key = Some(v.to_string()),
        // Kept even when malformed: the proxy answers a bad token with an error, never
        // by silently reading without it.
        ("min_lsn", Some(v)) => hints.min_lsn = Some(v.to_string()),
        ("priority", Some(v)) if is_simple_word(v) => hints.priority = Some(v.to_string()),
        _ => {}
    }
}

/// A priority class name: non-empty, ASCII alphanumerics, `_` or `-`.
fn is_simple_word(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Case-insensitive `strip_prefix` for an ASCII prefix.
fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}
