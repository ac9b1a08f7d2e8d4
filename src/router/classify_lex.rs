//! Lexer for the statement classifier: splits SQL text into 12-byte tokens (no allocation per
//! token) and notices routing hints in comments.

use super::Hint;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum T {
    Word,
    QIdent,
    Str,
    Num,
    Param,
    Op,
    LParen,
    RParen,
    Comma,
    Semi,
    Dot,
    Other,
    /// Unterminated string, identifier or comment; zero-length quoted identifier.
    Error,
}

/// A token: byte range `s..e` of the source. Every boundary is an ASCII byte or the end of the
/// source, so slicing the `&str` there is always on a char boundary.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tok {
    pub(super) t: T,
    pub(super) s: u32,
    pub(super) e: u32,
}

struct Lexed {
    toks: Vec<Tok>,
    primary: bool,
    replica: bool,
}

/// Tokens of `src` (whitespace and comments dropped) and the hint found in its comments;
/// `Primary` wins when both appear. `src` must be shorter than 4 GiB.
pub(super) fn lex(src: &str) -> (Vec<Tok>, Option<Hint>) {
    let mut lx = Lexed {
        toks: Vec::with_capacity((src.len() / 5 + 4).min(1 << 16)),
        primary: false,
        replica: false,
    };
    lex_into(src, &mut lx);
    let hint = if lx.primary {
        Some(Hint::Primary)
    } else if lx.replica {
        Some(Hint::Replica)
    } else {
        None
    };
    (lx.toks, hint)
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn is_op_char(b: u8) -> bool {
    b"+-*/<>=~!@#%^&|`?".contains(&b)
}

fn lex_into(src: &str, lx: &mut Lexed) {
    let b = src.as_bytes();
    let n = b.len();
    let mut i = 0;
    while i < n {
        let start = i;
        let c = b[i];
        let next = b.get(i + 1).copied();
        let t = match c {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => {
                i += 1;
                continue;
            }
            b'-' if next == Some(b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&x| x == b'\n' || x == b'\r')
                    .map_or(n, |p| i + p);
                scan_hint(&b[start + 2..i], lx);
                continue;
            }
            b'/' if next == Some(b'*') => match comment_end(b, i) {
                Some(end) => {
                    scan_hint(&b[i + 2..end - 2], lx);
                    i = end;
                    continue;
                }
                None => {
                    scan_hint(&b[i + 2..], lx);
                    i = n;
                    T::Error
                }
            },
            b'\'' => quoted(b, &mut i, 1, b'\'', false),
            b'"' => quoted(b, &mut i, 1, b'"', false),
            b'e' | b'E' if next == Some(b'\'') => quoted(b, &mut i, 2, b'\'', true),
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if next == Some(b'\'') => {
                quoted(b, &mut i, 2, b'\'', false)
            }
            b'u' | b'U' if next == Some(b'&') && matches!(b.get(i + 2), Some(b'\'' | b'"')) => {
                let q = b[i + 2];
                quoted(b, &mut i, 3, q, false)
            }
            c if is_ident_start(c) => {
                i += 1;
                while i < n && is_ident_cont(b[i]) {
                    i += 1;
                }
                T::Word
            }
            b'0'..=b'9' => number(b, &mut i),
            b'.' if next.is_some_and(|d| d.is_ascii_digit()) => number(b, &mut i),
            b'$' => dollar(src, &mut i),
            b'(' | b')' | b',' | b';' | b'.' => {
                i += 1;
                match c {
                    b'(' => T::LParen,
                    b')' => T::RParen,
                    b',' => T::Comma,
                    b';' => T::Semi,
                    _ => T::Dot,
                }
            }
            c if is_op_char(c) => {
                i = op_end(b, i);
                T::Op
            }
            _ => {
                i += 1;
                T::Other
            }
        };
        lx.toks.push(Tok {
            t,
            s: start as u32,
            e: i as u32,
        });
    }
}

/// Source text of a token.
pub(super) fn text(src: &str, t: Tok) -> &str {
    &src[t.s as usize..t.e as usize]
}

/// The name an identifier token stands for, before case folding (quotes stripped, `""` kept).
pub(super) fn ident_body(src: &str, t: Tok) -> &str {
    let s = text(src, t);
    match t.t {
        T::QIdent if s.starts_with('"') => &s[1..s.len() - 1],
        T::QIdent => &s[3..s.len() - 1], // U&"..."
        _ => s,
    }
}

