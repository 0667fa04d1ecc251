//! A cheap scan of a statement's words (not the parse tree, which the hot path does not keep)
//! for the priority heuristics: aggregate calls, `WHERE`, `GROUP`, `JOIN`, `=`, `LIMIT`. Done
//! once per statement shape, with the classification; string literals, quoted identifiers and
//! comments are skipped, so their contents never count as keywords.

/// What the scan found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TextTraits {
    /// A call of `count`, `sum`, `avg`, `min`, `max`, `string_agg` or `array_agg`.
    pub aggregate: bool,
    pub filtered: bool,
    pub grouped: bool,
    pub joined: bool,
    /// An `=` anywhere outside literals.
    pub equality: bool,
    /// A `LIMIT` clause; its count is a literal, read from each text ([`limit_count`]).
    pub limit: bool,
}

const AGGREGATES: [&[u8]; 7] = [
    b"count",
    b"sum",
    b"avg",
    b"min",
    b"max",
    b"string_agg",
    b"array_agg",
];

impl TextTraits {
    pub fn scan(sql: &str) -> TextTraits {
        let b = sql.as_bytes();
        let mut t = TextTraits::default();
        for token in (Tokens { b, i: 0 }) {
            let (start, end) = match token {
                Token::Equals => {
                    t.equality = true;
                    continue;
                }
                Token::Word(start, end) => (start, end),
            };
            let word = &b[start..end];
            let is = |w: &[u8]| word.eq_ignore_ascii_case(w);
            // The first letter rules out most words before any comparison.
            match word[0].to_ascii_lowercase() {
                b'w' if is(b"where") => t.filtered = true,
                b'g' if is(b"group") => t.grouped = true,
                b'j' if is(b"join") => t.joined = true,
                b'l' if is(b"limit") => t.limit = true,
                b'c' | b's' | b'a' | b'm'
                    if b.get(end) == Some(&b'(') && AGGREGATES.iter().any(|a| is(a)) =>
                {
                    t.aggregate = true
                }
                _ => {}
            }
        }
        t
    }
}

/// The row count of the last `LIMIT` in `sql`, when it is a literal (`LIMIT $1` is unknown).
pub fn limit_count(sql: &str) -> Option<u64> {
    let b = sql.as_bytes();
    let mut count = None;
    for token in (Tokens { b, i: 0 }) {
        if let Token::Word(start, end) = token
            && b[start..end].eq_ignore_ascii_case(b"limit")
        {
            let digits = b[end..].trim_ascii_start();
            let n = digits.iter().take_while(|c| c.is_ascii_digit()).count();
            count = std::str::from_utf8(&digits[..n])
                .ok()
                .and_then(|d| d.parse::<u64>().ok());
        }
    }
    count
}

enum Token {
    /// A word: a letter or `_`, then letters, digits and `_` (byte range).
    Word(usize, usize),
    Equals,
}

/// Words and `=` signs outside string literals, quoted identifiers and comments.
struct Tokens<'a> {
    b: &'a [u8],
    i: usize,
}

impl Tokens<'_> {
    /// Past the byte at `i` and the letters, digits and `_` after it.
    fn skip_word(&mut self) {
        self.i += 1;
        while self
            .b
            .get(self.i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
        {
            self.i += 1;
        }
    }
}

impl Iterator for Tokens<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        let b = self.b;
        while let Some(&c) = b.get(self.i) {
            match c {
                b'\'' | b'"' => self.i = after_quoted(b, self.i, c),
                b'-' if b.get(self.i + 1) == Some(&b'-') => {
                    self.i = b[self.i..]
                        .iter()
                        .position(|&c| c == b'\n')
                        .map_or(b.len(), |n| self.i + n + 1);
                }
                b'/' if b.get(self.i + 1) == Some(&b'*') => self.i = after_comment(b, self.i),
                b'=' => {
                    self.i += 1;
                    return Some(Token::Equals);
                }
                c if c.is_ascii_alphabetic() || c == b'_' => {
                    let start = self.i;
                    self.skip_word();
                    return Some(Token::Word(start, self.i));
                }
                // Digits that follow a letter belong to its word above; others (numbers, `$1`)
                // are skipped whole so they cannot start a word.
                c if c.is_ascii_digit() || c == b'$' => self.skip_word(),
                _ => self.i += 1,
            }
        }
        None
    }
}

/// The position after a quoted literal or identifier opened at `start` (a doubled quote stays
/// inside); the end of the text if it never closes.
fn after_quoted(b: &[u8], start: usize, quote: u8) -> usize {
    let mut i = start + 1;
    while let Some(&c) = b.get(i) {
        if c == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// The position after a `/* … */` comment opened at `start` (they nest, as in PostgreSQL).
fn after_comment(b: &[u8], start: usize) -> usize {
    let (mut depth, mut i) = (0usize, start);
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_inside_literals_and_comments_do_not_count() {
        let t = TextTraits::scan("SELECT * FROM t WHERE note = 'group by x join y limit 5'");
        assert!(t.filtered && t.equality);
        assert!(!t.grouped && !t.joined && !t.limit);
        let t = TextTraits::scan("/* where count( */ SELECT \"group\" FROM t -- join\n");
        assert_eq!(t, TextTraits::default());
        let t = TextTraits::scan("SELECT 'it''s = ' FROM t /* a /* nested */ where */ LIMIT 3");
        assert!(t.limit && !t.filtered && !t.equality);
    }

    #[test]
    fn aggregates_are_calls() {
        assert!(TextTraits::scan("SELECT count(*) FROM t").aggregate);
        assert!(TextTraits::scan("SELECT MAX(v), Sum(v) FROM t").aggregate);
        assert!(!TextTraits::scan("SELECT count FROM t").aggregate);
        assert!(!TextTraits::scan("SELECT amount(1) FROM t").aggregate);
        assert!(!TextTraits::scan("SELECT x1count(1) FROM t").aggregate);
    }

    #[test]
    fn limit_counts() {
        assert_eq!(limit_count("SELECT * FROM t LIMIT 10"), Some(10));
        assert_eq!(limit_count("SELECT * FROM t limit  7 OFFSET 3"), Some(7));
        assert_eq!(limit_count("SELECT * FROM t LIMIT $1"), None);
        assert_eq!(limit_count("SELECT * FROM t WHERE s = 'limit 5'"), None);
        assert_eq!(
            limit_count("SELECT * FROM (SELECT * FROM t LIMIT 1000) s LIMIT 5"),
            Some(5)
        );
        assert_eq!(limit_count("SELECT 1"), None);
    }
}
