//! Statements that read what they never name (issue 19), against real
//! servers: the shipped catalogue of functions that run SQL text or read a
//! relation named by an argument is checked against the live servers' own
//! catalogues (PostgreSQL's pg_proc with every contrib extension created,
//! MariaDB's routines and built-in function list), so a function added by
//! a new server version fails here instead of opening a hole; and a hidden
//! query is refused on the wire.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use interceptor_tests::{
    Agent, PgServer, TestCgroup,
    mysql::{APP_PASSWORD, APP_USER, MariaDb, mariadb_in, mysql_policy, start_agent_with},
    pg_policy, run_any,
};
use serde_json::Value;

const CATALOGUE: &str = include_str!("../../interceptor-user/src/sql/hidden_sql.json");

/// Overloads by function name: each overload its input parameters as
/// `(name, type)`.
type Overloads = BTreeMap<String, BTreeSet<Vec<(String, String)>>>;

fn catalogue(dialect: &str, fold: bool) -> Overloads {
    let v: Value = serde_json::from_str(CATALOGUE).unwrap();
    let mut out = Overloads::new();
    for (name, entry) in v[dialect].as_object().unwrap() {
        let name = if fold {
            name.to_lowercase()
        } else {
            name.clone()
        };
        let set = out.entry(name).or_default();
        for ov in entry["overloads"].as_array().unwrap() {
            set.insert(
                ov.as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        (
                            p[0].as_str().unwrap().to_owned(),
                            p[1].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect(),
            );
        }
    }
    out
}

/// The derivation the catalogue's `about` describes: candidate functions
/// (an input argument named like a query, cursor, relation or schema, or
/// typed regclass/refcursor; the xml, dblink, tablefunc, xml2 and
/// pageinspect families by name; internal and C functions with a text
/// argument whose C symbol says query, sql or relname), then every
/// overload of each candidate name with its input parameters.
const PG_CANDIDATES: &str = r"
with f as (
  select p.oid, p.proname, p.prosrc, p.prolang,
         coalesce(p.proallargtypes, array(select unnest(p.proargtypes::oid[]))) as types,
         p.proargmodes as modes, p.proargnames as names
  from pg_proc p
), a as (
  select f.*, i, f.types[i] as t, coalesce(f.modes[i], 'i') as m, coalesce(f.names[i], '') as nm
  from f, generate_subscripts(f.types, 1) as i
), cand as (
  select distinct proname from a
  where (m in ('i', 'b', 'v') and (
           lower(nm) in ('query', 'sqlquery', 'sql', 'cursor', 'tbl', 'relname', 'relation', 'rel',
                         'reloid', 'rel_oid', 'tablename', 'table_name', 'schema', 'schemaname',
                         'schema_name', 'nspname')
           or t in ('regclass'::regtype, 'refcursor'::regtype)))
     or proname ~ '(^(database|schema|table|query|cursor)_to_xml|^(dblink|crosstab|connectby|xpath_table|get_raw_page))'
     or (prolang in (12, 13) and 25 = any(types) and prosrc ~* '((^|_)(query|sql)(_|$)|relname)')
)
select coalesce(json_agg(json_build_array(f.proname,
   coalesce((select json_agg(json_build_array(a.nm, format_type(a.t, null)) order by a.i)
             from a where a.oid = f.oid and a.m in ('i', 'b', 'v')), '[]'::json))), '[]'::json)
from f join cand using (proname)";

fn server_overloads(json: &str, fold: bool) -> Overloads {
    let v: Value = serde_json::from_str(json.trim())
        .unwrap_or_else(|e| panic!("bad JSON from the server ({e}): {json}"));
    let mut out = Overloads::new();
    for row in v.as_array().unwrap() {
        let name = row[0].as_str().unwrap();
        let name = if fold {
            name.to_lowercase()
        } else {
            name.to_owned()
        };
        let params = row[1]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        (
                            p[0].as_str().unwrap_or("").to_owned(),
                            p[1].as_str().unwrap_or("").to_lowercase(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.entry(name).or_default().insert(params);
    }
    out
}

/// Every candidate overload on the server must be in the catalogue.
fn missing(server: &Overloads, shipped: &Overloads) -> Vec<String> {
    let mut out = Vec::new();
    for (name, overloads) in server {
        for ov in overloads {
            if !shipped.get(name).is_some_and(|s| s.contains(ov)) {
                out.push(format!("{name}({ov:?})"));
            }
        }
    }
    out
}

#[test]
fn hidden_sql_catalogue_covers_every_postgres_candidate() {
    let pg = PgServer::start();
    let shipped = catalogue("postgres", false);
    // The stock server first, then with every contrib extension.
    let stock = server_overloads(&pg.sql(PG_CANDIDATES), false);
    assert!(
        stock.contains_key("query_to_xml") && stock.len() >= 35,
        "the candidate query found too little: {stock:?}"
    );
    let gaps = missing(&stock, &shipped);
    assert!(
        gaps.is_empty(),
        "PostgreSQL functions that may run SQL text or read a named relation are missing from interceptor-user/src/sql/hidden_sql.json (review each and add it, with `reads: none` and a reason when it reads no rows):\n{}",
        gaps.join("\n")
    );
    let available = pg.sql("select name from pg_available_extensions order by 1");
    let mut failed = Vec::new();
    for ext in available.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let out = run_any(
            std::process::Command::new(interceptor_tests::pg_bin("psql"))
                .args(pg.psql_args())
                .args([
                    "-Atc",
                    &format!("create extension if not exists \"{ext}\" cascade"),
                ]),
        );
        if !out.status.success() {
            failed.push(format!(
                "{ext}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    // Said, not skipped: an extension that cannot be created here is not
    // checked.
    if !failed.is_empty() {
        eprintln!(
            "extensions not created (not checked):\n{}",
            failed.join("\n")
        );
    }
    let all = server_overloads(&pg.sql(PG_CANDIDATES), false);
    assert!(
        all.contains_key("dblink") && all.contains_key("crosstab"),
        "contrib extensions missing: {failed:?}"
    );
    let gaps = missing(&all, &shipped);
    assert!(
        gaps.is_empty(),
        "PostgreSQL functions (contrib extensions) missing from interceptor-user/src/sql/hidden_sql.json:\n{}",
        gaps.join("\n")
    );
    // And nothing in the catalogue is a name this server does not have
    // (a typo would be a function never caught).
    let v: Value = serde_json::from_str(CATALOGUE).unwrap();
    let created = |ext: Option<&str>| {
        ext.is_none_or(|e| !failed.iter().any(|f| f.starts_with(&format!("{e}:"))))
    };
    let stale: Vec<&String> = shipped
        .keys()
        .filter(|n| {
            !all.contains_key(*n) && created(v["postgres"][n.as_str()]["extension"].as_str())
        })
        .collect();
    assert!(stale.is_empty(), "catalogued but unknown here: {stale:?}");
    eprintln!(
        "PostgreSQL: {} candidate names ({} overloads) stock, {} names ({} overloads) with extensions",
        stock.len(),
        stock.values().map(BTreeSet::len).sum::<usize>(),
        all.len(),
        all.values().map(BTreeSet::len).sum::<usize>()
    );
}

/// Stored routines with an IN parameter named like a query, statement,
/// table, schema, database or identifier.
const MY_ROUTINES: &str = r"
select coalesce(json_arrayagg(json_array(r.routine_name,
  (select coalesce(json_arrayagg(json_array(p.parameter_name, p.data_type)), json_array())
   from information_schema.parameters p
   where p.specific_schema = r.routine_schema and p.specific_name = r.routine_name
     and p.ordinal_position > 0 and p.parameter_mode in ('IN', 'INOUT')))), json_array())
from information_schema.routines r
where exists (select 1 from information_schema.parameters p
  where p.specific_schema = r.routine_schema and p.specific_name = r.routine_name
    and p.ordinal_position > 0 and p.parameter_mode in ('IN', 'INOUT')
    and p.parameter_name regexp '(query|sql|stmt|statement|tbl|table|t_name|schema|db|identifier)')";

/// Built-in functions whose documented syntax takes a table, database,
/// query or statement argument.
const MY_BUILTINS: &str = r"
select t.name from mysql.help_topic t join mysql.help_category c using (help_category_id)
where c.name regexp 'function|operator'
  and t.description regexp '[A-Za-z_]+[(][^)]*(tbl|table|db_name|schema|query|stmt|statement|sql)'
order by 1";

#[test]
fn hidden_sql_catalogue_covers_every_mariadb_candidate() {
    let db = MariaDb::start();
    let shipped = catalogue("mysql", true);
    let routines = server_overloads(&db.sql(MY_ROUTINES), true);
    assert!(
        routines.contains_key("execute_prepared_stmt"),
        "the sys schema's routines were not found: {routines:?}"
    );
    let gaps = missing(&routines, &shipped);
    assert!(
        gaps.is_empty(),
        "MariaDB routines missing from interceptor-user/src/sql/hidden_sql.json:\n{}",
        gaps.join("\n")
    );
    // Built-in functions: none runs a string or takes a table name today;
    // one that does must be catalogued.
    let functions: usize = db
        .sql("select count(*) from mysql.help_topic t join mysql.help_category c using (help_category_id) where c.name regexp 'function|operator'")
        .trim()
        .parse()
        .unwrap();
    assert!(functions > 100, "help tables not loaded: {functions}");
    let builtins = db.sql(MY_BUILTINS);
    let unknown: Vec<&str> = builtins
        .lines()
        .map(str::trim)
        .filter(|n| !n.is_empty() && !shipped.contains_key(&n.to_lowercase()))
        .collect();
    assert!(
        unknown.is_empty(),
        "MariaDB built-in functions taking a table or query, missing from the catalogue: {unknown:?}"
    );
    // The statements that run text (handled in sql/analyze.rs) are the
    // ones this server documents.
    let statements = db
        .sql("select name from mysql.help_topic where name regexp '^(PREPARE|EXECUTE)' order by 1");
    assert!(
        statements.contains("EXECUTE IMMEDIATE") && statements.contains("PREPARE"),
        "{statements}"
    );
}

const REPORTING: &str = "mode: enforce\ndefault: deny\non_parse_error: deny\nrules:\n  - name: reporting-reads\n    kinds: [select]\n    tables: [public.orders, public.customers, shop.items]\n    decision: allow\n  - name: sessions\n    kinds: [tcl, session]\n    decision: allow\n";

#[test]
fn hidden_sql_psql_gets_42501_for_a_query_in_a_string() {
    let pg = PgServer::start();
    pg.sql(
        "CREATE TABLE orders (id int, note text); INSERT INTO orders VALUES (1, 'first-order');
         CREATE TABLE payroll (name text, salary int); INSERT INTO payroll VALUES ('alice', 987654)",
    );
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, REPORTING), &cg, false);
    let psql = |sql: &str| {
        let out = run_any(
            pg.psql_in(&cg)
                .args(["-At", "-v", "VERBOSITY=verbose", "-c", sql]),
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The issue's statement: refused, nothing of payroll read.
    let (out, err) = psql("select query_to_xml('select * from payroll',true,true,'')");
    assert!(
        err.contains("ERROR:  42501"),
        "stdout: {out}\nstderr: {err}"
    );
    assert!(!out.contains("987654"), "{out}");
    // Whole schema, and a query text that is not a literal.
    for sql in [
        "select schema_to_xml('public', true, true, '')",
        "select query_to_xml(current_setting('application_name'), true, true, '')",
        "select table_to_xml('payroll', true, true, '')",
    ] {
        let (out, err) = psql(sql);
        assert!(
            err.contains("ERROR:  42501"),
            "{sql}\nstdout: {out}\nstderr: {err}"
        );
        assert!(!out.contains("987654"), "{out}");
    }
    // The same function over an allowed table runs, and so does TABLE.
    let (out, err) = psql("select query_to_xml('select * from orders', true, true, '')");
    assert!(out.contains("first-order"), "stdout: {out}\nstderr: {err}");
    let (out, err) = psql("TABLE orders");
    assert!(out.contains("first-order"), "stdout: {out}\nstderr: {err}");
    assert_eq!(
        pg.sql("select seq_scan + coalesce(idx_scan, 0) from pg_stat_user_tables where relname = 'payroll'")
            .trim(),
        "0"
    );
    // Audited: the hidden table is in the record, and the flag.
    let ev = agent.wait_event("the denied query_to_xml", |e| {
        e["event"] == "query"
            && e["query"]
                .as_str()
                .is_some_and(|q| q.contains("from payroll',"))
    });
    assert_eq!(ev["decision"], "deny", "{ev}");
    assert_eq!(ev["tables"], serde_json::json!(["public.payroll"]), "{ev}");
    let ev = agent.wait_event("the denied schema_to_xml", |e| {
        e["event"] == "query"
            && e["query"]
                .as_str()
                .is_some_and(|q| q.contains("schema_to_xml"))
    });
    assert_eq!(ev["decision"], "deny", "{ev}");
    assert_eq!(ev["flags"], serde_json::json!(["dynamic_sql"]), "{ev}");
}

#[test]
fn hidden_sql_mariadb_gets_1142_for_execute_immediate() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let agent = start_agent_with(&mysql_policy(db.port, REPORTING), &cg, &[]);
    let args = db.client_args(APP_USER, APP_PASSWORD, "shop");
    let out = mariadb_in(
        &cg,
        &args,
        "EXECUTE IMMEDIATE 'SELECT name FROM items WHERE id = 1'",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("apple"), "{out:?}");
    for sql in [
        "EXECUTE IMMEDIATE 'SELECT secret FROM secrets'",
        "EXECUTE IMMEDIATE CONCAT('SELECT secret FROM ', 'secrets')",
        "SET @q = 'SELECT secret FROM secrets'; PREPARE s FROM @q; EXECUTE s",
    ] {
        let out = mariadb_in(&cg, &args, sql);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stderr.contains("ERROR 1142 (42000)"), "{sql}: {out:?}");
        assert!(!stdout.contains("hunter2"), "{sql}: {stdout}");
    }
    let ev = agent.wait_event("the dynamic EXECUTE IMMEDIATE", |e| {
        e["event"] == "query" && e["query"].as_str().is_some_and(|q| q.contains("CONCAT"))
    });
    assert_eq!(ev["decision"], "deny", "{ev}");
    assert_eq!(ev["flags"], serde_json::json!(["dynamic_sql"]), "{ev}");
}
