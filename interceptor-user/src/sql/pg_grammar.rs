//! PostgreSQL's own grammar (libpg_query, through the `pg_query` crate) for
//! the statements sqlparser cannot read: the tree it returns is walked
//! generically for the facts (every relation named anywhere, with CTE
//! scoping; the statement kinds; the functions called; the WHERE of an
//! UPDATE or DELETE). Only new shapes that sqlparser refused come here, so
//! its cost (a few microseconds plus the tree's conversion) stays off the
//! warm path.
//!
//! The walk errs toward more: a name it cannot place is read, a relation
//! that is the target of a statement is written, and a statement type it
//! does not know is DDL.

use std::collections::HashSet;

use pg_query::protobuf::ObjectType;
use serde_json::{Map, Value};

use super::{
    Kind,
    names::{NamePart, RawName},
};

/// What PostgreSQL's grammar says of one statement's canonical text.
#[derive(Debug, Default)]
pub(crate) struct PgFacts {
    pub kind: Kind,
    pub tables: Vec<(RawName, bool)>,
    pub functions: Vec<String>,
    /// Some for an UPDATE or DELETE: whether it has a WHERE.
    pub has_where: Option<bool>,
    pub procedural: bool,
}

/// Parses `canonical` with PostgreSQL's grammar. `Err` carries the
/// parser's message.
pub(crate) fn parse(canonical: &str) -> Result<PgFacts, String> {
    // The crate's own post-processing indexes into the tree; a panic there
    // must not take a connection down with it.
    let tree = std::panic::catch_unwind(|| {
        pg_query::parse(canonical, 0)
            .map_err(|e| e.to_string())
            .and_then(|r| serde_json::to_value(&r.protobuf).map_err(|e| e.to_string()))
    })
    .map_err(|_| "PostgreSQL's parser failed on this text".to_owned())??;
    let mut w = Walk::default();
    let stmts = tree.get("stmts").and_then(Value::as_array);
    for (i, s) in stmts.into_iter().flatten().enumerate() {
        let Some((name, body)) = s
            .pointer("/stmt/node")
            .and_then(Value::as_object)
            .and_then(|o| o.iter().next())
        else {
            continue;
        };
        w.statement(name, body, &[]);
        if i == 0 {
            if matches!(name.as_str(), "UpdateStmt" | "DeleteStmt") {
                w.facts.has_where = Some(!body.get("where_clause").is_none_or(Value::is_null));
            }
            // A plain EXPLAIN runs nothing of what it explains.
            if name == "ExplainStmt" && !explain_analyze(body) {
                w.facts.kind = Kind::Explain;
            }
        }
    }
    Ok(w.facts)
}

fn explain_analyze(body: &Value) -> bool {
    let options = body.get("options").and_then(Value::as_array);
    options.into_iter().flatten().any(|o| {
        o.pointer("/node/DefElem/defname")
            .and_then(Value::as_str)
            .is_some_and(|d| d.eq_ignore_ascii_case("analyze"))
    })
}

#[derive(Default)]
struct Walk {
    facts: PgFacts,
    /// Locations of the relations that are a statement's target.
    written: HashSet<i64>,
}

/// A RangeVar, wrapped in a node or not.
fn range_var(v: &Value) -> Option<&Map<String, Value>> {
    let o = v.as_object()?;
    let o = match o.get("node").and_then(Value::as_object) {
        Some(n) => n.get("RangeVar")?.as_object()?,
        None => o,
    };
    o.contains_key("relname").then_some(o)
}

fn text<'a>(o: &'a Map<String, Value>, key: &str) -> &'a str {
    o.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The strings of a list of `String` nodes (a qualified name).
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.pointer("/node/String/sval").and_then(Value::as_str))
        .map(ToOwned::to_owned)
        .collect()
}

