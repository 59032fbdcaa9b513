//! Statements that read what they never name: functions that run SQL text
//! or read a relation, schema or database named by an argument.
//!
//! The functions come from a catalogue shipped as data (`hidden_sql.json`),
//! derived from the servers' own catalogues (its `about` says how, and the
//! end-to-end test `hidden_sql` re-runs the derivation against live servers
//! so that a new function fails a test instead of opening a hole). Parsed
//! once, on first use.
//!
//! What the analyser does with a call (see `analyze.rs`): a literal SQL
//! argument is analysed as part of the statement; a literal relation name
//! counts as a table touched; anything else (a column, a parameter, an
//! expression, a whole schema or database, a cursor, pasted fragments)
//! makes the statement [`super::Flag::DynamicSql`] with its tables unknown.

use std::{collections::HashMap, sync::LazyLock};

use serde::{Deserialize, Deserializer, Serialize};

use super::{
    Dialect,
    names::{NamePart, RawName},
};

/// The catalogue as shipped.
pub const CATALOGUE_JSON: &str = include_str!("hidden_sql.json");

/// What a catalogued function reads, as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reads {
    /// An argument is SQL text it runs.
    Sql,
    /// An argument names a relation whose rows it reads (or changes).
    Relation,
    /// Rows of a cursor, whose query the statement does not name.
    Cursor,
    /// Arguments pasted into SQL text it builds and runs.
    Fragment,
    /// Every table of a schema.
    Schema,
    /// Every table of the database.
    Database,
    /// Reviewed: reads no rows (the entry's `why` says why).
    None,
}

impl Reads {
    /// The argument role that stands for the whole function's reading.
    #[must_use]
    pub fn role(self) -> Role {
        match self {
            Self::Relation => Role::Relation,
            Self::Cursor => Role::Cursor,
            Self::Fragment => Role::Fragment,
            Self::Schema => Role::Schema,
            Self::Database => Role::Database,
            Self::Sql | Self::None => Role::Sql,
        }
    }
}

/// What one argument of a catalogued function is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// SQL text, run.
    Sql,
    /// A relation's name, read.
    Relation,
    /// A relation's name, changed.
    Written,
    /// A cursor's name.
    Cursor,
    /// Pasted into SQL text.
    Fragment,
    /// A schema's name (every table in it is read).
    Schema,
    /// A database's name (every table in it is read).
    Database,
}

impl Role {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sql => "sql",
            Self::Relation => "relation",
            Self::Written => "written",
            Self::Cursor => "cursor",
            Self::Fragment => "fragment",
            Self::Schema => "schema",
            Self::Database => "database",
        }
    }
}

/// One input parameter of an overload: `[name, type]` or `[name, type,
/// role]` in the file (`name` is empty when the server has none).
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub ty: String,
    pub role: Option<Role>,
}

impl<'de> Deserialize<'de> for Param {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: Vec<String> = Vec::deserialize(d)?;
        let role = match v.get(2) {
            None => None,
            Some(r) => Some(
                serde_json::from_value(serde_json::Value::String(r.clone()))
                    .map_err(serde::de::Error::custom)?,
            ),
        };
        match v.as_slice() {
            [name, ty] | [name, ty, _] => Ok(Self {
                name: name.clone(),
                ty: ty.clone(),
                role,
            }),
            _ => Err(serde::de::Error::custom(
                "a parameter is [name, type] or [name, type, role]",
            )),
        }
    }
}

/// One catalogued function (all its overloads).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Where the server keeps it (informational: calls match on the name
    /// alone, whatever schema they qualify it with).
    pub schema: String,
    /// The extension that creates it, if any.
    #[serde(default)]
    pub extension: Option<String>,
    pub reads: Reads,
    pub why: String,
    /// Input parameters of each overload.
    pub overloads: Vec<Vec<Param>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueFile {
    pub about: Vec<String>,
    pub postgres: HashMap<String, Entry>,
    pub mysql: HashMap<String, Entry>,
}

/// The catalogue, indexed for the analyser and the lexer.
struct Catalogue {
    postgres: HashMap<String, Entry>,
    /// Keys lower-cased: MySQL routine names compare case-insensitively.
    mysql: HashMap<String, Entry>,
    /// Per dialect and lower-cased first byte, a bit per name length (< 64)
    /// of the functions that read something: a cheap test for the lexer,
    /// which looks at every word of every statement.
    quick: [[u64; 256]; 2],
}

