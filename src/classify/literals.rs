//! Statement shapes: the text with its literal values masked, so statements that differ only
//! in constants (`... WHERE aid = 123` and `... WHERE aid = 456`, as the simple protocol
//! sends them) share one cached classification. The cache only takes shapes whose
//! classification carries nothing read from a literal's value: no session command, proxy
//! command or pin, and no fact the classifier took from a value (`by_value`: EXPLAIN's
//! options, `set_config`'s third argument).
//!
//! The masking is deliberately conservative: anything it cannot lex with certainty (backslashes,
//! prefixed strings such as `E'..'`, dollar quoting, nested comments) gives no shape, and the
//! statement is classified as usual.

/// The text with every string and numeric literal replaced by `?`, or `None` when the text
/// holds something the masking does not handle.
pub fn shape_of(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    if b.contains(&b'\\') {
        // Backslash escapes depend on standard_conforming_strings: never guess.
        return None;
    }
    // Text between literals is copied in runs; every boundary is an ASCII byte, so the slices
    // are whole characters.
    let mut out = String::with_capacity(b.len());
    let mut copied = 0;
    let mask = |out: &mut String, start: usize, end: usize, copied: &mut usize| {
        out.push_str(&sql[*copied..start]);
        out.push('?');
        *copied = end;
    };
    let mut masked = false;
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\'' => {
                if i > 0 && (ident(b[i - 1]) || b[i - 1] == b'&') {
                    // E'..', B'..', X'..', N'..', U&'..': prefixed strings, not handled.
                    return None;
                }
                let start = i;
                i += 1;
                loop {
                    match b.get(i) {
                        None => return None,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
                        Some(b'\'') => break,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
                mask(&mut out, start, i, &mut copied);
                masked = true;
            }
            b'"' => {
                i += 1;
                loop {
                    match b.get(i) {
                        None => return None,
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => break,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                // PostgreSQL ends a line comment at either line break.
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n' || c == b'\r')
                    .map_or(b.len(), |p| i + p);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let rest = &b[i + 2..];
                let close = rest.windows(2).position(|w| w == b"*/")?;
                if rest[..close].windows(2).any(|w| w == b"/*") {
                    return None;
                }
                i += 2 + close + 2;
            }
            b'$' if i == 0 || !ident(b[i - 1]) => {
                // `$1` parameters are kept; `$tag$` dollar quoting is not handled.
                let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                if digits == 0 {
                    return None;
                }
                i += 1 + digits;
            }
            b'0'..=b'9' if i == 0 || !ident(b[i - 1]) => {
                // Only plain decimal numbers: digits, a fraction, an exponent (1.5e-3). Anything
                // glued on (0x1F, 1_000, 1e-abs, 12abc) lexes differently across PostgreSQL
                // versions, so no shape is guessed for it.
                let start = i;
                let digits =
                    |b: &[u8], i: usize| b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
                i += digits(b, i);
                if b.get(i) == Some(&b'.') {
                    i += 1;
                    i += digits(b, i);
                }
                if matches!(b.get(i), Some(b'e' | b'E')) {
                    let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
                    let exp = digits(b, i + 1 + sign);
                    if exp == 0 {
                        return None;
                    }
                    i += 1 + sign + exp;
                }
                if b.get(i).is_some_and(|&c| ident(c) || c == b'.') {
                    return None;
                }
                mask(&mut out, start, i, &mut copied);
                masked = true;
            }
            _ => i += 1,
        }
    }
    if !masked {
        // Nothing to share: the exact text is its own key.
        return None;
    }
    out.push_str(&sql[copied..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::shape_of;

    #[test]
    fn only_plain_numbers_are_masked_and_line_comments_end_at_either_break() {
        assert_eq!(
            shape_of("SELECT 1.5e-3, 2., 7E+2").unwrap(),
            "SELECT ?, ?, ?"
        );
        for glued in [
            "SELECT 0x1F",
            "SELECT 1_000",
            "SELECT 1e-abs(1)",
            "SELECT 12abc",
            "SELECT 1.2.3",
        ] {
            assert_eq!(shape_of(glued), None, "{glued}");
        }
        assert_eq!(
            shape_of("SELECT 1 -- note\r, 2").unwrap(),
            "SELECT ? -- note\r, ?"
        );
    }

    #[test]
    fn literals_are_masked_and_the_rest_kept() {
        let a = shape_of("SELECT abalance FROM pgbench_accounts WHERE aid = 123;").unwrap();
        let b = shape_of("SELECT abalance FROM pgbench_accounts WHERE aid = 98765;").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, "SELECT abalance FROM pgbench_accounts WHERE aid = ?;");
        // Text around literals is kept whole, multi-byte characters included.
        assert_eq!(
            shape_of("SELECT 'été', \"naïve\" FROM t -- ünï\nWHERE x = 1 /* ß */").unwrap(),
            "SELECT ?, \"naïve\" FROM t -- ünï\nWHERE x = ? /* ß */"
        );
        assert_eq!(
            shape_of("UPDATE t SET v = v + -1.5e-3, s = 'it''s' WHERE id IN (1,2)").unwrap(),
            "UPDATE t SET v = v + -?, s = ? WHERE id IN (?,?)"
        );
        // Identifiers with digits, quoted identifiers, parameters and comments stay as written.
        assert_eq!(
            shape_of(
                "/* causeway:key=user:42 */ SELECT t1.c2 FROM \"T 3\" WHERE a = $1 AND b = 7 -- 9\n"
            )
            .unwrap(),
            "/* causeway:key=user:42 */ SELECT t1.c2 FROM \"T 3\" WHERE a = $1 AND b = ? -- 9\n"
        );
        // A string holding what looks like code is one literal.
        assert_eq!(shape_of("SELECT '; DELETE FROM t'").unwrap(), "SELECT ?");
    }

    #[test]
    fn anything_uncertain_gives_no_shape() {
        for sql in [
            "SELECT E'a\\'b'",
            "SELECT 'a\\' , ' ; DELETE FROM t; --'",
            "SELECT B'101'",
            "SELECT U&'d\\0061t'",
            "SELECT $$x$$",
            "SELECT $tag$x$tag$",
            "SELECT 'unterminated",
            "SELECT /* a /* nested */ */ 1",
            "SELECT \"open",
            "SELECT a FROM t",
        ] {
            assert_eq!(shape_of(sql), None, "{sql}");
        }
    }
}
