//! Object names: case folding per dialect, and resolution of unqualified
//! table names against the session's schemas (PostgreSQL) or current
//! database (MySQL).

use std::sync::Arc;

use serde::Serialize;

use super::{Dialect, FlagSet, Kind, analyze::Analysis, hidden::Role};

/// One part of a name as written, already case-folded: PostgreSQL folds
/// unquoted identifiers to lower case and keeps quoted ones; MySQL names
/// compare case-insensitively, so both are lower-cased.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NamePart(pub String);

/// A (possibly qualified) object name as written.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct RawName(pub Vec<NamePart>);

impl RawName {
    pub(crate) fn from_ident_parts<'a>(
        parts: impl Iterator<Item = (&'a str, bool)>,
        dialect: Dialect,
    ) -> Self {
        Self(
            parts
                .map(|(v, quoted)| NamePart(fold(v, quoted, dialect)))
                .collect(),
        )
    }

    pub(crate) fn last(&self) -> &str {
        self.0.last().map_or("", |p| p.0.as_str())
    }
}

pub(crate) fn fold(v: &str, quoted: bool, dialect: Dialect) -> String {
    match (dialect, quoted) {
        (Dialect::Postgres, true) => v.to_owned(),
        _ => v.to_lowercase(),
    }
}

/// Renders one part; parts holding a dot or a double quote are quoted so a
/// crafted name cannot pass for another schema in a glob.
fn push_part(out: &mut String, part: &str) {
    if part.contains(['.', '"']) {
        out.push('"');
        out.push_str(&part.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(part);
    }
}

fn join(parts: &[&str]) -> String {
    let mut s = String::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        push_part(&mut s, p);
    }
    s
}

/// Where unqualified names point.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Resolution {
    pub dialect: Dialect,
    /// PostgreSQL: the schemas an unqualified table may live in (the
    /// effective search path, `pg_catalog` aside). MySQL: the current
    /// database, if any.
    pub schemas: Vec<String>,
    /// The search path was changed in a way we could not follow: an
    /// unqualified name resolves to `?.name`, which no ordinary glob allows.
    pub unknown: bool,
}

impl Resolution {
    /// Every name an object reference may denote.
    pub(crate) fn resolve(&self, name: &RawName, out: &mut Vec<String>) {
        let parts: Vec<&str> = name.0.iter().map(|p| p.0.as_str()).collect();
        match (self.dialect, parts.as_slice()) {
            (_, []) => {}
            (Dialect::Postgres, [t]) => {
                // pg_catalog is searched first whatever the search path:
                // `pg_class` is pg_catalog.pg_class.
                if t.starts_with("pg_") {
                    out.push(join(&["pg_catalog", t]));
                }
                if self.unknown {
                    out.push(join(&["?", t]));
                }
                for s in &self.schemas {
                    out.push(join(&[s, t]));
                }
            }
            // catalog.schema.table: the catalog can only be the current one.
            (Dialect::Postgres, [_, s, t]) => out.push(join(&[s, t])),
            (Dialect::Mysql, [t]) => match self.schemas.first() {
                Some(db) if !self.unknown => out.push(join(&[db, t])),
                _ => out.push(join(&[t])),
            },
            (_, p) => out.push(join(p)),
        }
    }
}

/// What the policy sees of one statement: its analysis with names
/// resolved in the session's context.
#[derive(Clone, Debug, Serialize)]
pub struct StatementFacts {
    pub kind: Kind,
    /// Every table read or written, resolved, sorted; shared with the
    /// verdicts and audit records of this shape.
    pub tables: Arc<[String]>,
    /// The tables written (a subset of `tables`).
    pub tables_written: Vec<String>,
    pub functions: Vec<String>,
    pub flags: FlagSet,
    /// Whether every UPDATE/DELETE in it has a WHERE (`None`: none in it).
    #[serde(rename = "where")]
    pub has_where: Option<bool>,
    /// The LIMIT is a plain literal (its value is read per statement).
    #[serde(skip)]
    pub limit_literal: bool,
    pub unparsed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parse_error: Option<String>,
    /// Creates or runs procedural code (functions, DO blocks, triggers).
    pub procedural: bool,
    /// Some table it reads is unknown (SQL built at run time, a relation
    /// named by a value, whole schemas): `tables` is only what is known,
    /// and a rule's `tables` never allows it.
    pub tables_unknown: bool,
    /// SQL it runs without naming it, and what that reads.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<HiddenFacts>,
}