fn dialect_index(d: Dialect) -> usize {
    match d {
        Dialect::Postgres => 0,
        Dialect::Mysql => 1,
    }
}

static CATALOGUE: LazyLock<Catalogue> = LazyLock::new(|| {
    // Embedded at build time and checked by a unit test: it cannot fail
    // at run time unless the binary was built from a broken tree.
    let file: CatalogueFile = match serde_json::from_str(CATALOGUE_JSON) {
        Ok(f) => f,
        Err(e) => panic!("embedded hidden_sql.json is invalid: {e}"),
    };
    let mut quick = [[0u64; 256]; 2];
    let mut index = |d: Dialect, m: &HashMap<String, Entry>| {
        for (name, e) in m {
            if e.reads == Reads::None {
                continue;
            }
            let b = name.as_bytes();
            if let Some(&first) = b.first()
                && b.len() < 64
            {
                quick[dialect_index(d)][usize::from(first.to_ascii_lowercase())] |= 1 << b.len();
            }
        }
    };
    index(Dialect::Postgres, &file.postgres);
    index(Dialect::Mysql, &file.mysql);
    Catalogue {
        postgres: file.postgres,
        mysql: file
            .mysql
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect(),
        quick,
    }
});

/// The catalogue entry of a function that reads something, by its
/// (case-folded, unqualified) name.
#[must_use]
pub fn lookup(dialect: Dialect, name: &str) -> Option<&'static Entry> {
    let c = &*CATALOGUE;
    let e = match dialect {
        Dialect::Postgres => c.postgres.get(name),
        Dialect::Mysql => c.mysql.get(&name.to_lowercase()),
    }?;
    (e.reads != Reads::None).then_some(e)
}

/// Whether a word (or quoted identifier, with its quotes) of a statement
/// may name a catalogued function that reads something: the normaliser
/// then keeps the statement's literals, since they are what it runs.
/// Errs on the side of yes.
pub(crate) fn may_name_reader(raw: &[u8], quoted: bool, dialect: Dialect) -> bool {
    let word = if quoted {
        // PostgreSQL U&"..." may spell the name with escapes: keep.
        if raw.first().is_some_and(|b| b.eq_ignore_ascii_case(&b'u')) {
            return true;
        }
        match raw.get(1..raw.len().saturating_sub(1)) {
            Some(w) => w,
            None => return false,
        }
    } else {
        raw
    };
    let (Some(&first), true) = (word.first(), word.len() < 64) else {
        return false;
    };
    let c = &*CATALOGUE;
    if c.quick[dialect_index(dialect)][usize::from(first.to_ascii_lowercase())] & (1 << word.len())
        == 0
    {
        return false;
    }
    // Lower-cased on the stack: this runs for words like `delete` that
    // share a first letter and length with a catalogued name.
    let mut buf = [0u8; 64];
    let lower = &mut buf[..word.len()];
    lower.copy_from_slice(word);
    lower.make_ascii_lowercase();
    let Ok(s) = std::str::from_utf8(lower) else {
        return true;
    };
    match dialect {
        Dialect::Postgres => c.postgres.get(s),
        Dialect::Mysql => c.mysql.get(s),
    }
    .is_some_and(|e| e.reads != Reads::None)
}

/// What a call of `name` reads when its arguments are not seen (a
/// PostgreSQL `FunctionCall` message passes them as values): unknown, for
/// a catalogued function that reads something.
#[must_use]
pub fn opaque_call(dialect: Dialect, name: &str) -> Option<super::HiddenFacts> {
    let e = lookup(dialect, name)?;
    Some(super::HiddenFacts {
        function: name.to_owned(),
        argument: e.reads.role(),
        text: None,
        kind: None,
        tables: Vec::new(),
        functions: Vec::new(),
        flags: super::FlagSet::default(),
        dynamic: Some("called with arguments the agent does not read".into()),
    })
}

/// Every catalogued name of a dialect with its entry (for tests and
/// documentation).
#[must_use]
pub fn entries(dialect: Dialect) -> Vec<(&'static str, &'static Entry)> {
    let c = &*CATALOGUE;
    let m = match dialect {
        Dialect::Postgres => &c.postgres,
        Dialect::Mysql => &c.mysql,
    };
    let mut v: Vec<_> = m.iter().map(|(k, e)| (k.as_str(), e)).collect();
    v.sort_by_key(|(k, _)| *k);
    v
}

