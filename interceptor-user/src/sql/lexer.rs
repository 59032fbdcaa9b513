//! A hand-written SQL lexer: just enough to split a message into statements
//! and to normalise a statement for its fingerprint, in one linear pass and
//! without allocating per token.
//!
//! It must never see less than the server does: a statement the server runs
//! must show up here as a statement. Where the dialects' quoting rules depend
//! on session settings we cannot see (PostgreSQL `standard_conforming_strings`,
//! MySQL `NO_BACKSLASH_ESCAPES` / `ANSI_QUOTES`), the splitter lexes the
//! message both ways and keeps every statement either reading produces.

use super::Dialect;

/// What a token is; literals are told apart from code so the normaliser can
/// replace them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokKind {
    /// Keyword or unquoted identifier.
    Word,
    /// `"ident"` (PostgreSQL), `` `ident` `` (MySQL).
    QuotedIdent,
    /// Any string literal, with its prefix (`E'..'`, `_utf8mb4'..'`, `$$..$$`).
    Str,
    Num,
    /// `$1` (PostgreSQL) or `?` (MySQL).
    Param,
    /// A run of operator characters.
    Op,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Semi,
    Dot,
    /// A MySQL user or system variable (`@x`, `@@session.sql_mode`).
    Var,
    Other,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Tok {
    pub kind: TokKind,
    pub start: usize,
    pub end: usize,
}

/// Lexing mode: the dialect and how backslashes behave in quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LexMode {
    pub dialect: Dialect,
    /// Backslash escapes a quote inside string literals. PostgreSQL: off
    /// (`standard_conforming_strings`), but always on in `E'..'`. MySQL: on
    /// unless `NO_BACKSLASH_ESCAPES`.
    pub backslash_escapes: bool,
}

impl LexMode {
    #[must_use]
    pub fn default_for(dialect: Dialect) -> Self {
        Self {
            dialect,
            backslash_escapes: dialect == Dialect::Mysql,
        }
    }

    #[must_use]
    pub(crate) fn flipped(self) -> Self {
        Self {
            dialect: self.dialect,
            backslash_escapes: !self.backslash_escapes,
        }
    }
}

pub(crate) struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    mode: LexMode,
    /// Inside a MySQL `/*! ... */` executable comment: its body is code and
    /// its `*/` is whitespace.
    pub in_exec_comment: bool,
    /// A backslash sat inside a quoted literal whose meaning depends on the
    /// session's escaping mode.
    pub backslash_seen: bool,
    /// A quote or comment ran to the end of the input.
    pub unterminated: bool,
    /// Whitespace or a comment preceded the last token.
    pub spaced: bool,
    /// Where the last identifier ended, if the last token was one.
    ident_end: Option<usize>,
    /// MySQL: the last token was a `.` glued to an identifier, so this one
    /// is a name even if it starts with a digit (`t.1a`, `t.1e5`).
    ident_next: bool,
}

/// `$` starts a MySQL identifier (`$t`); in PostgreSQL it opens a
/// parameter or a dollar quote.
fn is_ident_start(b: u8, dialect: Dialect) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 || (b == b'$' && dialect == Dialect::Mysql)
}

fn is_ident_cont(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80 || b == b'$'
}

fn is_op_char(b: u8, dialect: Dialect) -> bool {
    match b {
        b'+' | b'-' | b'*' | b'/' | b'<' | b'>' | b'=' | b'~' | b'!' | b'%' | b'^' | b'&'
        | b'|' | b':' => true,
        // MySQL: `@` always starts a variable (`a=@b` is `a = @b`).
        b'#' | b'?' | b'@' => dialect == Dialect::Postgres,
        _ => false,
    }
}

impl<'a> Lexer<'a> {
    pub(crate) fn new(src: &'a str, mode: LexMode) -> Self {
        Self::with_state(src, mode, false)
    }

    pub(crate) fn with_state(src: &'a str, mode: LexMode, in_exec_comment: bool) -> Self {
        Self {
            src: src.as_bytes(),
            pos: 0,
            mode,
            in_exec_comment,
            backslash_seen: false,
            unterminated: false,
            spaced: false,
            ident_end: None,
            ident_next: false,
        }
    }

    fn peek(&self, off: usize) -> u8 {
        self.src.get(self.pos + off).copied().unwrap_or(0)
    }