/// What one piece of hidden SQL reads, resolved like the statement's own
/// names.
#[derive(Clone, Debug, Serialize)]
pub struct HiddenFacts {
    /// The function (or `execute immediate`, `prepare from`) that runs it.
    pub function: String,
    /// What its argument is: `sql`, `relation`, `written`, `cursor`,
    /// `fragment`, `schema`, `database`.
    pub argument: Role,
    /// The literal SQL text or relation name (cut at 1000 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    pub tables: Vec<String>,
    pub functions: Vec<String>,
    pub flags: FlagSet,
    /// Why what it reads is unknown (the statement is `dynamic_sql`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic: Option<String>,
}

impl Analysis {
    /// Resolves table names in a session's context.
    #[must_use]
    pub fn resolve(&self, ctx: &Resolution) -> StatementFacts {
        let mut tables = Vec::new();
        let mut written = Vec::new();
        let mut buf = Vec::new();
        for (name, w) in &self.tables {
            buf.clear();
            ctx.resolve(name, &mut buf);
            if *w {
                written.extend(buf.iter().cloned());
            }
            tables.append(&mut buf);
        }
        tables.sort();
        tables.dedup();
        written.sort();
        written.dedup();
        let hidden = self
            .hidden
            .iter()
            .map(|h| {
                let mut tables = Vec::new();
                for (name, _) in &h.tables {
                    ctx.resolve(name, &mut tables);
                }
                tables.sort();
                tables.dedup();
                HiddenFacts {
                    function: h.carrier.clone(),
                    argument: h.role,
                    text: h.text.clone(),
                    kind: h.kind,
                    tables,
                    functions: h.functions.clone(),
                    flags: h.flags,
                    dynamic: h.unknown.clone(),
                }
            })
            .collect();
        StatementFacts {
            kind: self.kind,
            tables: tables.into(),
            tables_written: written,
            functions: self.functions.clone(),
            flags: self.flags,
            has_where: self.has_where,
            limit_literal: self.limit_literal,
            unparsed: self.unparsed.is_some(),
            parse_error: self.unparsed.clone(),
            procedural: self.procedural,
            tables_unknown: self.tables_unknown,
            hidden,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(parts: &[(&str, bool)], d: Dialect) -> RawName {
        RawName::from_ident_parts(parts.iter().copied(), d)
    }

    #[test]
    fn resolves_per_dialect() {
        let pg = Resolution {
            dialect: Dialect::Postgres,
            schemas: vec!["public".into()],
            unknown: false,
        };
        let mut out = Vec::new();
        pg.resolve(&raw(&[("Orders", false)], Dialect::Postgres), &mut out);
        pg.resolve(&raw(&[("Orders", true)], Dialect::Postgres), &mut out);
        pg.resolve(&raw(&[("pg_class", false)], Dialect::Postgres), &mut out);
        pg.resolve(
            &raw(&[("a.b", true), ("t", false)], Dialect::Postgres),
            &mut out,
        );
        assert_eq!(
            out,
            [
                "public.orders",
                "public.Orders",
                "pg_catalog.pg_class",
                "public.pg_class",
                "\"a.b\".t"
            ]
        );
        let my = Resolution {
            dialect: Dialect::Mysql,
            schemas: vec!["shop".into()],
            unknown: false,
        };
        out.clear();
        my.resolve(&raw(&[("Orders", true)], Dialect::Mysql), &mut out);
        my.resolve(
            &raw(&[("Other", false), ("T", false)], Dialect::Mysql),
            &mut out,
        );
        assert_eq!(out, ["shop.orders", "other.t"]);
    }
}