/// A relation named by a string, read the way the server reads it
/// (PostgreSQL `regclass` input: dot-separated parts, double-quoted parts
/// kept as written, others folded to lower case; MySQL: backquotes, case
/// folded). `None` when it is no plain name (an OID, an empty part, a
/// stray quote): the caller then treats the relation as unknown.
#[must_use]
pub fn relation_name(text: &str, dialect: Dialect) -> Option<RawName> {
    let quote = match dialect {
        Dialect::Postgres => '"',
        Dialect::Mysql => '`',
    };
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut part = String::new();
        let quoted = chars.peek() == Some(&quote);
        if quoted {
            chars.next();
            loop {
                match chars.next() {
                    Some(c) if c == quote => {
                        if chars.peek() == Some(&quote) {
                            chars.next();
                            part.push(quote);
                        } else {
                            break;
                        }
                    }
                    Some(c) => part.push(c),
                    None => return None,
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' || c.is_whitespace() {
                    break;
                }
                if c == quote || c == '"' || c == '`' || c == '\'' {
                    return None;
                }
                part.push(c);
                chars.next();
            }
            if part.is_empty() || part.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
        }
        if part.is_empty() {
            return None;
        }
        let folded = match dialect {
            Dialect::Postgres if quoted => part,
            _ => part.to_lowercase(),
        };
        parts.push(NamePart(folded));
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => break,
            Some('.') => {}
            Some(_) => return None,
        }
    }
    (!parts.is_empty() && parts.len() <= 3).then_some(RawName(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_parses_and_every_reader_has_a_role_or_reads_whole() {
        let file: CatalogueFile = serde_json::from_str(CATALOGUE_JSON).unwrap();
        assert!(!file.about.is_empty());
        for (d, m) in [
            (Dialect::Postgres, &file.postgres),
            (Dialect::Mysql, &file.mysql),
        ] {
            assert!(!m.is_empty());
            for (name, e) in m {
                assert!(!e.overloads.is_empty(), "{name}");
                assert!(!e.why.is_empty(), "{name}");
                let roles: Vec<Role> = e
                    .overloads
                    .iter()
                    .flatten()
                    .filter_map(|p| p.role)
                    .collect();
                match e.reads {
                    Reads::None => assert!(roles.is_empty(), "{name}: reads none but has roles"),
                    Reads::Sql | Reads::Relation => {
                        assert!(!roles.is_empty(), "{name}: no argument carries it");
                    }
                    _ => {}
                }
                if e.reads != Reads::None {
                    assert!(lookup(d, name).is_some(), "{name}");
                    assert!(may_name_reader(name.as_bytes(), false, d), "{name}");
                    assert!(
                        may_name_reader(name.to_uppercase().as_bytes(), false, d),
                        "{name}"
                    );
                } else {
                    assert!(lookup(d, name).is_none(), "{name}");
                }
            }
        }
        for w in ["select", "from", "count", "orders", "where", "nextval", "x"] {
            assert!(
                !may_name_reader(w.as_bytes(), false, Dialect::Postgres),
                "{w}"
            );
        }
        assert!(may_name_reader(
            b"\"query_to_xml\"",
            true,
            Dialect::Postgres
        ));
        assert!(may_name_reader(
            b"`EXECUTE_PREPARED_STMT`",
            true,
            Dialect::Mysql
        ));
        assert!(may_name_reader(b"U&\"q\"", true, Dialect::Postgres));
    }

    #[test]
    fn relation_names_read_as_the_server_reads_them() {
        let pg = Dialect::Postgres;
        let parts = |s: &str, d| {
            relation_name(s, d).map(|r| r.0.into_iter().map(|p| p.0).collect::<Vec<_>>())
        };
        assert_eq!(parts("payroll", pg), Some(vec!["payroll".to_owned()]));
        assert_eq!(
            parts(" Public . PayRoll ", pg),
            Some(vec!["public".to_owned(), "payroll".to_owned()])
        );
        assert_eq!(parts("\"Pay.Roll\"", pg), Some(vec!["Pay.Roll".to_owned()]));
        assert_eq!(
            parts("\"a\"\"b\".c", pg),
            Some(vec!["a\"b".to_owned(), "c".to_owned()])
        );
        assert_eq!(parts("16384", pg), None);
        assert_eq!(parts("", pg), None);
        assert_eq!(parts("a..b", pg), None);
        assert_eq!(parts("a b", pg), None);
        assert_eq!(parts("\"open", pg), None);
        assert_eq!(
            parts("`Shop`.Orders", Dialect::Mysql),
            Some(vec!["shop".to_owned(), "orders".to_owned()])
        );
    }
}