    /// Skips whitespace and comments; returns false at the end of input.
    fn skip_trivia(&mut self) -> bool {
        let dialect = self.mode.dialect;
        self.spaced = false;
        loop {
            let Some(&b) = self.src.get(self.pos) else {
                return false;
            };
            match b {
                b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => {
                    self.pos += 1;
                    self.spaced = true;
                }
                b'-' if self.peek(1) == b'-'
                    && (dialect == Dialect::Postgres || matches!(self.peek(2), 0..=b' ')) =>
                {
                    // MySQL: `--` starts a comment only before whitespace or
                    // a control character (`1--1` is arithmetic).
                    self.skip_line();
                }
                b'#' if dialect == Dialect::Mysql => self.skip_line(),
                b'/' if self.peek(1) == b'*' => {
                    if dialect == Dialect::Mysql
                        && (self.peek(2) == b'!' || (self.peek(2) == b'M' && self.peek(3) == b'!'))
                    {
                        // Executable comment: `/*!` or `/*M!`, then an
                        // optional version number; the rest is code.
                        self.pos += if self.peek(2) == b'!' { 3 } else { 4 };
                        while self.peek(0).is_ascii_digit() {
                            self.pos += 1;
                        }
                        self.in_exec_comment = true;
                        self.spaced = true;
                    } else {
                        self.skip_block_comment();
                        self.spaced = true;
                    }
                }
                b'*' if self.in_exec_comment && self.peek(1) == b'/' => {
                    self.pos += 2;
                    self.in_exec_comment = false;
                    self.spaced = true;
                }
                _ => return true,
            }
        }
    }

    fn skip_line(&mut self) {
        match memchr(b'\n', &self.src[self.pos..]) {
            Some(i) => self.pos += i + 1,
            None => self.pos = self.src.len(),
        }
        self.spaced = true;
    }