/// The value of a string literal token (`'..'`, `E'..'`, `$tag$..$tag$`; other prefixes kept raw
/// inside the quotes).
pub(super) fn unquote_str(s: &str) -> String {
    let b = s.as_bytes();
    if b.first() == Some(&b'$') {
        let tag = s[1..].find('$').map_or(1, |p| p + 2);
        return s
            .get(tag..s.len().saturating_sub(tag))
            .unwrap_or("")
            .to_owned();
    }
    let open = s.find('\'').unwrap_or(0);
    let body = s.get(open + 1..s.len().saturating_sub(1)).unwrap_or("");
    let escapes = matches!(b.first(), Some(b'e' | b'E'));
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\'' => {
                chars.next();
                out.push('\'');
            }
            '\\' if escapes => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some(other) => out.push(other),
                None => {}
            },
            _ => out.push(ch),
        }
    }
    out
}

/// End (exclusive) of a nested `/* */` comment starting at `i`, or `None` if unterminated.
fn comment_end(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
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
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// Lexes a quoted token whose opening quote `q` ends `skip` bytes after `*i`.
fn quoted(b: &[u8], i: &mut usize, skip: usize, q: u8, backslash: bool) -> T {
    let body = *i + skip;
    let mut j = body;
    while j < b.len() {
        let c = b[j];
        if (backslash && c == b'\\') || (c == q && b.get(j + 1) == Some(&q)) {
            j += 2; // escaped character or doubled quote
        } else if c == q {
            *i = j + 1;
            return match q {
                b'"' if j == body => T::Error, // zero-length delimited identifier
                b'"' => T::QIdent,
                _ => T::Str,
            };
        } else {
            j += 1;
        }
    }
    *i = b.len();
    T::Error
}

fn number(b: &[u8], i: &mut usize) -> T {
    let mut j = *i + 1;
    while j < b.len() {
        let d = b[j];
        if (d == b'e' || d == b'E') && matches!(b.get(j + 1), Some(b'+' | b'-')) {
            j += 2;
        } else if d.is_ascii_alphanumeric()
            || d == b'_'
            || (d == b'.' && b.get(j + 1) != Some(&b'.'))
        {
            j += 1;
        } else {
            break;
        }
    }
    *i = j;
    T::Num
}

/// `$1` parameter, `$tag$ ... $tag$` string, or a lone `$`.
fn dollar(src: &str, i: &mut usize) -> T {
    let b = src.as_bytes();
    let mut j = *i + 1;
    if b.get(j).is_some_and(|d| d.is_ascii_digit()) {
        while b.get(j).is_some_and(|d| d.is_ascii_digit()) {
            j += 1;
        }
        *i = j;
        return T::Param;
    }
    if b.get(j).is_some_and(|&d| is_ident_start(d)) {
        while b
            .get(j)
            .is_some_and(|&d| is_ident_start(d) || d.is_ascii_digit())
        {
            j += 1;
        }
    }
    if b.get(j) != Some(&b'$') {
        *i += 1;
        return T::Other;
    }
    let tag = &src[*i..=j];
    match src[j + 1..].find(tag) {
        Some(p) => {
            *i = j + 1 + p + tag.len();
            T::Str
        }
        None => {
            *i = b.len();
            T::Error
        }
    }
}

/// End of an operator starting at `i`, following Postgres: stop before `--` or `/*`, and drop
/// trailing `+`/`-` unless the operator contains one of `~!@#%^&|`?`.
fn op_end(b: &[u8], i: usize) -> usize {
    let mut k = i;
    while k < b.len() && is_op_char(b[k]) {
        let pair = (b[k], b.get(k + 1).copied());
        if k > i && matches!(pair, (b'-', Some(b'-')) | (b'/', Some(b'*'))) {
            break;
        }
        k += 1;
    }
    if k - i > 1 && !b[i..k].iter().any(|c| b"~!@#%^&|`?".contains(c)) {
        while k - i > 1 && matches!(b[k - 1], b'+' | b'-') {
            k -= 1;
        }
    }
    k
}

/// Looks for `pgnear:primary` / `pgnear:replica` (case-insensitive, spaces allowed around `:`).
fn scan_hint(body: &[u8], lx: &mut Lexed) {
    let mut i = 0;
    while i + 6 <= body.len() {
        let boundary = i == 0 || !is_ident_cont(body[i - 1]);
        if !boundary || !body[i..i + 6].eq_ignore_ascii_case(b"pgnear") {
            i += 1;
            continue;
        }
        let mut j = i + 6;
        while body.get(j).is_some_and(u8::is_ascii_whitespace) {
            j += 1;
        }
        if body.get(j) == Some(&b':') {
            j += 1;
            while body.get(j).is_some_and(u8::is_ascii_whitespace) {
                j += 1;
            }
            let word_at = |w: &[u8]| {
                body.get(j..j + w.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(w))
                    && !body.get(j + w.len()).is_some_and(|&c| is_ident_cont(c))
            };
            lx.primary |= word_at(b"primary");
            lx.replica |= word_at(b"replica");
        }
        i = j;
    }
}
