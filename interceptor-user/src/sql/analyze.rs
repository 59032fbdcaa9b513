//! Statement analysis with sqlparser: kind, tables read and written (CTE
//! names excluded, with their scoping), functions, WHERE presence, LIMIT
//! shape, flags. Works on the canonical text (see [`super::normalize`]).

use std::ops::ControlFlow;

use sqlparser::{
    ast::{
        CopySource, CopyTarget, Expr, FromTable, ObjectName, ObjectNamePart, ObjectType,
        OnConflictAction, OnInsert, Query, Select, Statement, TableFactor, TableObject,
        TableWithJoins, Value, Visit, Visitor,
    },
    dialect::{MySqlDialect, PostgreSqlDialect},
    parser::Parser,
};

use super::{
    Dialect, Flag, FlagSet, Kind, Limits,
    lexer::{LexMode, NormInfo, Scratch, TokKind, normalize},
    lexical::{self, T, ident},
    names::{NamePart, RawName, fold},
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
}

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
    let mut s = c.replace(" lock in share mode", " for share");
    for kw in [" into outfile ", " into dumpfile "] {
        if let Some(i) = s.find(kw) {
            let after = i + kw.len();
            let end = s[after..].find(" from ").map_or(s.len(), |j| after + j);
            s.replace_range(i..end, "");
        }
    }
    (s != c).then_some(s)
}

/// Analyses one statement's canonical text.
#[must_use]
pub fn analyze(canonical: &str, info: &NormInfo, dialect: Dialect, limits: &Limits) -> Analysis {
    analyze_at(canonical, info, dialect, limits, 0)
}

fn lexical_only(lf: lexical::LexFacts, why: Option<String>) -> Analysis {
    Analysis {
        kind: lf.kind,
        tables: lf.tables,
        functions: lf.functions,
        flags: lf.flags,
        has_where: None,
        limit_literal: false,
        unparsed: why,
        procedural: lf.procedural,
        effect: lf.effect,
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
        return lexical_only(lf, Some("unterminated quote or comment".into()));
    }
    let first = toks
        .first()
        .map_or("", |t| if t.kind == TokKind::Word { t.text } else { "" });
    // PREPARE is decided as the statement it prepares.
    if first == "prepare"
        && !toks
            .get(2)
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
            return lexical_only(lf, Some("PREPARE without a readable statement".into()));
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
            _ => Analysis {
                unparsed: Some("prepared statement text is not a literal".into()),
                effect: Effect::Prepare {
                    name: name.clone(),
                    body: PreparedBody::Unknown,
                },
                ..Analysis::default()
            },
        };
        return inner;
    }
    let lf = lexical::scan(&toks, dialect);
    if lf.simple {
        return lexical_only(lf, None);
    }
    if info.max_depth > limits.max_depth {
        let why = format!("nested deeper than {} levels", limits.max_depth);
        return lexical_only(lf, Some(why));
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
        return lexical_only(lf, Some(why));
    }
    let parsed = match parse(canonical, dialect, limits) {
        Ok(s) => Ok(s),
        Err(e) => match dialect {
            Dialect::Mysql => match repair_mysql(canonical) {
                Some(fixed) => parse(&fixed, dialect, limits).map_err(|_| e),
                None => Err(e),
            },
            Dialect::Postgres => Err(e),
        },
    };
    let statements = match parsed {
        Ok(s) => s,
        Err(e) => return lexical_only(lf, Some(e)),
    };
    let mut c = Collector::new(dialect);
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
        unparsed: None,
        procedural: lf.procedural,
        effect,
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
                args: Some(_),
                ..
            } => {
                self.skip.push(ptr(name));
                self.add_function(name);
            }
            TableFactor::Function { name, .. } => self.add_function(name),
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
        }
        ControlFlow::Continue(())
    }
}