    fn skip_block_comment(&mut self) {
        // PostgreSQL nests block comments; MySQL does not.
        let nests = self.mode.dialect == Dialect::Postgres;
        let mut depth = 0usize;
        while self.pos < self.src.len() {
            if self.src[self.pos] == b'/' && self.peek(1) == b'*' {
                if depth == 0 || nests {
                    depth += 1;
                }
                self.pos += 2;
            } else if self.src[self.pos] == b'*' && self.peek(1) == b'/' {
                self.pos += 2;
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return;
                }
            } else {
                self.pos += 1;
            }
        }
        self.unterminated = true;
    }

    /// Consumes a quoted run starting at the opening quote `q`. Doubled
    /// quotes escape; backslashes escape when `backslash` is set.
    fn quoted(&mut self, q: u8, backslash: bool, may_be_ambiguous: bool) {
        self.pos += 1;
        loop {
            let rest = &self.src[self.pos..];
            let next = if may_be_ambiguous || backslash {
                memchr2(q, b'\\', rest)
            } else {
                memchr(q, rest)
            };
            let Some(i) = next else {
                self.pos = self.src.len();
                self.unterminated = true;
                return;
            };
            self.pos += i;
            if self.src[self.pos] == b'\\' {
                if may_be_ambiguous {
                    self.backslash_seen = true;
                }
                self.pos += if backslash { 2 } else { 1 };
                if self.pos > self.src.len() {
                    self.pos = self.src.len();
                    self.unterminated = true;
                    return;
                }
                continue;
            }
            // At a quote: doubled means escaped.
            if self.peek(1) == q {
                self.pos += 2;
                continue;
            }
            self.pos += 1;
            return;
        }
    }

    /// `$tag$ ... $tag$` at `pos` (PostgreSQL); returns false if this `$`
    /// does not open a dollar quote.
    fn dollar_quote(&mut self) -> bool {
        let start = self.pos;
        let mut i = start + 1;
        while i < self.src.len()
            && (self.src[i].is_ascii_alphanumeric() || self.src[i] == b'_' || self.src[i] >= 0x80)
        {
            i += 1;
        }
        if i >= self.src.len() || self.src[i] != b'$' {
            return false;
        }
        if i > start + 1 && self.src[start + 1].is_ascii_digit() {
            return false;
        }
        let tag = &self.src[start..=i];
        let body = i + 1;
        let mut j = body;
        loop {
            match memchr(b'$', &self.src[j..]) {
                Some(k) => {
                    let at = j + k;
                    if self.src[at..].starts_with(tag) {
                        self.pos = at + tag.len();
                        return true;
                    }
                    j = at + 1;
                }
                None => {
                    self.pos = self.src.len();
                    self.unterminated = true;
                    return true;
                }
            }
        }
    }

    /// Digits from `pos`.
    fn digits(&mut self) {
        while self.peek(0).is_ascii_digit() {
            self.pos += 1;
        }
    }

    /// A MySQL number at `pos`, read as the server's lexer does: a run that
    /// starts with digits and goes on with identifier characters is a name
    /// (`1abc`, `1e`, `1_000`, `0xzz`) unless it is a whole number first
    /// (`1e5x` is `1e5` then `x`, `1.5x` is `1.5` then `x`).
    fn mysql_number(&mut self) -> TokKind {
        let start = self.pos;
        let radix = match (self.peek(0), self.peek(1)) {
            (b'0', b'x') => Some(u8::is_ascii_hexdigit as fn(&u8) -> bool),
            (b'0', b'b') => Some((|c: &u8| matches!(c, b'0' | b'1')) as fn(&u8) -> bool),
            _ => None,
        };
        if let Some(is_digit) = radix {
            self.pos += 2;
            while is_digit(&self.peek(0)) {
                self.pos += 1;
            }
            if self.pos - start >= 3 && !is_ident_cont(self.peek(0)) {
                return TokKind::Num;
            }
            // `0xzz`, `0x`, `0b12`: a name.
            while is_ident_cont(self.peek(0)) {
                self.pos += 1;
            }
            return TokKind::Word;
        }
        self.digits();
        let fraction = self.peek(0) == b'.' && self.peek(1) != b'.';
        if fraction {
            self.pos += 1;
            self.digits();
        }
        if matches!(self.peek(0), b'e' | b'E')
            && (self.peek(1).is_ascii_digit()
                || (matches!(self.peek(1), b'+' | b'-') && self.peek(2).is_ascii_digit()))
        {
            self.pos += 2;
            self.digits();
            return TokKind::Num;
        }
        if fraction || !is_ident_cont(self.peek(0)) {
            return TokKind::Num;
        }
        while is_ident_cont(self.peek(0)) {
            self.pos += 1;
        }
        TokKind::Word
    }

    /// A numeric literal at `pos`; a digit-led identifier (`1abc`) comes
    /// back as a word.
    fn number(&mut self) -> TokKind {
        if self.mode.dialect == Dialect::Mysql {
            return self.mysql_number();
        }
        let s = self.src;
        if s[self.pos] == b'0' && matches!(self.peek(1), b'x' | b'X' | b'b' | b'B' | b'o' | b'O') {
            self.pos += 2;
            while self.pos < s.len() && (s[self.pos].is_ascii_hexdigit() || s[self.pos] == b'_') {
                self.pos += 1;
            }
        } else {
            while self.pos < s.len() && (s[self.pos].is_ascii_digit() || s[self.pos] == b'_') {
                self.pos += 1;
            }
            if self.peek(0) == b'.' && self.peek(1) != b'.' {
                self.pos += 1;
                while self.pos < s.len() && s[self.pos].is_ascii_digit() {
                    self.pos += 1;
                }
            }
            if matches!(self.peek(0), b'e' | b'E')
                && (self.peek(1).is_ascii_digit()
                    || (matches!(self.peek(1), b'+' | b'-') && self.peek(2).is_ascii_digit()))
            {
                self.pos += 2;
                while self.pos < s.len() && s[self.pos].is_ascii_digit() {
                    self.pos += 1;
                }
            }
        }
        if self.pos < s.len() && is_ident_cont(s[self.pos]) {
            while self.pos < s.len() && is_ident_cont(s[self.pos]) {
                self.pos += 1;
            }
            return TokKind::Word;
        }
        TokKind::Num
    }

    pub(crate) fn next_tok(&mut self) -> Option<Tok> {
        let after_ident = self.ident_end.take();
        let ident_next = std::mem::take(&mut self.ident_next);
        if !self.skip_trivia() {
            return None;
        }
        let start = self.pos;
        let dialect = self.mode.dialect;
        let b = self.src[start];
        let kind = match b {
            // MySQL reads a `.` glued to a name as a qualifier, and what
            // follows it as a name (`t.1a20`, `db.1e5`), never a number.
            b'.' if dialect == Dialect::Mysql
                && after_ident == Some(start)
                && is_ident_cont(self.peek(1)) =>
            {
                self.pos += 1;
                self.ident_next = true;
                TokKind::Dot
            }
            b'0'..=b'9' if ident_next => {
                while self.pos < self.src.len() && is_ident_cont(self.src[self.pos]) {
                    self.pos += 1;
                }
                TokKind::Word
            }
            b'(' => {
                self.pos += 1;
                TokKind::LParen
            }
            b')' => {
                self.pos += 1;
                TokKind::RParen
            }
            b'[' => {
                self.pos += 1;
                TokKind::LBracket
            }
            b']' => {
                self.pos += 1;
                TokKind::RBracket
            }
            b',' => {
                self.pos += 1;
                TokKind::Comma
            }
            b';' => {
                self.pos += 1;
                TokKind::Semi
            }
            b'.' if self.peek(1).is_ascii_digit() => self.number(),
            b'.' => {
                self.pos += 1;
                TokKind::Dot
            }
            b'0'..=b'9' => self.number(),
            b'\'' => {
                let bs = self.mode.backslash_escapes;
                self.quoted(b'\'', bs, true);
                TokKind::Str
            }
            b'"' if dialect == Dialect::Postgres => {
                self.quoted(b'"', false, false);
                TokKind::QuotedIdent
            }
            b'"' => {
                // MySQL: a string unless ANSI_QUOTES; lexically the same
                // shape, the backslash rule aside.
                let bs = self.mode.backslash_escapes;
                self.quoted(b'"', bs, true);
                TokKind::Str
            }
            b'`' if dialect == Dialect::Mysql => {
                self.quoted(b'`', false, false);
                TokKind::QuotedIdent
            }
            b'$' if dialect == Dialect::Postgres && self.peek(1).is_ascii_digit() => {
                self.pos += 1;
                while self.peek(0).is_ascii_digit() {
                    self.pos += 1;
                }
                TokKind::Param
            }
            b'$' if dialect == Dialect::Postgres && self.dollar_quote() => TokKind::Str,
            b'?' if dialect == Dialect::Mysql => {
                self.pos += 1;
                TokKind::Param
            }
            b'@' if dialect == Dialect::Mysql => {
                self.pos += 1;
                if self.peek(0) == b'@' {
                    self.pos += 1;
                }
                match self.peek(0) {
                    q @ (b'\'' | b'"' | b'`') => {
                        let bs = self.mode.backslash_escapes && q != b'`';
                        self.quoted(q, bs, q != b'`');
                    }
                    _ => {
                        while self.pos < self.src.len()
                            && (is_ident_cont(self.src[self.pos]) || self.src[self.pos] == b'.')
                        {
                            self.pos += 1;
                        }
                    }
                }
                TokKind::Var
            }
            c if is_ident_start(c, dialect) => {
                self.pos += 1;
                while self.pos < self.src.len() && is_ident_cont(self.src[self.pos]) {
                    self.pos += 1;
                }
                let word = &self.src[start..self.pos];
                let next = self.peek(0);
                // String prefixes glued to their quote.
                let prefix = match dialect {
                    Dialect::Postgres => {
                        matches!(
                            word,
                            [b'e' | b'E' | b'b' | b'B' | b'x' | b'X' | b'n' | b'N']
                        ) && next == b'\''
                    }
                    Dialect::Mysql => {
                        (matches!(word, [b'b' | b'B' | b'x' | b'X' | b'n' | b'N'])
                            || word[0] == b'_')
                            && next == b'\''
                    }
                };
                if prefix {
                    let escapes = dialect == Dialect::Mysql && self.mode.backslash_escapes
                        || matches!(word, [b'e' | b'E']);
                    // E'..' always escapes, so it is never ambiguous.
                    let ambiguous = !matches!(word, [b'e' | b'E']);
                    self.quoted(b'\'', escapes, ambiguous);
                    TokKind::Str
                } else if dialect == Dialect::Postgres
                    && matches!(word, [b'u' | b'U'])
                    && next == b'&'
                    && matches!(self.peek(1), b'\'' | b'"')
                {
                    self.pos += 1;
                    let q = self.peek(0);
                    self.quoted(q, false, q == b'\'');
                    if q == b'"' {
                        TokKind::QuotedIdent
                    } else {
                        TokKind::Str
                    }
                } else {
                    TokKind::Word
                }
            }
            c if is_op_char(c, dialect) => {
                self.pos += 1;
                while self.pos < self.src.len() && is_op_char(self.src[self.pos], dialect) {
                    let n = self.src[self.pos];
                    let n1 = self.peek(1);
                    // A comment start ends the operator.
                    if n == b'/' && n1 == b'*' {
                        break;
                    }
                    if n == b'-'
                        && n1 == b'-'
                        && (dialect == Dialect::Postgres || matches!(self.peek(2), 0..=b' '))
                    {
                        break;
                    }
                    if n == b'*' && n1 == b'/' && self.in_exec_comment {
                        break;
                    }
                    self.pos += 1;
                }
                TokKind::Op
            }
            _ => {
                // One UTF-8 scalar (or one stray byte) of something else.
                self.pos += 1;
                while self.pos < self.src.len() && (self.src[self.pos] & 0xC0) == 0x80 {
                    self.pos += 1;
                }
                TokKind::Other
            }
        };
        if matches!(kind, TokKind::Word | TokKind::QuotedIdent) {
            self.ident_end = Some(self.pos);
        }
        Some(Tok {
            kind,
            start,
            end: self.pos,
        })
    }
}