/// A statement node's kind, in the taxonomy of the sqlparser path (an
/// upsert is an update, FETCH a select, SHOW and VACUUM other).
fn kind_of(stmt: &str, body: &Value) -> Kind {
    let set_transaction = || {
        body.get("name").and_then(Value::as_str).is_some_and(|n| {
            n.starts_with("TRANSACTION") || n.starts_with("SESSION CHARACTERISTICS")
        })
    };
    match stmt {
        "SelectStmt" if !body.get("into_clause").is_none_or(Value::is_null) => Kind::Ddl,
        "SelectStmt" | "DeclareCursorStmt" | "FetchStmt" => Kind::Select,
        "InsertStmt"
            if body
                .pointer("/on_conflict_clause/action")
                .and_then(Value::as_i64)
                == Some(pg_query::protobuf::OnConflictAction::OnconflictUpdate as i64) =>
        {
            Kind::Update
        }
        "InsertStmt" => Kind::Insert,
        "UpdateStmt" => Kind::Update,
        "DeleteStmt" => Kind::Delete,
        "MergeStmt" => Kind::Merge,
        "TruncateStmt" => Kind::Truncate,
        "CopyStmt" => Kind::Copy,
        "CallStmt" => Kind::Call,
        "ExplainStmt" => Kind::Explain,
        "TransactionStmt" | "ConstraintsSetStmt" => Kind::Tcl,
        "VariableSetStmt" if set_transaction() => Kind::Tcl,
        "VariableSetStmt" | "DiscardStmt" | "DeallocateStmt" => Kind::Session,
        "GrantStmt"
        | "GrantRoleStmt"
        | "CreateRoleStmt"
        | "AlterRoleStmt"
        | "AlterRoleSetStmt"
        | "DropRoleStmt"
        | "AlterDefaultPrivilegesStmt"
        | "ReassignOwnedStmt"
        | "DropOwnedStmt" => Kind::Dcl,
        "DoStmt" | "ListenStmt" | "UnlistenStmt" | "NotifyStmt" | "LoadStmt" | "CheckPointStmt"
        | "ClosePortalStmt" | "LockStmt" | "PrepareStmt" | "ExecuteStmt" | "VariableShowStmt"
        | "VacuumStmt" => Kind::Other,
        _ => Kind::Ddl,
    }
}

/// Fields of a statement that name its target relation(s).
const TARGETS: [&str; 8] = [
    "rels",
    "relation",
    "relations",
    "rel",
    "into",
    "into_clause",
    "view",
    "sequence",
];

/// `DROP` of these removes relations: its objects are written tables.
fn drops_relations(remove_type: i64) -> bool {
    [
        ObjectType::ObjectTable,
        ObjectType::ObjectView,
        ObjectType::ObjectMatview,
        ObjectType::ObjectIndex,
        ObjectType::ObjectSequence,
        ObjectType::ObjectForeignTable,
    ]
    .iter()
    .any(|t| *t as i64 == remove_type)
}

impl Walk {
    fn table(&mut self, parts: Vec<String>, written: bool) {
        let name = RawName(parts.into_iter().map(NamePart).collect());
        if !self.facts.tables.contains(&(name.clone(), written)) {
            self.facts.tables.push((name, written));
        }
    }

    /// A statement node: its kind and its targets, then its contents.
    fn statement(&mut self, name: &str, body: &Value, ctes: &[String]) {
        let kind = kind_of(name, body);
        if kind.power() > self.facts.kind.power() || self.facts.kind == Kind::Other {
            self.facts.kind = kind;
        }
        match name {
            "DoStmt" => self.facts.procedural = true,
            // SET CONSTRAINTS names constraints, which the tree holds as
            // relations.
            "ConstraintsSetStmt" => return,
            "DropStmt" => {
                let remove = body.get("remove_type").and_then(Value::as_i64);
                if remove.is_some_and(drops_relations) {
                    let objects = body.get("objects").and_then(Value::as_array);
                    for o in objects.into_iter().flatten() {
                        let parts = o.pointer("/node/List/items").map(strings);
                        if let Some(parts) = parts.filter(|p| !p.is_empty()) {
                            self.table(parts, true);
                        }
                    }
                }
            }
            _ => {}
        }
        let reads_target = name == "CopyStmt" && body.get("is_from") != Some(&Value::Bool(true))
            || name == "LockStmt";
        if let Some(o) = body.as_object()
            && !reads_target
        {
            for key in TARGETS {
                if let Some(v) = o.get(key) {
                    self.mark_targets(v);
                }
            }
        }
        self.value(body, ctes);
    }

    /// Records the locations of the relations in a target field.
    fn mark_targets(&mut self, v: &Value) {
        if let Some(list) = v.as_array() {
            for x in list {
                self.mark_targets(x);
            }
            return;
        }
        if let Some(rv) = range_var(v) {
            if let Some(at) = rv.get("location").and_then(Value::as_i64) {
                self.written.insert(at);
            }
            return;
        }
        // IntoClause { rel }, VacuumRelation { relation }.
        for inner in ["/rel", "/node/VacuumRelation/relation"] {
            if let Some(x) = v.pointer(inner) {
                self.mark_targets(x);
            }
        }
    }

    fn value(&mut self, v: &Value, ctes: &[String]) {
        match v {
            Value::Array(a) => {
                for x in a {
                    self.value(x, ctes);
                }
            }
            Value::Object(o) => self.object(o, ctes),
            _ => {}
        }
    }

