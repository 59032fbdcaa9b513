//! Statement analysis with sqlparser: kind, tables read and written (CTE
//! names excluded, with their scoping), functions, WHERE presence, LIMIT
//! shape, flags. Works on the canonical text (see [`super::normalize`]).

use std::ops::ControlFlow;

use sqlparser::{
    ast::{
        CopySource, CopyTarget, Expr, FromTable, FunctionArg, FunctionArgExpr, FunctionArguments,
        ObjectName, ObjectNamePart, ObjectType, OnConflictAction, OnInsert, Query, Select, SetExpr,
        Statement, TableFactor, TableObject, TableWithJoins, Value, Visit, Visitor,
    },
    dialect::{MySqlDialect, PostgreSqlDialect},
    parser::Parser,
};

use super::{
    Dialect, Flag, FlagSet, Kind, Limits,
    hidden::{self, Reads, Role},
    lexer::{LexMode, NormInfo, Scratch, TokKind, normalize, split},
    lexical::{self, T, ident, unquote_string},
    names::{NamePart, RawName, fold},
    pg_grammar,
};

/// What a statement does to the session, applied by the policy engine once
/// the statement is let through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Effect {
    #[default]
    None,
    /// MySQL `USE db`.
    Use(String),
    /// PostgreSQL `SET search_path`, `RESET`, `set_config('search_path'..)`.
    SearchPath(SearchPathChange),
    /// `PREPARE name AS q` / MySQL `PREPARE name FROM '...'`.
    Prepare { name: String, body: PreparedBody },
    /// `EXECUTE name`: decided as the statement prepared under that name.
    Execute(String),
    /// `DEALLOCATE name`; `None` for `DEALLOCATE ALL`.
    Deallocate(Option<String>),
    /// `DISCARD ALL`: prepared statements and settings reset.
    DiscardAll,
    /// `BEGIN` / `START TRANSACTION`.
    Begin,
    /// `COMMIT` / `ROLLBACK` / `END`.
    End,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SearchPathChange {
    Set {
        schemas: Vec<String>,
        local: bool,
    },
    Reset,
    /// Changed to something we cannot read (a run-time expression).
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreparedBody {
    /// Text of the prepared statement (canonical for PostgreSQL; the
    /// string's value for MySQL).
    Text(String),
    /// `PREPARE s FROM @var`: not knowable from the statement.
    Unknown,
}

/// Facts of one statement before name resolution (cacheable by shape).
#[derive(Clone, Debug, Default)]
pub struct Analysis {
    pub kind: Kind,
    /// Tables as written, and whether each is written to.
    pub tables: Vec<(RawName, bool)>,
    pub functions: Vec<String>,
    pub flags: FlagSet,
    pub has_where: Option<bool>,
    /// The top-level LIMIT is a plain literal.
    pub limit_literal: bool,
    /// Why sqlparser could not read it (then the rest is lexical).
    pub unparsed: Option<String>,
    pub procedural: bool,
    pub effect: Effect,
    /// Some table it reads is unknown: SQL built at run time, a relation
    /// named by a non-literal, a whole schema or database (the statement
    /// carries [`Flag::DynamicSql`]).
    pub tables_unknown: bool,
    /// SQL it runs without naming it (literal texts analysed, the rest
    /// unknown), for tools to show.
    pub hidden: Vec<Hidden>,
}

/// SQL a statement runs without naming it: an argument of a function of
/// the [`hidden`] catalogue, or the text of MySQL `EXECUTE IMMEDIATE` /
/// `PREPARE ... FROM`.
#[derive(Clone, Debug)]
pub struct Hidden {
    /// The function (unqualified, case-folded) or statement that runs it.
    pub carrier: String,
    /// What the argument is.
    pub role: Role,
    /// The literal (SQL text or relation name), when there is one; cut at
    /// [`HIDDEN_TEXT_MAX`] bytes.
    pub text: Option<String>,
    /// The literal SQL's kind.
    pub kind: Option<Kind>,
    /// Tables the literal reads or names, and whether each is written.
    pub tables: Vec<(RawName, bool)>,
    pub functions: Vec<String>,
    pub flags: FlagSet,
    /// Why what it reads is unknown (then the statement is `dynamic_sql`).
    pub unknown: Option<String>,
}

/// Longest hidden text kept for display.
pub const HIDDEN_TEXT_MAX: usize = 1000;

/// Nesting of hidden SQL analysed (`query_to_xml('select query_to_xml(...)')`);
/// deeper is unknown.
const HIDDEN_DEPTH_MAX: u8 = 4;

fn parse(canonical: &str, dialect: Dialect, limits: &Limits) -> Result<Vec<Statement>, String> {
    let recursion = limits.max_depth.saturating_mul(2).saturating_add(16);
    let result = match dialect {
        Dialect::Postgres => Parser::new(&PostgreSqlDialect {})
            .with_recursion_limit(recursion)
            .try_with_sql(canonical)
            .and_then(|mut p| p.parse_statements()),
        Dialect::Mysql => Parser::new(&MySqlDialect {})
            .with_recursion_limit(recursion)
            .try_with_sql(canonical)
            .and_then(|mut p| p.parse_statements()),
    };
    result.map_err(|e| e.to_string())
}

/// MySQL forms sqlparser does not read, rewritten to ones it does for the
/// table facts (their flags come from the lexical pass).
fn repair_mysql(c: &str) -> Option<String> {
    let forms = super::mysql_forms::repair(c);
    let mut s = forms
        .as_deref()
        .unwrap_or(c)
        .replace(" lock in share mode", " for share");
    for kw in [" into outfile ", " into dumpfile "] {
        if let Some(i) = s.find(kw) {
            let after = i + kw.len();
            let end = s[after..].find(" from ").map_or(s.len(), |j| after + j);
            s.replace_range(i..end, "");
        }
    }
    (s != c).then_some(s)
}

/// `TABLE name` where sqlparser does not read it (a statement of its own,
/// an operand of UNION): rewritten as the `SELECT * FROM name` it is.
/// Works on tokens, so a literal's text is never touched.
fn repair_table(toks: &[T<'_>]) -> Option<String> {
    let mut out = String::new();
    let mut changed = false;
    for (i, t) in toks.iter().enumerate() {
        let query_position = i == 0
            || toks[i - 1].kind == TokKind::LParen
            || (toks[i - 1].kind == TokKind::Word
                && matches!(
                    toks[i - 1].text,
                    "union" | "except" | "intersect" | "all" | "distinct"
                ))
            // `INSERT INTO t [(cols)] TABLE u`
            || (toks[0].text == "insert" && toks[i - 1].text != "into");
        if !out.is_empty() {
            out.push(' ');
        }
        if t.kind == TokKind::Word && t.text == "table" && query_position {
            out.push_str("select * from");
            changed = true;
        } else {
            out.push_str(t.text);
        }
    }
    changed.then_some(out)
}

/// PostgreSQL forms the server accepts and sqlparser does not read,
/// rewritten on tokens (a literal's text is never touched) into ones it
/// reads with the same facts:
///
/// - string constants continued on the next line (`'a'` newline `'b'`):
///   one constant (plain quoted ones joined, as the server joins them);
/// - `UESCAPE 'c'` after a Unicode constant or identifier: dropped;
/// - `COPY ... TO ... WHERE ...`: the WHERE dropped;
/// - `FETCH [FROM|IN] cur` without a direction: `FETCH NEXT FROM cur`;
/// - `CREATE DOMAIN name type` without `AS`;
/// - `UPDATE ... SET col[i] = ...`: the element's column is what is written;
/// - `EXECUTE {PROCEDURE|FUNCTION} f('arg', ...)` in `CREATE TRIGGER`: the
///   trigger's literal arguments, which sqlparser takes for types.
fn repair_pg(toks: &[T<'_>]) -> Option<String> {
    let word = |i: usize, w: &str| {
        toks.get(i)
            .is_some_and(|t| t.kind == TokKind::Word && t.text == w)
    };
    let mut out: Vec<String> = Vec::with_capacity(toks.len() + 1);
    let mut changed = false;
    let mut i = 0;
    let in_set = toks
        .iter()
        .any(|t| t.kind == TokKind::Word && t.text == "set")
        && word(0, "update");
    let mut depth = 0usize;
    while let Some(t) = toks.get(i) {
        match t.kind {
            TokKind::LParen => depth += 1,
            TokKind::RParen => depth = depth.saturating_sub(1),
            _ => {}
        }
        // Adjacent string constants.
        if t.kind == TokKind::Str
            && let Some(prev) = out.last_mut()
            && i > 0
            && toks[i - 1].kind == TokKind::Str
        {
            let plain = |s: &str| s.len() >= 2 && s.starts_with('\'') && s.ends_with('\'');
            if plain(prev) && plain(t.text) {
                prev.pop();
                prev.push_str(&t.text[1..]);
            }
            changed = true;
            i += 1;
            continue;
        }
        // `U&'...' UESCAPE '!'`: the escape character only decodes the
        // constant, whose text the canonical form has dropped.
        if word(i, "uescape") && toks.get(i + 1).is_some_and(|n| n.kind == TokKind::Str) {
            changed = true;
            i += 2;
            continue;
        }
        // `COPY ... TO ... WHERE`: PostgreSQL 15 refuses the WHERE only
        // when it runs (later grammars refuse it outright); what the
        // statement names is before it.
        if word(0, "copy")
            && word(i, "where")
            && depth == 0
            && toks[..i].iter().any(|u| u.text == "to")
        {
            changed = true;
            break;
        }
        // FETCH without a direction.
        if i == 0 && word(0, "fetch") {
            out.push("fetch".into());
            let next = toks.get(1);
            let bare_cursor = toks.len() == 2 && next.is_some_and(|n| n.kind == TokKind::Word);
            if word(1, "from") || word(1, "in") {
                out.push("next".into());
                changed = true;
            } else if bare_cursor {
                out.push("next from".into());
                changed = true;
            }
            i += 1;
            continue;
        }
        // CREATE DOMAIN name type.
        if i == 3 && word(0, "create") && word(1, "domain") && !word(3, "as") {
            out.push("as".into());
            changed = true;
        }
        // SET col[...] = in UPDATE.
        if in_set
            && t.kind == TokKind::LBracket
            && i > 0
            && toks[i - 1].kind == TokKind::Word
            && i >= 2
            && (word(i - 2, "set") || toks[i - 2].kind == TokKind::Comma)
        {
            let mut j = i;
            while toks.get(j).is_some_and(|t| t.kind == TokKind::LBracket) {
                let mut depth = 0usize;
                while let Some(u) = toks.get(j) {
                    match u.kind {
                        TokKind::LBracket => depth += 1,
                        TokKind::RBracket => depth -= 1,
                        _ => {}
                    }
                    j += 1;
                    if depth == 0 {
                        break;
                    }
                }
            }
            if toks
                .get(j)
                .is_some_and(|u| u.kind == TokKind::Op && u.text == "=")
            {
                changed = true;
                i = j;
                continue;
            }
        }
        // A trigger function's literal arguments.
        if word(0, "create")
            && (word(1, "trigger")
                || (word(1, "constraint") && word(2, "trigger"))
                || (word(1, "or") && word(2, "replace")))
            && t.kind == TokKind::LParen
            && i >= 3
            && toks[i - 1].kind == TokKind::Word
            && (word(i - 2, "procedure") || word(i - 2, "function"))
            && word(i - 3, "execute")
            && toks[i + 1..].iter().any(|u| u.kind == TokKind::Str)
        {
            let close = toks[i..]
                .iter()
                .position(|u| u.kind == TokKind::RParen)
                .map(|k| i + k);
            if let Some(close) = close {
                out.push("()".into());
                changed = true;
                i = close + 1;
                continue;
            }
        }
        out.push(t.text.to_owned());
        i += 1;
    }
    changed.then(|| out.join(" "))
}

/// Analyses one statement's canonical text.
#[must_use]
pub fn analyze(canonical: &str, info: &NormInfo, dialect: Dialect, limits: &Limits) -> Analysis {
    analyze_at(canonical, info, dialect, limits, 0)
}

fn lexical_only(lf: lexical::LexFacts, why: Option<String>, dialect: Dialect) -> Analysis {
    let mut a = Analysis {
        kind: lf.kind,
        tables: lf.tables,
        functions: lf.functions,
        flags: lf.flags,
        has_where: None,
        limit_literal: false,
        unparsed: why,
        procedural: lf.procedural,
        effect: lf.effect,
        tables_unknown: false,
        hidden: Vec::new(),
    };
    // Arguments are not read without a parser: a catalogued function
    // makes what the statement reads unknown.
    let readers: Vec<(String, Reads)> = a
        .functions
        .iter()
        .filter_map(|f| {
            let base = f.rsplit('.').next().unwrap_or(f);
            hidden::lookup(dialect, base).map(|e| (base.to_owned(), e.reads))
        })
        .collect();
    for (carrier, reads) in readers {
        a.mark_unknown(
            carrier,
            reads.role(),
            "the statement was classified without a parser, so the argument was not read",
        );
    }
    a
}

/// A statement sqlparser cannot read, from PostgreSQL's own grammar: its
/// tables, kind, functions and WHERE from the server's parse tree; flags,
/// effect and procedural code from the lexical pass, as for every
/// statement. Arguments of catalogued functions are not analysed, so they
/// make what it reads unknown, as without a parser.
fn from_pg_grammar(lf: lexical::LexFacts, pg: pg_grammar::PgFacts) -> Analysis {
    // The tree names every call; the lexical list also holds words it
    // took for calls (`create table x (...)`).
    let functions = pg.functions;
    let flags = functions
        .iter()
        .fold(lf.flags, |acc, f| acc.union(lexical::function_flags(f)));
    let kind = if lf.kind.power() > pg.kind.power() {
        lf.kind
    } else {
        pg.kind
    };
    let parsed = lexical::LexFacts {
        kind,
        flags,
        functions,
        tables: pg.tables,
        procedural: lf.procedural || pg.procedural,
        ..lf
    };
    let mut a = lexical_only(parsed, None, Dialect::Postgres);
    a.has_where = pg.has_where;
    a
}

impl Analysis {
    /// Records SQL (or a relation) the statement runs that is not known:
    /// the statement becomes `dynamic_sql` with its tables unknown.
    fn mark_unknown(&mut self, carrier: String, role: Role, why: &str) {
        self.flags.insert(Flag::DynamicSql);
        self.tables_unknown = true;
        self.hidden.push(Hidden {
            carrier,
            role,
            text: None,
            kind: None,
            tables: Vec::new(),
            functions: Vec::new(),
            flags: FlagSet::default(),
            unknown: Some(why.to_owned()),
        });
    }
}

fn cut(text: &str) -> String {
    let mut end = text.len().min(HIDDEN_TEXT_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Analyses SQL text run from inside a statement (every statement in it),
/// merged into one analysis.
fn analyze_text(text: &str, dialect: Dialect, limits: &Limits, depth: u8) -> Analysis {
    let mut out = Analysis::default();
    let mut scratch = Scratch::default();
    let mut kinds = None::<Kind>;
    for span in split(text, dialect) {
        let mut canon = String::new();
        let info = normalize(
            span.text(text),
            span.mode,
            span.in_exec_comment,
            &mut canon,
            &mut scratch,
        );
        let a = analyze_at(&canon, &info, dialect, limits, depth);
        if kinds.is_none_or(|k| a.kind.power() > k.power()) {
            kinds = Some(a.kind);
        }
        out.tables.extend(a.tables);
        for f in a.functions {
            if !out.functions.contains(&f) {
                out.functions.push(f);
            }
        }
        out.flags = out.flags.union(a.flags);
        if let Some(w) = a.has_where {
            out.has_where = Some(out.has_where.unwrap_or(true) && w);
        }
        if out.unparsed.is_none() {
            out.unparsed = a.unparsed;
        }
        out.procedural |= a.procedural;
        out.tables_unknown |= a.tables_unknown;
        out.hidden.extend(a.hidden);
    }
    out.kind = kinds.unwrap_or(Kind::Other);
    out
}

/// MySQL `EXECUTE IMMEDIATE expr [USING ...]`: the statement is the text
/// it runs when that is a literal, and unknown otherwise.
fn execute_immediate(
    canonical: &str,
    toks: &[T<'_>],
    info: &NormInfo,
    limits: &Limits,
    depth: u8,
) -> Analysis {
    let literal = toks
        .get(2)
        .filter(|t| t.kind == TokKind::Str)
        .filter(|_| {
            toks.get(3)
                .is_none_or(|t| t.kind == TokKind::Word && t.text == "using")
        })
        .filter(|_| info.literals_kept && !canonical.contains('\\'))
        .and_then(|t| unquote_string(t.text, true));
    let carrier = "execute immediate".to_owned();
    match literal {
        Some(text) if depth < HIDDEN_DEPTH_MAX => {
            let mut a = analyze_text(&text, Dialect::Mysql, limits, depth + 1);
            let h = Hidden {
                carrier,
                role: Role::Sql,
                text: Some(cut(&text)),
                kind: Some(a.kind),
                tables: a.tables.clone(),
                functions: a.functions.clone(),
                flags: a.flags,
                unknown: None,
            };
            a.hidden.insert(0, h);
            a
        }
        _ => {
            let mut a = Analysis {
                unparsed: Some("EXECUTE IMMEDIATE of text built at run time".into()),
                ..Analysis::default()
            };
            a.mark_unknown(
                carrier,
                Role::Sql,
                "the statement text is not a literal (a variable or an expression)",
            );
            a
        }
    }
}

/// The text after `PREPARE name [(types)] AS` in PostgreSQL canonical text.
fn pg_prepare_body<'a>(canonical: &'a str, toks: &[T<'a>]) -> Option<(String, &'a str)> {
    let name = ident(toks.get(1)?, Dialect::Postgres)?;
    let mut i = 2;
    if toks.get(i)?.kind == TokKind::LParen {
        let mut depth = 0;
        while let Some(t) = toks.get(i) {
            match t.kind {
                TokKind::LParen => depth += 1,
                TokKind::RParen => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
    let as_tok = toks
        .get(i)
        .filter(|t| t.kind == TokKind::Word && t.text == "as")?;
    // Tokens borrow from `canonical`: find the body by offset.
    let offset = as_tok.text.as_ptr() as usize - canonical.as_ptr() as usize + 2;
    Some((name, canonical.get(offset..)?.trim_start()))
}

fn analyze_at(
    canonical: &str,
    info: &NormInfo,
    dialect: Dialect,
    limits: &Limits,
    depth: u8,
) -> Analysis {
    let toks = lexical::tokens(canonical, dialect);
    if info.unterminated {
        let lf = lexical::scan(&toks, dialect);
        return lexical_only(lf, Some("unterminated quote or comment".into()), dialect);
    }
    let first = toks
        .first()
        .map_or("", |t| if t.kind == TokKind::Word { t.text } else { "" });
    // PREPARE is decided as the statement it prepares.
    if first == "prepare"
        && !toks
            .get(1)
            .is_some_and(|t| t.kind == TokKind::Word && t.text == "transaction")
    {
        let prepared = match dialect {
            Dialect::Postgres => pg_prepare_body(canonical, &toks)
                .map(|(n, b)| (n, PreparedBody::Text(b.to_owned()))),
            Dialect::Mysql => match lexical::scan(&toks, dialect).effect {
                Effect::Prepare { name, body } => Some((name, body)),
                _ => None,
            },
        };
        let Some((name, body)) = prepared else {
            let lf = lexical::scan(&toks, dialect);
            return lexical_only(
                lf,
                Some("PREPARE without a readable statement".into()),
                dialect,
            );
        };
        let inner = match (&body, depth) {
            (PreparedBody::Text(text), 0) => {
                let mut canon = String::new();
                let info = normalize(
                    text,
                    LexMode::default_for(dialect),
                    false,
                    &mut canon,
                    &mut Scratch::default(),
                );
                let mut a = analyze_at(&canon, &info, dialect, limits, depth + 1);
                // The body keeps its literals: EXECUTE reads its LIMIT.
                a.effect = Effect::Prepare {
                    name: name.clone(),
                    body: PreparedBody::Text(text.clone()),
                };
                a
            }
            _ => {
                let mut a = Analysis {
                    unparsed: Some("prepared statement text is not a literal".into()),
                    effect: Effect::Prepare {
                        name: name.clone(),
                        body: PreparedBody::Unknown,
                    },
                    ..Analysis::default()
                };
                if matches!(body, PreparedBody::Unknown) {
                    a.mark_unknown(
                        "prepare from".to_owned(),
                        Role::Sql,
                        "the statement text is not a literal (a variable or an expression)",
                    );
                }
                a
            }
        };
        return inner;
    }
    if dialect == Dialect::Mysql
        && first == "execute"
        && toks
            .get(1)
            .is_some_and(|t| t.kind == TokKind::Word && t.text == "immediate")
    {
        return execute_immediate(canonical, &toks, info, limits, depth);
    }
    let lf = lexical::scan(&toks, dialect);
    if lf.simple {
        return lexical_only(lf, None, dialect);
    }
    if info.max_depth > limits.max_depth {
        let why = format!("nested deeper than {} levels", limits.max_depth);
        return lexical_only(lf, Some(why), dialect);
    }
    // Count what the parser will really see: literal-only groups and
    // repeated VALUES rows were collapsed after the normaliser counted them,
    // so a bulk INSERT of thousands of rows is a short text to parse.
    let parse_tokens = if info.literals_kept {
        info.tokens
    } else {
        canonical.bytes().filter(|b| *b == b' ').count() + 1
    };
    if parse_tokens > limits.max_tokens {
        let why = format!("more than {} tokens to parse", limits.max_tokens);
        return lexical_only(lf, Some(why), dialect);
    }
    // sqlparser on the canonical text, then on its repaired form; the
    // error and the repaired text (if any) on failure.
    let parsed = parse(canonical, dialect, limits).or_else(|e| {
        let table = repair_table(&toks);
        let text = table.as_deref().unwrap_or(canonical);
        let fixed = match dialect {
            Dialect::Mysql => repair_mysql(text),
            Dialect::Postgres => repair_pg(&toks),
        }
        .or(table);
        match fixed.as_deref().map(|f| parse(f, dialect, limits)) {
            Some(Ok(s)) => Ok(s),
            _ => Err((e, fixed)),
        }
    });
    let statements = match parsed {
        Ok(s) => s,
        Err((e, fixed)) if dialect == Dialect::Postgres => {
            let pg = pg_grammar::parse(canonical).or_else(|first| match &fixed {
                Some(text) => pg_grammar::parse(text).map_err(|_| first),
                None => Err(first),
            });
            return match pg {
                Ok(pg) => from_pg_grammar(lf, pg),
                Err(pg) => {
                    lexical_only(lf, Some(format!("{e}; PostgreSQL's parser: {pg}")), dialect)
                }
            };
        }
        Err((e, _)) => return lexical_only(lf, Some(e), dialect),
    };
    let mut c = Collector::new(dialect);
    c.literals = if info.literals_kept && !canonical.contains('\\') {
        Literals::Readable
    } else if info.literals_kept {
        Literals::Ambiguous
    } else {
        Literals::Replaced
    };
    c.limits = *limits;
    c.nest = depth;
    for s in &statements {
        let _ = s.visit(&mut c);
    }
    let explain_plain = statements.first().is_some_and(|s| match s {
        Statement::Explain {
            analyze, options, ..
        } => {
            !*analyze
                && !options
                    .iter()
                    .flatten()
                    .any(|o| o.name.value.eq_ignore_ascii_case("analyze"))
        }
        Statement::ExplainTable { .. } => true,
        _ => false,
    });
    let mut kind = c.best.unwrap_or(lf.kind);
    if c.use_lexical_kind && lf.kind.power() >= kind.power() {
        kind = lf.kind;
    }
    if explain_plain {
        kind = Kind::Explain;
    }
    // sqlparser's tree of a PostgreSQL DDL, DCL or maintenance statement
    // leaves out relations it only references (`REFERENCES t`, `ATTACH
    // PARTITION t`, `INHERITS (t)`, `GRANT ... ON t`, `DROP INDEX i`,
    // `VACUUM t`): the server's grammar names them. Only new shapes get
    // here.
    if dialect == Dialect::Postgres
        && matches!(kind, Kind::Ddl | Kind::Dcl | Kind::Other)
        && let Ok(pg) = pg_grammar::parse(canonical)
    {
        for (name, written) in pg.tables {
            if !c.tables.iter().any(|(n, _)| *n == name) {
                c.tables.push((name, written));
            }
        }
    }
    let limit_literal = statements.len() == 1 && statements.first().is_some_and(literal_limit);
    let mut effect = lf.effect;
    if effect == Effect::None {
        effect = c.effect;
    }
    Analysis {
        kind,
        tables: c.tables,
        functions: c.functions,
        flags: c.flags.union(lf.flags),
        has_where: c.where_all,
        limit_literal,
        unparsed: c.unparsed,
        procedural: lf.procedural || c.procedural,
        effect,
        tables_unknown: c.tables_unknown,
        hidden: c.hidden,
    }
}

fn is_number(e: &Expr) -> bool {
    matches!(e, Expr::Value(v) if matches!(v.value, Value::Number(..)))
}

fn literal_limit(s: &Statement) -> bool {
    match s {
        Statement::Query(q) => query_limit_literal(q),
        Statement::Update(u) => u.limit.as_ref().is_some_and(is_number),
        Statement::Delete(d) => d.limit.as_ref().is_some_and(is_number),
        _ => false,
    }
}

fn query_limit_literal(q: &Query) -> bool {
    use sqlparser::ast::LimitClause;
    let lim = match &q.limit_clause {
        Some(LimitClause::LimitOffset { limit: Some(e), .. }) => Some(is_number(e)),
        Some(LimitClause::OffsetCommaLimit { limit, .. }) => Some(is_number(limit)),
        _ => None,
    };
    lim.or_else(|| {
        q.fetch
            .as_ref()
            .map(|f| f.quantity.as_ref().is_none_or(is_number) && !f.percent)
    })
    .unwrap_or(false)
}

fn ptr<T>(r: &T) -> usize {
    std::ptr::from_ref(r) as usize
}

/// A WITH clause's scope: its CTE names, and how many of them the part
/// being visited may see (a non-recursive CTE sees only earlier ones: in
/// `WITH t AS (SELECT * FROM t)` the inner `t` is the real table).
struct Scope {
    ctes: Vec<(String, usize)>,
    recursive: bool,
    visible: usize,
}

struct Collector {
    dialect: Dialect,
    scopes: Vec<Scope>,
    tables: Vec<(RawName, bool)>,
    functions: Vec<String>,
    written: Vec<usize>,
    skip: Vec<usize>,
    best: Option<Kind>,
    flags: FlagSet,
    where_all: Option<bool>,
    depth: usize,
    effect: Effect,
    /// The top statement is one we classify by its leading words.
    use_lexical_kind: bool,
    /// Whether string literals in the parsed text are the statement's own.
    literals: Literals,
    limits: Limits,
    /// Nesting of hidden SQL this statement is part of.
    nest: u8,
    hidden: Vec<Hidden>,
    tables_unknown: bool,
    unparsed: Option<String>,
    procedural: bool,
}

/// What the string literals of the parsed (canonical) text are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Literals {
    /// Replaced by `''` in the canonical text: not the statement's.
    Replaced,
    /// Kept, but a backslash makes their value depend on session settings
    /// (`standard_conforming_strings`, `NO_BACKSLASH_ESCAPES`).
    Ambiguous,
    Readable,
}

/// An argument's value, as far as it is a constant.
enum ArgValue<'a> {
    Str(&'a str),
    Bool,
    Number,
    Null,
    Other,
}

fn arg_value(e: &Expr) -> ArgValue<'_> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::NationalStringLiteral(s)
            | Value::DoubleQuotedString(s) => ArgValue::Str(s),
            Value::DollarQuotedString(d) => ArgValue::Str(&d.value),
            Value::Boolean(_) => ArgValue::Bool,
            Value::Number(..) => ArgValue::Number,
            Value::Null => ArgValue::Null,
            _ => ArgValue::Other,
        },
        // `'payroll'::regclass`, `CAST('...' AS text)`, `('...')`.
        Expr::Cast { expr, .. } | Expr::Nested(expr) => arg_value(expr),
        // `regclass 'payroll'`.
        Expr::TypedString(ts) => match &ts.value.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => ArgValue::Str(s),
            Value::DollarQuotedString(d) => ArgValue::Str(&d.value),
            _ => ArgValue::Other,
        },
        // MySQL `_utf8mb4'...'`.
        Expr::Prefixed { value, .. } => arg_value(value),
        _ => ArgValue::Other,
    }
}

const BOOL_WORDS: &[&str] = &[
    "t", "tr", "tru", "true", "f", "fa", "fal", "fals", "false", "y", "ye", "yes", "n", "no", "on",
    "of", "off", "1", "0",
];

/// Whether a (PostgreSQL) overload could take this argument: a literal of
/// the wrong kind rules it out, anything else may fit.
fn fits(arg: Option<&Expr>, ty: &str, dialect: Dialect) -> bool {
    if dialect == Dialect::Mysql {
        return true;
    }
    let Some(e) = arg else { return true };
    let integer = matches!(ty, "integer" | "bigint" | "smallint" | "oid");
    let textual = matches!(
        ty,
        "text" | "name" | "character varying" | "refcursor" | "tsquery" | "bytea" | "text[]"
    );
    match arg_value(e) {
        ArgValue::Bool => ty == "boolean",
        ArgValue::Number => !textual && ty != "boolean",
        ArgValue::Str(s) if ty == "boolean" => {
            BOOL_WORDS.contains(&s.trim().to_ascii_lowercase().as_str())
        }
        ArgValue::Str(s) if integer => s.trim().parse::<i64>().is_ok(),
        ArgValue::Str(_) | ArgValue::Null | ArgValue::Other => true,
    }
}

impl Collector {
    fn new(dialect: Dialect) -> Self {
        Self {
            dialect,
            scopes: Vec::new(),
            tables: Vec::new(),
            functions: Vec::new(),
            written: Vec::new(),
            skip: Vec::new(),
            best: None,
            flags: FlagSet::default(),
            where_all: None,
            depth: 0,
            effect: Effect::None,
            use_lexical_kind: false,
            literals: Literals::Replaced,
            limits: Limits::default(),
            nest: 0,
            hidden: Vec::new(),
            tables_unknown: false,
            unparsed: None,
            procedural: false,
        }
    }

    fn raise(&mut self, k: Kind) {
        if self.best.is_none_or(|b| k.power() > b.power()) {
            self.best = Some(k);
        }
    }

    fn raw(&self, name: &ObjectName) -> RawName {
        RawName(
            name.0
                .iter()
                .map(|p| match p {
                    ObjectNamePart::Identifier(i) => {
                        NamePart(fold(&i.value, i.quote_style.is_some(), self.dialect))
                    }
                    ObjectNamePart::Function(f) => {
                        NamePart(fold(&f.name.value, false, self.dialect))
                    }
                })
                .collect(),
        )
    }

    fn function_name(&self, name: &ObjectName) -> String {
        let raw = self.raw(name);
        let parts: Vec<&str> = raw.0.iter().map(|p| p.0.as_str()).collect();
        match parts.as_slice() {
            ["pg_catalog", f] if self.dialect == Dialect::Postgres => (*f).to_owned(),
            p => p.join("."),
        }
    }

    fn add_function(&mut self, name: &ObjectName) {
        let n = self.function_name(name);
        self.flags = self.flags.union(lexical::function_flags(&n));
        if !self.functions.contains(&n) {
            self.functions.push(n);
        }
    }

    /// A call of a function of the [`hidden`] catalogue: its SQL text or
    /// relation name is part of what the statement reads.
    fn hidden_call(&mut self, name: &ObjectName, args: &[FunctionArg]) {
        let raw = self.raw(name);
        let base = raw.last().to_owned();
        let Some(entry) = hidden::lookup(self.dialect, &base) else {
            return;
        };
        let whole = match entry.reads {
            Reads::None | Reads::Sql | Reads::Relation => None,
            Reads::Cursor => Some("reads a cursor, whose query this statement does not name"),
            Reads::Fragment => Some("builds SQL text from its arguments and runs it"),
            Reads::Schema => Some("reads every table of a schema"),
            Reads::Database => Some("reads every table of the database"),
        };
        if let Some(why) = whole {
            self.unknown(base, entry.reads.role(), why);
            return;
        }
        let mut positional: Vec<Option<&Expr>> = Vec::new();
        let mut named: Vec<(String, Option<&Expr>)> = Vec::new();
        for a in args {
            let (name, arg) = match a {
                FunctionArg::Unnamed(arg) => (None, arg),
                FunctionArg::Named { name, arg, .. } => (
                    Some(fold(&name.value, name.quote_style.is_some(), self.dialect)),
                    arg,
                ),
                FunctionArg::ExprNamed { name, arg, .. } => {
                    let n = match name {
                        Expr::Identifier(i) => {
                            fold(&i.value, i.quote_style.is_some(), self.dialect)
                        }
                        _ => String::new(),
                    };
                    (Some(n), arg)
                }
            };
            let e = match arg {
                FunctionArgExpr::Expr(e) => Some(e),
                _ => None,
            };
            match name {
                Some(n) => named.push((n, e)),
                None => positional.push(e),
            }
        }
        // Every overload the call may resolve to counts.
        let mut uses: Vec<(Role, Option<&Expr>)> = Vec::new();
        let mut any = false;
        for ov in &entry.overloads {
            if positional.len() + named.len() > ov.len()
                || named
                    .iter()
                    .any(|(n, _)| !ov.iter().any(|p| !p.name.is_empty() && p.name == *n))
                || !positional
                    .iter()
                    .zip(ov)
                    .all(|(a, p)| fits(*a, &p.ty, self.dialect))
            {
                continue;
            }
            any = true;
            for (i, p) in ov.iter().enumerate() {
                let Some(role) = p.role else { continue };
                let arg = if i < positional.len() {
                    Some(positional[i])
                } else {
                    named
                        .iter()
                        .find(|(n, _)| !p.name.is_empty() && *n == p.name)
                        .map(|(_, e)| *e)
                };
                // An argument left to its default carries nothing.
                let Some(arg) = arg else { continue };
                let same = |(r, e): &(Role, Option<&Expr>)| {
                    *r == role
                        && match (e, arg) {
                            (Some(a), Some(b)) => std::ptr::eq(*a, b),
                            (None, None) => true,
                            _ => false,
                        }
                };
                if !uses.iter().any(same) {
                    uses.push((role, arg));
                }
            }
        }
        if !any {
            self.unknown(
                base,
                entry.reads.role(),
                "no known form of the function takes these arguments",
            );
            return;
        }
        for (role, arg) in uses {
            self.hidden_arg(&base, role, arg);
        }
    }

    fn hidden_arg(&mut self, carrier: &str, role: Role, arg: Option<&Expr>) {
        let value = arg.map_or(ArgValue::Other, arg_value);
        let text = match value {
            // NULL runs and names nothing.
            ArgValue::Null => return,
            ArgValue::Str(s) => match self.literals {
                Literals::Readable => s,
                Literals::Ambiguous => {
                    self.unknown(
                        carrier.to_owned(),
                        role,
                        "a backslash makes the literal's value depend on session settings",
                    );
                    return;
                }
                Literals::Replaced => {
                    self.unknown(
                        carrier.to_owned(),
                        role,
                        "the literal was not kept for analysis",
                    );
                    return;
                }
            },
            ArgValue::Bool | ArgValue::Number | ArgValue::Other => {
                self.unknown(
                    carrier.to_owned(),
                    role,
                    match role {
                        Role::Relation | Role::Written => {
                            "the relation is not named by a literal (a column, a parameter, an expression or an OID)"
                        }
                        _ => "the text is not a literal (a column, a parameter or an expression)",
                    },
                );
                return;
            }
        };
        match role {
            Role::Sql if self.nest < HIDDEN_DEPTH_MAX => {
                let a = analyze_text(text, self.dialect, &self.limits, self.nest + 1);
                self.raise(a.kind);
                for t in &a.tables {
                    self.tables.push(t.clone());
                }
                for f in &a.functions {
                    if !self.functions.contains(f) {
                        self.functions.push(f.clone());
                    }
                }
                self.flags = self.flags.union(a.flags);
                if let Some(w) = a.has_where {
                    self.where_and(w);
                }
                if self.unparsed.is_none()
                    && let Some(why) = &a.unparsed
                {
                    self.unparsed = Some(format!("SQL text run by {carrier}: {why}"));
                }
                self.procedural |= a.procedural;
                self.tables_unknown |= a.tables_unknown;
                self.hidden.push(Hidden {
                    carrier: carrier.to_owned(),
                    role,
                    text: Some(cut(text)),
                    kind: Some(a.kind),
                    tables: a.tables,
                    functions: a.functions,
                    flags: a.flags,
                    unknown: None,
                });
                self.hidden.extend(a.hidden);
            }
            Role::Relation | Role::Written => {
                let Some(name) = hidden::relation_name(text, self.dialect) else {
                    self.unknown(
                        carrier.to_owned(),
                        role,
                        "the literal is not a plain relation name",
                    );
                    return;
                };
                let written = role == Role::Written;
                self.tables.push((name.clone(), written));
                self.hidden.push(Hidden {
                    carrier: carrier.to_owned(),
                    role,
                    text: Some(cut(text)),
                    kind: None,
                    tables: vec![(name, written)],
                    functions: Vec::new(),
                    flags: FlagSet::default(),
                    unknown: None,
                });
            }
            Role::Sql => self.unknown(
                carrier.to_owned(),
                role,
                "SQL text nested deeper than the analysis follows",
            ),
            Role::Cursor | Role::Fragment | Role::Schema | Role::Database => {
                self.unknown(
                    carrier.to_owned(),
                    role,
                    "what it reads is not named by the statement",
                );
            }
        }
    }

    fn unknown(&mut self, carrier: String, role: Role, why: &str) {
        self.flags.insert(Flag::DynamicSql);
        self.tables_unknown = true;
        self.hidden.push(Hidden {
            carrier,
            role,
            text: None,
            kind: None,
            tables: Vec::new(),
            functions: Vec::new(),
            flags: FlagSet::default(),
            unknown: Some(why.to_owned()),
        });
    }

    /// `TABLE name` bodies of a query (alone, or as operands of UNION,
    /// EXCEPT, INTERSECT): a SELECT of that table. `own` are the query's
    /// own CTE names, all visible to its body.
    fn table_bodies(&mut self, body: &SetExpr, own: &[String]) {
        match body {
            SetExpr::Table(t) => {
                let Some(table) = &t.table_name else { return };
                let mut parts = Vec::new();
                if let Some(s) = &t.schema_name {
                    parts.push(NamePart(fold(
                        &s.value,
                        s.quote_style.is_some(),
                        self.dialect,
                    )));
                }
                parts.push(NamePart(fold(
                    &table.value,
                    table.quote_style.is_some(),
                    self.dialect,
                )));
                if parts.len() == 1 && (own.contains(&parts[0].0) || self.is_cte(&parts[0].0)) {
                    return;
                }
                self.tables.push((RawName(parts), false));
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.table_bodies(left, own);
                self.table_bodies(right, own);
            }
            _ => {}
        }
    }

    fn write_target(&mut self, name: &ObjectName) {
        self.written.push(ptr(name));
        let raw = self.raw(name);
        self.tables.push((raw, true));
    }

    fn write_twj(&mut self, twj: &TableWithJoins) {
        if let TableFactor::Table { name, .. } = &twj.relation {
            self.write_target(name);
        }
        for j in &twj.joins {
            if let TableFactor::Table { name, .. } = &j.relation {
                self.write_target(name);
            }
        }
    }

    fn where_and(&mut self, present: bool) {
        self.where_all = Some(self.where_all.unwrap_or(true) && present);
    }

    fn is_cte(&self, name: &str) -> bool {
        self.scopes.iter().any(|s| {
            let n = if s.recursive {
                s.ctes.len()
            } else {
                s.visible.min(s.ctes.len())
            };
            s.ctes[..n].iter().any(|(c, _)| c == name)
        })
    }

    fn statement(&mut self, s: &Statement) {
        let top = self.depth == 1;
        let kind = match s {
            Statement::Query(_) => Some(Kind::Select),
            Statement::Insert(i) => {
                if let TableObject::TableName(n) = &i.table {
                    self.write_target(n);
                }
                let upsert = match &i.on {
                    Some(OnInsert::DuplicateKeyUpdate(_)) => true,
                    Some(OnInsert::OnConflict(c)) => {
                        matches!(c.action, OnConflictAction::DoUpdate(_))
                    }
                    _ => false,
                };
                // REPLACE deletes the rows it collides with; an upsert
                // updates them.
                Some(if i.replace_into {
                    Kind::Delete
                } else if upsert {
                    Kind::Update
                } else {
                    Kind::Insert
                })
            }
            Statement::Update(u) => {
                self.write_twj(&u.table);
                self.where_and(u.selection.is_some());
                Some(Kind::Update)
            }
            Statement::Delete(d) => {
                let from = match &d.from {
                    FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f) => f,
                };
                for twj in from {
                    self.write_twj(twj);
                }
                self.where_and(d.selection.is_some());
                Some(Kind::Delete)
            }
            Statement::Merge(m) => {
                if let TableFactor::Table { name, .. } = &m.table {
                    self.write_target(name);
                }
                Some(Kind::Merge)
            }
            Statement::Truncate(t) => {
                for n in &t.table_names {
                    self.write_target(&n.name);
                }
                Some(Kind::Truncate)
            }
            Statement::Copy {
                source, to, target, ..
            } => {
                if let CopySource::Table { table_name, .. } = source {
                    if *to {
                        let raw = self.raw(table_name);
                        self.tables.push((raw, false));
                    } else {
                        self.write_target(table_name);
                    }
                }
                match target {
                    CopyTarget::File { .. } => self.flags.insert(Flag::FileAccess),
                    CopyTarget::Program { .. } => self.flags.insert(Flag::ProgramExec),
                    CopyTarget::Stdin | CopyTarget::Stdout => {}
                }
                Some(Kind::Copy)
            }
            // EXPLAIN takes its statement's kind when it runs it (decided
            // by the caller for the top level).
            Statement::Explain { .. } => None,
            Statement::ExplainTable { table_name, .. } => {
                let raw = self.raw(table_name);
                self.tables.push((raw, false));
                Some(Kind::Explain)
            }
            Statement::Declare { .. } | Statement::Fetch { .. } | Statement::Close { .. } => {
                Some(Kind::Select)
            }
            Statement::Call(f) => {
                self.add_function(&f.name);
                if let FunctionArguments::List(l) = &f.args {
                    self.hidden_call(&f.name, &l.args);
                }
                Some(Kind::Call)
            }
            Statement::LoadData { table_name, .. } => {
                self.write_target(table_name);
                self.flags.insert(Flag::FileAccess);
                Some(Kind::Insert)
            }
            Statement::Lock(_) | Statement::LockTables { .. } | Statement::UnlockTables => {
                self.flags.insert(Flag::Lock);
                if let Statement::LockTables { tables } = s {
                    for t in tables {
                        let raw = RawName(vec![NamePart(fold(
                            &t.table.value,
                            t.table.quote_style.is_some(),
                            self.dialect,
                        ))]);
                        self.tables.push((raw, false));
                    }
                }
                Some(Kind::Other)
            }
            Statement::Kill { .. } | Statement::Flush { .. } | Statement::Install { .. } => {
                self.flags.insert(Flag::Admin);
                Some(Kind::Other)
            }
            Statement::Load { .. } => {
                self.flags.insert(Flag::Admin);
                self.flags.insert(Flag::FileAccess);
                Some(Kind::Other)
            }
            Statement::CreateTable(ct) => {
                self.write_target(&ct.name);
                Some(Kind::Ddl)
            }
            // A rule rewrites what every later statement does to its table.
            Statement::CreateRule(r) => {
                self.write_target(&r.table_name);
                Some(Kind::Ddl)
            }
            Statement::CreateView(cv) => {
                self.write_target(&cv.name);
                Some(Kind::Ddl)
            }
            Statement::CreateIndex(ci) => {
                self.write_target(&ci.table_name);
                Some(Kind::Ddl)
            }
            Statement::AlterTable(at) => {
                self.write_target(&at.name);
                Some(Kind::Ddl)
            }
            Statement::Drop {
                object_type, names, ..
            } => match object_type {
                ObjectType::Table | ObjectType::View | ObjectType::MaterializedView => {
                    for n in names {
                        self.write_target(n);
                    }
                    Some(Kind::Ddl)
                }
                ObjectType::Role | ObjectType::User => Some(Kind::Dcl),
                _ => Some(Kind::Ddl),
            },
            _ => {
                if top {
                    self.use_lexical_kind = true;
                }
                None
            }
        };
        if let Some(k) = kind {
            self.raise(k);
        }
    }
}

impl Visitor for Collector {
    type Break = ();

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        self.depth += 1;
        self.statement(s);
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _s: &Statement) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        self.raise(Kind::Select);
        if !q.locks.is_empty() {
            self.flags.insert(Flag::Lock);
        }
        let me = ptr(q);
        if let Some(top) = self.scopes.last_mut()
            && let Some(i) = top.ctes.iter().position(|(_, p)| *p == me)
        {
            top.visible = i;
        }
        let scope = match &q.with {
            Some(w) => Scope {
                ctes: w
                    .cte_tables
                    .iter()
                    .map(|c| {
                        let a = &c.alias.name;
                        (
                            fold(&a.value, a.quote_style.is_some(), self.dialect),
                            ptr(&*c.query),
                        )
                    })
                    .collect(),
                recursive: w.recursive,
                visible: 0,
            },
            None => Scope {
                ctes: Vec::new(),
                recursive: false,
                visible: 0,
            },
        };
        self.scopes.push(scope);
        let own: Vec<String> = q.with.as_ref().map_or_else(Vec::new, |w| {
            w.cte_tables
                .iter()
                .map(|c| {
                    let a = &c.alias.name;
                    fold(&a.value, a.quote_style.is_some(), self.dialect)
                })
                .collect()
        });
        self.table_bodies(&q.body, &own);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        self.scopes.pop();
        let me = ptr(q);
        if let Some(top) = self.scopes.last_mut()
            && let Some(i) = top.ctes.iter().position(|(_, p)| *p == me)
        {
            top.visible = top.visible.max(i + 1);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, sel: &Select) -> ControlFlow<()> {
        if let Some(into) = &sel.into {
            // PostgreSQL SELECT INTO creates a table; MySQL's targets are
            // variables.
            if self.dialect == Dialect::Postgres {
                self.raise(Kind::Ddl);
                for t in &into.targets {
                    let parts: Vec<(&str, bool)> = match t {
                        Expr::Identifier(i) => vec![(i.value.as_str(), i.quote_style.is_some())],
                        Expr::CompoundIdentifier(ids) => ids
                            .iter()
                            .map(|i| (i.value.as_str(), i.quote_style.is_some()))
                            .collect(),
                        _ => continue,
                    };
                    let raw = RawName::from_ident_parts(parts.into_iter(), self.dialect);
                    self.tables.push((raw, true));
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        match tf {
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => {
                self.skip.push(ptr(name));
                self.add_function(name);
                self.hidden_call(name, &args.args);
            }
            TableFactor::Function { name, args, .. } => {
                self.add_function(name);
                self.hidden_call(name, args);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<()> {
        let p = ptr(name);
        if self.skip.contains(&p) || self.written.contains(&p) {
            return ControlFlow::Continue(());
        }
        let raw = self.raw(name);
        if raw.0.len() == 1 && self.is_cte(&raw.0[0].0) {
            return ControlFlow::Continue(());
        }
        self.tables.push((raw, false));
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            self.add_function(&f.name);
            match &f.args {
                FunctionArguments::List(l) => self.hidden_call(&f.name, &l.args),
                FunctionArguments::None => self.hidden_call(&f.name, &[]),
                FunctionArguments::Subquery(_) => {
                    if let Some(e) = hidden::lookup(self.dialect, self.raw(&f.name).last()) {
                        let base = self.raw(&f.name).last().to_owned();
                        self.unknown(base, e.reads.role(), "its argument is a subquery");
                    }
                }
            }
        }
        ControlFlow::Continue(())
    }
}