impl Iterator for Lexer<'_> {
    type Item = Tok;
    fn next(&mut self) -> Option<Tok> {
        self.next_tok()
    }
}

// SIMD searches: bulk statements are mostly one long literal.
use memchr::{memchr, memchr2};

/// One statement of a message: where it is, and the lexer state it starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatementSpan {
    pub start: usize,
    pub end: usize,
    pub mode: LexMode,
    /// Starts inside a MySQL executable comment (split at a `;` within one).
    pub in_exec_comment: bool,
}

impl StatementSpan {
    #[must_use]
    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        sql.get(self.start..self.end).unwrap_or("")
    }
}

fn split_once(sql: &str, mode: LexMode, parens: bool, out: &mut Vec<StatementSpan>) -> bool {
    let mut lx = Lexer::new(sql, mode);
    let mut cur: Option<StatementSpan> = None;
    let mut depth = 0usize;
    while let Some(t) = lx.next_tok() {
        match t.kind {
            TokKind::LParen if parens => depth += 1,
            TokKind::RParen => depth = depth.saturating_sub(1),
            TokKind::Semi if depth == 0 => {
                out.extend(cur.take());
                continue;
            }
            _ => {}
        }
        match &mut cur {
            Some(span) => span.end = t.end,
            // Trivia never changes inside a token, so the state now is the
            // state the statement's first token was read in.
            None => {
                cur = Some(StatementSpan {
                    start: t.start,
                    end: t.end,
                    mode,
                    in_exec_comment: lx.in_exec_comment,
                });
            }
        }
    }
    out.extend(cur);
    lx.backslash_seen
}