    fn object(&mut self, o: &Map<String, Value>, ctes: &[String]) {
        if o.contains_key("relname") && o.contains_key("schemaname") {
            let (schema, rel) = (text(o, "schemaname"), text(o, "relname"));
            let at = o.get("location").and_then(Value::as_i64);
            let written = at.is_some_and(|at| self.written.contains(&at));
            if schema.is_empty() && ctes.iter().any(|c| c == rel) {
                return;
            }
            let mut parts = Vec::new();
            if !schema.is_empty() {
                parts.push(schema.to_owned());
            }
            parts.push(rel.to_owned());
            self.table(parts, written);
            return;
        }
        // A WITH clause scopes its names over the rest of this node; each
        // CTE's own body sees the earlier ones (and itself if recursive).
        let mut scope = ctes.to_vec();
        if let Some(with) = o.get("with_clause").filter(|w| !w.is_null()) {
            let recursive = with.get("recursive") == Some(&Value::Bool(true));
            let list = with.get("ctes").and_then(Value::as_array);
            let ctes: Vec<&Value> = list
                .into_iter()
                .flatten()
                .filter_map(|c| c.pointer("/node/CommonTableExpr"))
                .collect();
            let name = |cte: &Value| {
                let n = cte.get("ctename").and_then(Value::as_str);
                n.unwrap_or("").to_owned()
            };
            // WITH RECURSIVE: every name is visible in every body.
            if recursive {
                scope.extend(ctes.iter().map(|c| name(c)));
            }
            for cte in ctes {
                if let Some(q) = cte.get("ctequery") {
                    self.value(q, &scope);
                }
                if !recursive {
                    scope.push(name(cte));
                }
            }
        }
        if let Some(f) = o.get("FuncCall") {
            let name = strings(f.get("funcname").unwrap_or(&Value::Null));
            let name = match name.as_slice() {
                [schema, f] if schema == "pg_catalog" => f.clone(),
                n => n.join("."),
            };
            if !name.is_empty() && !self.facts.functions.contains(&name) {
                self.facts.functions.push(name);
            }
        }
        for (k, v) in o {
            // `FOR UPDATE OF a`: names of the FROM list, not relations.
            if k == "with_clause" || k == "locked_rels" {
                continue;
            }
            if k.ends_with("Stmt") && v.is_object() {
                self.statement(k, v, &scope);
            } else {
                self.value(v, &scope);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(sql: &str) -> (Kind, Vec<(String, bool)>, Vec<String>) {
        let f = parse(sql).unwrap();
        let mut t: Vec<(String, bool)> = f
            .tables
            .iter()
            .map(|(n, w)| {
                let p: Vec<&str> = n.0.iter().map(|p| p.0.as_str()).collect();
                (p.join("."), *w)
            })
            .collect();
        t.sort();
        (f.kind, t, f.functions)
    }

    fn t(list: &[(&str, bool)]) -> Vec<(String, bool)> {
        list.iter().map(|(n, w)| ((*n).to_owned(), *w)).collect()
    }

    #[test]
    fn targets_are_written_and_sources_read() {
        let (k, tables, _) = facts(
            "with a as (select * from b) merge into t using s on t.id = s.id when matched then update set v = s.v",
        );
        assert_eq!(k, Kind::Merge);
        assert_eq!(tables, t(&[("b", false), ("s", false), ("t", true)]));
        let (k, tables, _) = facts("copy t from stdin");
        assert_eq!((k, tables), (Kind::Copy, t(&[("t", true)])));
        let (k, tables, _) = facts("copy t to stdout");
        assert_eq!((k, tables), (Kind::Copy, t(&[("t", false)])));
        let (k, tables, _) = facts("delete from a using b where a.id = b.id");
        assert_eq!((k, tables), (Kind::Delete, t(&[("a", true), ("b", false)])));
        let (k, tables, _) = facts("select * into p from q");
        assert_eq!((k, tables), (Kind::Ddl, t(&[("p", true), ("q", false)])));
        let (k, tables, _) = facts("drop table x.y, z");
        assert_eq!((k, tables), (Kind::Ddl, t(&[("x.y", true), ("z", true)])));
        let (k, tables, _) = facts("vacuum analyze v1");
        assert_eq!((k, tables), (Kind::Other, t(&[("v1", true)])));
    }

    #[test]
    fn a_cte_hides_only_the_names_in_its_scope() {
        // The outer `payroll` is the real table; the CTE of the same name
        // lives only inside the subquery.
        let (_, tables, _) =
            facts("select * from payroll, (with payroll as (select 1) select * from payroll) s");
        assert_eq!(tables, t(&[("payroll", false)]));
        // A non-recursive CTE's body sees only earlier CTEs.
        let (_, tables, _) = facts("with a as (select * from b), b as (select 1) select * from a");
        assert_eq!(tables, t(&[("b", false)]));
        let (_, tables, _) =
            facts("with recursive r as (select 1 union all select * from r) select * from r, z");
        assert_eq!(tables, t(&[("z", false)]));
    }

    #[test]
    fn kinds_functions_and_where() {
        let (k, tables, f) = facts(
            "with d as (delete from x returning *) select pg_catalog.lower(a), s.f(b) from d",
        );
        assert_eq!(k, Kind::Delete);
        assert_eq!(tables, t(&[("x", true)]));
        assert_eq!(f, vec!["lower".to_owned(), "s.f".to_owned()]);
        assert_eq!(parse("update t set a = 0").unwrap().has_where, Some(false));
        assert_eq!(
            parse("delete from t where a = 0").unwrap().has_where,
            Some(true)
        );
        assert_eq!(facts("explain select * from t").0, Kind::Explain);
        assert_eq!(facts("explain (analyze) delete from t").0, Kind::Delete);
        assert_eq!(facts("grant select on t to bob").0, Kind::Dcl);
        assert!(parse("do $$ begin end $$").unwrap().procedural);
        assert!(parse("selec 1").unwrap_err().contains("syntax error"));
    }
}

/// The two parsers on PostgreSQL's regression statements that both read:
/// no table PostgreSQL's grammar finds may be missing from the facts (it
/// would be a read or write a policy never saw). Agreement on kind and
/// tables is printed (`--nocapture`).
#[cfg(test)]
mod corpus {
    use std::collections::BTreeSet;

    use super::super::{Dialect, LexMode, Limits, Scratch, analyze, normalize, split};

    fn names(t: &[(super::RawName, bool)], written: bool) -> BTreeSet<String> {
        t.iter()
            .filter(|(_, w)| *w || !written)
            .map(|(n, _)| {
                n.0.iter()
                    .map(|p| p.0.as_str())
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect()
    }

    #[test]
    fn both_parsers_on_the_regression_corpus() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/corpus/postgres");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        files.sort();
        let (mut both, mut same_kind, mut same_tables, mut same_written) = (0, 0, 0, 0);
        let (mut pieces, mut pg_alone) = (0, 0);
        let mut missing = Vec::new();
        let mut kinds = std::collections::BTreeMap::new();
        let mut scratch = Scratch::default();
        for f in files {
            for line in std::fs::read_to_string(&f).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let sql = v["sql"].as_str().unwrap();
                for span in split(sql, Dialect::Postgres) {
                    let mut canon = String::new();
                    let info = normalize(
                        span.text(sql),
                        LexMode::default_for(Dialect::Postgres),
                        false,
                        &mut canon,
                        &mut scratch,
                    );
                    let a = analyze(&canon, &info, Dialect::Postgres, &Limits::default());
                    let pg = super::parse(&canon);
                    pieces += 1;
                    pg_alone += usize::from(pg.is_ok());
                    if a.unparsed.is_some() || a.tables_unknown {
                        continue;
                    }
                    let Ok(pg) = pg else {
                        continue;
                    };
                    both += 1;
                    same_kind += usize::from(a.kind == pg.kind);
                    if a.kind != pg.kind {
                        *kinds
                            .entry(format!(
                                "{} vs {}: {}",
                                a.kind,
                                pg.kind,
                                canon.split(' ').take(3).collect::<Vec<_>>().join(" ")
                            ))
                            .or_insert(0usize) += 1;
                    }
                    let (sa, sp) = (names(&a.tables, false), names(&pg.tables, false));
                    same_tables += usize::from(sa == sp);
                    same_written += usize::from(names(&a.tables, true) == names(&pg.tables, true));
                    let lack: Vec<_> = sp.difference(&sa).cloned().collect();
                    if !lack.is_empty() {
                        missing.push(format!(
                            "{}: {canon} lacks {lack:?}",
                            f.file_stem().unwrap().to_string_lossy()
                        ));
                    }
                }
            }
        }
        println!(
            "PostgreSQL's grammar alone reads {pg_alone} of {pieces} statements (accepted by the server or not)"
        );
        println!(
            "both parsed {both}: same kind {same_kind}, same tables {same_tables}, same written {same_written}; sqlparser lacks a table in {}",
            missing.len()
        );
        for (k, n) in &kinds {
            println!("  kind {k}: {n}");
        }
        assert!(
            missing.is_empty(),
            "tables PostgreSQL's grammar sees and the facts lack:\n{}",
            missing.join("\n")
        );
    }
}