/// Splits a query message into statements at every `;` outside quotes and
/// comments. Splitting finer than the server is safe (every piece is
/// decided and the strictest wins); coarser would hide statements.
///
/// PostgreSQL's exception: a `;` inside parentheses does not split. Its
/// grammar allows one there only between the actions of `CREATE RULE ...
/// DO (a; b)`, and the server parses a whole message before running any
/// of it, so a message whose parentheses hide a `;` anywhere else is a
/// syntax error that runs nothing.
///
/// When a backslash inside a quote makes the split depend on the session's
/// escaping mode, the message is split both ways and every distinct
/// statement of either reading is returned.
#[must_use]
pub fn split(sql: &str, dialect: Dialect) -> Vec<StatementSpan> {
    let mut out = Vec::new();
    split_into(sql, dialect, &mut out);
    out
}

/// As [`split`], into a reused vector.
pub fn split_into(sql: &str, dialect: Dialect, out: &mut Vec<StatementSpan>) {
    out.clear();
    let mode = LexMode::default_for(dialect);
    let parens = dialect == Dialect::Postgres;
    if split_once(sql, mode, parens, out) {
        let first = out.len();
        split_once(sql, mode.flipped(), parens, out);
        // Keep only the alternative reading's statements that differ.
        let (primary, alt) = out.split_at(first);
        let extra: Vec<StatementSpan> = alt
            .iter()
            .filter(|a| !primary.iter().any(|p| p.start == a.start && p.end == a.end))
            .copied()
            .collect();
        out.truncate(first);
        out.extend(extra);
    }
}

/// Statement-level facts the normaliser learns on its pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NormInfo {
    /// Tokens written to the normalised text.
    pub tokens: usize,
    /// Deepest nesting of parentheses and brackets.
    pub max_depth: usize,
    /// The value of the top-level `LIMIT` / `FETCH FIRST` literal, if one.
    pub limit: Option<u64>,
    /// Literals were kept verbatim (SET, DDL, procedural code...).
    pub literals_kept: bool,
    /// A quote or comment was not closed.
    pub unterminated: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LimitState {
    Idle,
    AfterLimit,
    AfterLimitNum,
    AfterLimitComma,
    AfterFetch,
    AfterFetchFirst,
}

#[derive(Clone, Copy, Debug)]
struct Group {
    /// Index of the `(` in the output.
    open: usize,
    only_literals: bool,
    literals: usize,
    /// Last completed child group `(start, end)` at this level, for
    /// collapsing repeated rows.
    last_child: Option<(usize, usize)>,
}

/// Reused buffers for normalisation (one per thread or session).
#[derive(Debug, Default)]
pub struct Scratch {
    groups: Vec<Group>,
}

/// First words after which literals are kept: their values are the
/// statement's meaning (SET values, procedural bodies, MySQL `PREPARE ...
/// FROM 'text'`), and these statements are rare enough not to need
/// normalising.
fn keeps_literals(first: &[u8], dialect: Dialect) -> bool {
    matches!(
        first,
        b"set"
            | b"reset"
            | b"do"
            | b"create"
            | b"alter"
            | b"copy"
            | b"load"
            | b"comment"
            | b"grant"
            | b"prepare"
    ) && matches!(dialect, Dialect::Postgres | Dialect::Mysql)
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Writes the canonical text of one statement into `out`: tokens separated
/// by one space, keywords and unquoted identifiers in lower case, string
/// literals as `''`, numbers as `0`, parameters as `$1`, comments dropped
/// (MySQL executable comments kept as code), lists of literals collapsed to
/// one (`IN (1, 2, 3)` and `VALUES (1), (2)` are one shape). sqlparser
/// parses this text as it would the original, so it doubles as the parse
/// input: small even for a 20 MiB `INSERT`.
pub fn normalize(
    text: &str,
    mode: LexMode,
    in_exec_comment: bool,
    out: &mut String,
    scratch: &mut Scratch,
) -> NormInfo {
    normalize_with(text, mode, in_exec_comment, out, scratch, false)
}

/// A statement's canonical text (as [`normalize`] writes it) with every
/// literal replaced, also in the statements whose literals `normalize`
/// keeps (`SET`, `CREATE`, `ALTER ... PASSWORD '...'`): for audit logs that
/// must not carry data. The lexing mode only matters for backslashes; when
/// the text has one and the two readings disagree, nothing of it is
/// returned but a placeholder, since one reading could leave part of a
/// string literal as words.
#[must_use]
pub fn redact(text: &str, dialect: Dialect) -> String {
    let mode = LexMode::default_for(dialect);
    let mut scratch = Scratch::default();
    let mut out = String::new();
    normalize_with(text, mode, false, &mut out, &mut scratch, true);
    if text.contains('\\') {
        let mut alt = String::new();
        normalize_with(text, mode.flipped(), false, &mut alt, &mut scratch, true);
        if alt != out {
            return String::from("/* redacted: ambiguous quoting */");
        }
    }
    out
}

fn normalize_with(
    text: &str,
    mode: LexMode,
    in_exec_comment: bool,
    out: &mut String,
    scratch: &mut Scratch,
    redact_all: bool,
) -> NormInfo {
    out.clear();
    scratch.groups.clear();
    let mut info = NormInfo::default();
    let mut lx = Lexer::with_state(text, mode, in_exec_comment);
    let src = text.as_bytes();
    let dialect = mode.dialect;
    let mut first_word: Option<(usize, usize)> = None;
    let mut keep = false;
    let mut top_last: Option<(usize, usize)> = None;
    let mut limit_state = LimitState::Idle;
    let mut limit_seen = 0u32;
    let mut limit_val: Option<u64> = None;
    let mut buf = std::mem::take(out).into_bytes();
    while let Some(t) = lx.next_tok() {
        let raw = &src[t.start..t.end];
        if first_word.is_none() && t.kind == TokKind::Word {
            first_word = Some((t.start, t.end));
            let lower: [u8; 8] = {
                let mut a = [0u8; 8];
                for (i, c) in raw.iter().take(8).enumerate() {
                    a[i] = c.to_ascii_lowercase();
                }
                a
            };
            let n = raw.len().min(8);
            keep = !redact_all && raw.len() <= 8 && keeps_literals(&lower[..n], dialect);
            info.literals_kept = keep;
        }
        // set_config's arguments say what it changes, and the arguments of
        // a function that runs SQL text or reads a relation named by a
        // value (`query_to_xml('select ...')`, MySQL `EXECUTE IMMEDIATE
        // '...'`) are what it reads: keep them.
        if !keep
            && !redact_all
            && match t.kind {
                TokKind::Word => {
                    (raw.len() == 10 && raw.eq_ignore_ascii_case(b"set_config"))
                        || (dialect == Dialect::Mysql && raw.eq_ignore_ascii_case(b"immediate"))
                        || super::hidden::may_name_reader(raw, false, dialect)
                }
                TokKind::QuotedIdent => super::hidden::may_name_reader(raw, true, dialect),
                _ => false,
            }
        {
            keep = true;
            info.literals_kept = true;
        }
        let depth = scratch.groups.len();
        // Top-level LIMIT / FETCH FIRST tracking.
        if depth == 0 {
            let is_word = |w: &[u8]| t.kind == TokKind::Word && raw.eq_ignore_ascii_case(w);
            limit_state = match (limit_state, t.kind) {
                _ if is_word(b"limit") => {
                    limit_seen += 1;
                    limit_val = None;
                    LimitState::AfterLimit
                }
                _ if is_word(b"fetch") => LimitState::AfterFetch,
                (LimitState::AfterFetch, _) if is_word(b"first") || is_word(b"next") => {
                    LimitState::AfterFetchFirst
                }
                (LimitState::AfterFetchFirst, TokKind::Num) => {
                    limit_seen += 1;
                    limit_val = parse_u64(raw);
                    LimitState::Idle
                }
                (LimitState::AfterFetchFirst, _) if is_word(b"row") || is_word(b"rows") => {
                    limit_seen += 1;
                    limit_val = Some(1);
                    LimitState::Idle
                }
                (LimitState::AfterLimit, TokKind::Num) => {
                    limit_val = parse_u64(raw);
                    LimitState::AfterLimitNum
                }
                (LimitState::AfterLimitNum, TokKind::Comma) if dialect == Dialect::Mysql => {
                    LimitState::AfterLimitComma
                }
                (LimitState::AfterLimitComma, TokKind::Num) => {
                    limit_val = parse_u64(raw);
                    LimitState::Idle
                }
                (LimitState::AfterLimitComma, _) => {
                    limit_val = None;
                    LimitState::Idle
                }
                _ => LimitState::Idle,
            };
        }
        // A `;` inside parentheses separates `CREATE RULE` actions (see
        // [`split`]); a trailing one is not part of the statement.
        if t.kind == TokKind::Semi && scratch.groups.is_empty() {
            continue;
        }
        let is_literal = matches!(t.kind, TokKind::Str | TokKind::Num | TokKind::Param);
        // Group bookkeeping for the enclosing level.
        if let Some(g) = scratch.groups.last_mut() {
            match t.kind {
                TokKind::Comma => {}
                _ if is_literal && !keep => g.literals += 1,
                TokKind::LParen | TokKind::LBracket => g.only_literals = false,
                TokKind::RParen | TokKind::RBracket => {}
                _ => g.only_literals = false,
            }
            if !matches!(t.kind, TokKind::Comma | TokKind::LParen | TokKind::RParen) {
                g.last_child = None;
            }
        } else if !matches!(t.kind, TokKind::Comma | TokKind::LParen) {
            top_last = None;
        }
        if !buf.is_empty() {
            buf.push(b' ');
        }
        info.tokens += 1;
        match t.kind {
            // A MySQL name that starts with digits (`1ea10`), quoted so
            // that neither sqlparser nor a second lexing reads a number.
            TokKind::Word if dialect == Dialect::Mysql && raw[0].is_ascii_digit() => {
                buf.push(b'`');
                buf.extend(raw.iter().map(u8::to_ascii_lowercase));
                buf.push(b'`');
            }
            TokKind::Word => buf.extend(raw.iter().map(u8::to_ascii_lowercase)),
            TokKind::Str if keep => buf.extend_from_slice(raw),
            TokKind::Str => buf.extend_from_slice(b"''"),
            TokKind::Num if keep => buf.extend_from_slice(raw),
            TokKind::Num => buf.push(b'0'),
            TokKind::Param if dialect == Dialect::Postgres => buf.extend_from_slice(b"$1"),
            TokKind::LParen | TokKind::LBracket => {
                buf.extend_from_slice(raw);
                scratch.groups.push(Group {
                    open: buf.len() - 1,
                    only_literals: true,
                    literals: 0,
                    last_child: None,
                });
                info.max_depth = info.max_depth.max(scratch.groups.len());
            }
            TokKind::RParen | TokKind::RBracket => {
                match scratch.groups.pop() {
                    Some(g) => {
                        if g.only_literals && g.literals > 1 {
                            // `(0 , '' , 0)` → `(0)`: keep the first literal.
                            let first_end = buf[g.open + 2..]
                                .iter()
                                .position(|c| *c == b' ')
                                .map_or(buf.len(), |p| g.open + 2 + p);
                            buf.truncate(first_end);
                            buf.push(b' ');
                        }
                        buf.extend_from_slice(raw);
                        let span = (g.open, buf.len());
                        let last = match scratch.groups.last_mut() {
                            Some(parent) => &mut parent.last_child,
                            None => &mut top_last,
                        };
                        let mut merged = false;
                        if let Some((ps, pe)) = *last
                            && buf.get(pe..span.0) == Some(b" , ".as_slice())
                            && buf[ps..pe] == buf[span.0..span.1]
                        {
                            buf.truncate(pe);
                            merged = true;
                        }
                        if !merged {
                            *last = Some(span);
                        }
                    }
                    None => buf.extend_from_slice(raw),
                }
            }
            _ => buf.extend_from_slice(raw),
        }
    }
    info.unterminated = lx.unterminated;
    info.limit = if limit_seen == 1 { limit_val } else { None };
    // The buffer holds whole tokens of a str plus ASCII: valid UTF-8.
    *out = String::from_utf8(buf)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sql: &str, d: Dialect) -> Vec<String> {
        split(sql, d)
            .iter()
            .map(|s| s.text(sql).to_owned())
            .collect()
    }

    fn norm(sql: &str, d: Dialect) -> (String, NormInfo) {
        let mut out = String::new();
        let info = normalize(
            sql,
            LexMode::default_for(d),
            false,
            &mut out,
            &mut Scratch::default(),
        );
        (out, info)
    }

    #[test]
    fn splits_respecting_quotes_and_comments() {
        let pg = Dialect::Postgres;
        assert_eq!(texts("select 1; select 2;", pg), ["select 1", "select 2"]);
        assert_eq!(
            texts("select ';'; select \"a;b\"", pg),
            ["select ';'", "select \"a;b\""]
        );
        assert_eq!(
            texts("select $$;$$; select $x$ $$ ; $x$", pg),
            ["select $$;$$", "select $x$ $$ ; $x$"]
        );
        assert_eq!(
            texts("select /* ; /* ; */ ; */ 1; select 2", pg),
            ["select /* ; /* ; */ ; */ 1", "select 2"]
        );
        assert_eq!(
            texts("select 1 -- ; drop\n; select 2", pg),
            ["select 1", "select 2"]
        );
        assert_eq!(texts(";;  ; ", pg), Vec::<String>::new());
        assert_eq!(
            texts("select a$b$c from t; x", pg),
            ["select a$b$c from t", "x"]
        );
        assert_eq!(
            texts("select E'\\';'; drop table t", pg),
            ["select E'\\';'", "drop table t"]
        );
    }

    #[test]
    fn mysql_comments() {
        let my = Dialect::Mysql;
        assert_eq!(
            texts("select 1 # ; drop\n; select 2", my),
            ["select 1", "select 2"]
        );
        assert_eq!(
            texts("select 1--1; select 2", my),
            ["select 1--1", "select 2"]
        );
        assert_eq!(
            texts("select 1 -- ;x\n; select 2", my),
            ["select 1", "select 2"]
        );
        // Executable comments are code: the `;` inside splits.
        let parts = texts("select 1 /*!50000 ; drop table t */", my);
        assert_eq!(parts.len(), 2, "{parts:?}");
        // MySQL block comments do not nest.
        assert_eq!(
            texts("select /* /* */ 1; select 2", my),
            ["select /* /* */ 1", "select 2"]
        );
    }

    #[test]
    fn backslash_ambiguity_keeps_both_readings() {
        // With standard strings `'a\'` ends at the second quote; without, the
        // server would read on. Both readings are kept.
        let parts = texts("select 'a\\'; drop table t; --'", Dialect::Postgres);
        assert!(
            parts.iter().any(|p| p.starts_with("drop table t")),
            "{parts:?}"
        );
        let parts = texts("select 'x\\' ; ' ; drop table t; --'", Dialect::Mysql);
        assert!(
            parts.iter().any(|p| p.contains("drop table t")),
            "{parts:?}"
        );
    }

    #[test]
    fn normalizes_literals_case_and_space() {
        let pg = Dialect::Postgres;
        let (a, ia) = norm(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
            pg,
        );
        assert_eq!(a, "select abalance from pgbench_accounts where aid = 0");
        assert_eq!(ia.tokens, 8);
        let (b, _) = norm(
            "select   abalance\n from pgbench_accounts /* x */ where aid=7",
            pg,
        );
        assert_eq!(a, b);
        let (c, _) = norm(
            "SELECT * FROM \"Orders\" WHERE a IN (1, 2, 3) AND b = E'x' AND c = $2",
            pg,
        );
        assert_eq!(
            c,
            "select * from \"Orders\" where a in ( 0 ) and b = '' and c = $1"
        );
        let (d, _) = norm("INSERT INTO t VALUES (1, 'a'), (2, 'b'),(3,'c')", pg);
        assert_eq!(d, "insert into t values ( 0 )");
        let (e, _) = norm("SET search_path = 'x'", pg);
        assert_eq!(e, "set search_path = 'x'");
    }

    #[test]
    fn limit_is_read_from_literals() {
        let pg = Dialect::Postgres;
        assert_eq!(norm("select * from t limit 10", pg).1.limit, Some(10));
        assert_eq!(
            norm("select * from t limit 10 offset 5", pg).1.limit,
            Some(10)
        );
        assert_eq!(norm("select * from (select 1 limit 5) x", pg).1.limit, None);
        assert_eq!(
            norm("select * from t fetch first 7 rows only", pg).1.limit,
            Some(7)
        );
        assert_eq!(
            norm("select * from t limit 5, 20", Dialect::Mysql).1.limit,
            Some(20)
        );
        assert_eq!(norm("select * from t limit all", pg).1.limit, None);
    }

    #[test]
    fn mysql_exec_comment_is_code() {
        let (n, _) = norm("select 1 /*!50000 , load_file('x') */", Dialect::Mysql);
        assert_eq!(n, "select 0 , load_file ( '' )");
    }
}
