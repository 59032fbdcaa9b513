//! Table-driven facts for tricky statements, and property tests that no
//! input makes the splitter, the normaliser or the analyser panic.

use proptest::prelude::*;

use super::*;

fn ctx(d: Dialect) -> Resolution {
    Resolution {
        dialect: d,
        schemas: vec![match d {
            Dialect::Postgres => "public".into(),
            Dialect::Mysql => "shop".into(),
        }],
        unknown: false,
    }
}

/// Facts of every statement of a message.
pub(crate) fn facts(sql: &str, d: Dialect) -> Vec<(StatementFacts, Effect, NormInfo)> {
    let mut out = Vec::new();
    let mut scratch = Scratch::default();
    for span in split(sql, d) {
        let mut canon = String::new();
        let info = normalize(
            span.text(sql),
            span.mode,
            span.in_exec_comment,
            &mut canon,
            &mut scratch,
        );
        let a = analyze(&canon, &info, d, &Limits::default());
        out.push((a.resolve(&ctx(d)), a.effect.clone(), info));
    }
    out
}

struct Case {
    sql: &'static str,
    dialect: Dialect,
    /// Per statement: kind, tables, flags (as text).
    want: &'static [(Kind, &'static [&'static str], &'static [Flag])],
}

const PG: Dialect = Dialect::Postgres;
const MY: Dialect = Dialect::Mysql;

#[rustfmt::skip]
const CASES: &[Case] = &[
    // Plain reads and writes, schema resolution, case folding.
    Case { sql: "SELECT abalance FROM pgbench_accounts WHERE aid = 12345", dialect: PG,
        want: &[(Kind::Select, &["public.pgbench_accounts"], &[])] },
    Case { sql: "select * from Sales.\"Orders\" o join customers c on c.id = o.cid", dialect: PG,
        want: &[(Kind::Select, &["public.customers", "sales.Orders"], &[])] },
    Case { sql: "SELECT * FROM `Shop`.`Orders`, Items", dialect: MY,
        want: &[(Kind::Select, &["shop.items", "shop.orders"], &[])] },
    Case { sql: "select * from mydb.public.t", dialect: PG,
        want: &[(Kind::Select, &["public.t"], &[])] },
    // Multi-statement, and statements hidden in comments.
    Case { sql: "select 1; delete from t where id = 1", dialect: PG,
        want: &[(Kind::Select, &[], &[]), (Kind::Delete, &["public.t"], &[])] },
    Case { sql: "select 1 /* ; drop table t */ -- ; truncate t\n", dialect: PG,
        want: &[(Kind::Select, &[], &[])] },
    Case { sql: "select 1 /*!50000 ; drop table t */", dialect: MY,
        want: &[(Kind::Select, &[], &[]), (Kind::Ddl, &["shop.t"], &[])] },
    Case { sql: "select 1 # ; drop table t\n", dialect: MY,
        want: &[(Kind::Select, &[], &[])] },
    Case { sql: "select $$ ; drop table t $$", dialect: PG,
        want: &[(Kind::Select, &[], &[])] },
    // DML inside CTEs; CTE names are not tables; scoping.
    Case { sql: "with d as (delete from orders where id = 1 returning *) select * from d", dialect: PG,
        want: &[(Kind::Delete, &["public.orders"], &[])] },
    Case { sql: "with recent as (select * from orders) select * from recent join items using (id)", dialect: PG,
        want: &[(Kind::Select, &["public.items", "public.orders"], &[])] },
    Case { sql: "with secret as (select * from secret) select * from secret", dialect: PG,
        want: &[(Kind::Select, &["public.secret"], &[])] },
    Case { sql: "select * from (with x as (select 1) select * from x) s, x", dialect: PG,
        want: &[(Kind::Select, &["public.x"], &[])] },
    Case { sql: "with recursive r(n) as (select 1 union all select n + 1 from r) select * from r", dialect: PG,
        want: &[(Kind::Select, &[], &[])] },
    Case { sql: "select * from a union select * from b except select * from (select * from c) z", dialect: PG,
        want: &[(Kind::Select, &["public.a", "public.b", "public.c"], &[])] },
    Case { sql: "select * from t where id in (select id from u where exists (select 1 from v))", dialect: PG,
        want: &[(Kind::Select, &["public.t", "public.u", "public.v"], &[])] },
    // Writes.
    Case { sql: "insert into t (a) select a from u", dialect: PG,
        want: &[(Kind::Insert, &["public.t", "public.u"], &[])] },
    Case { sql: "insert into t values (1) on conflict (a) do update set b = 2", dialect: PG,
        want: &[(Kind::Update, &["public.t"], &[])] },
    Case { sql: "replace into t values (1)", dialect: MY,
        want: &[(Kind::Delete, &["shop.t"], &[])] },
    Case { sql: "update t set a = 1 from u where t.id = u.id", dialect: PG,
        want: &[(Kind::Update, &["public.t", "public.u"], &[])] },
    Case { sql: "delete t1 from t1 join t2 on t1.a = t2.a", dialect: MY,
        want: &[(Kind::Delete, &["shop.t1", "shop.t2"], &[])] },
    Case { sql: "merge into t using s on t.id = s.id when matched then delete", dialect: PG,
        want: &[(Kind::Merge, &["public.s", "public.t"], &[])] },
    Case { sql: "truncate table a, b", dialect: PG,
        want: &[(Kind::Truncate, &["public.a", "public.b"], &[])] },
    Case { sql: "select * into newt from t", dialect: PG,
        want: &[(Kind::Ddl, &["public.newt", "public.t"], &[])] },
    // DDL, DCL, TCL, session.
    Case { sql: "create table ci.t (a int)", dialect: PG,
        want: &[(Kind::Ddl, &["ci.t"], &[])] },
    Case { sql: "alter table t add column b int", dialect: PG,
        want: &[(Kind::Ddl, &["public.t"], &[])] },
    Case { sql: "drop table if exists a, b", dialect: PG,
        want: &[(Kind::Ddl, &["public.a", "public.b"], &[])] },
    // The table granted on is named (by PostgreSQL's grammar).
    Case { sql: "create table t (a int) data directory = '/var/tmp/d'", dialect: MY,
        want: &[(Kind::Ddl, &["shop.t"], &[Flag::FileAccess])] },
    Case { sql: "grant select on t to bob", dialect: PG,
        want: &[(Kind::Dcl, &["public.t"], &[])] },
    Case { sql: "create role r", dialect: PG, want: &[(Kind::Dcl, &[], &[])] },
    Case { sql: "begin; commit", dialect: PG,
        want: &[(Kind::Tcl, &[], &[]), (Kind::Tcl, &[], &[])] },
    Case { sql: "set application_name = 'x'", dialect: PG, want: &[(Kind::Session, &[], &[])] },
    Case { sql: "set search_path = other, public", dialect: PG,
        want: &[(Kind::Session, &[], &[Flag::SessionChange])] },
    Case { sql: "SET NAMES utf8mb4", dialect: MY, want: &[(Kind::Session, &[], &[])] },
    Case { sql: "SET @x = (SELECT password FROM mysql.user)", dialect: MY,
        want: &[(Kind::Select, &["mysql.user"], &[])] },
    Case { sql: "use other", dialect: MY, want: &[(Kind::Session, &[], &[Flag::SessionChange])] },
    Case { sql: "discard all", dialect: PG, want: &[(Kind::Session, &[], &[])] },
    // Side-effect functions and dangerous flags.
    Case { sql: "select pg_read_file('/etc/passwd')", dialect: PG,
        want: &[(Kind::Select, &[], &[Flag::FileAccess])] },
    Case { sql: "select \"pg_read_file\"('/etc/passwd')", dialect: PG,
        want: &[(Kind::Select, &[], &[Flag::FileAccess])] },
    Case { sql: "select pg_catalog.pg_terminate_backend(123)", dialect: PG,
        want: &[(Kind::Select, &[], &[Flag::Admin])] },
    Case { sql: "select * from dblink('host=x', 'select 1') as t(a int)", dialect: PG,
        want: &[(Kind::Select, &[], &[Flag::RemoteAccess])] },
    Case { sql: "select set_config('role', 'admin', false)", dialect: PG,
        want: &[(Kind::Select, &[], &[Flag::RoleChange, Flag::SessionChange])] },
    Case { sql: "select set_config('search_path', 'evil', false)", dialect: PG,
        want: &[(Kind::Select, &[], &[Flag::SessionChange])] },
    Case { sql: "copy t to program 'curl x'", dialect: PG,
        want: &[(Kind::Copy, &["public.t"], &[Flag::ProgramExec])] },
    Case { sql: "copy t from '/tmp/x'", dialect: PG,
        want: &[(Kind::Copy, &["public.t"], &[Flag::FileAccess])] },
    Case { sql: "copy t from stdin", dialect: PG, want: &[(Kind::Copy, &["public.t"], &[])] },
    Case { sql: "set role admin", dialect: PG, want: &[(Kind::Session, &[], &[Flag::RoleChange])] },
    Case { sql: "SET SESSION AUTHORIZATION bob", dialect: PG,
        want: &[(Kind::Session, &[], &[Flag::RoleChange])] },
    Case { sql: "alter system set work_mem = '1GB'", dialect: PG,
        want: &[(Kind::Ddl, &[], &[Flag::Admin])] },
    Case { sql: "select * from t for update", dialect: PG,
        want: &[(Kind::Select, &["public.t"], &[Flag::Lock])] },
    Case { sql: "SELECT * FROM t LOCK IN SHARE MODE", dialect: MY,
        want: &[(Kind::Select, &["shop.t"], &[Flag::Lock])] },
    Case { sql: "SELECT * FROM t INTO OUTFILE '/tmp/x'", dialect: MY,
        want: &[(Kind::Select, &["shop.t"], &[Flag::FileAccess])] },
    Case { sql: "SELECT LOAD_FILE('/etc/passwd')", dialect: MY,
        want: &[(Kind::Select, &[], &[Flag::FileAccess])] },
    Case { sql: "LOAD DATA LOCAL INFILE '/tmp/x' INTO TABLE t", dialect: MY,
        want: &[(Kind::Insert, &["shop.t"], &[Flag::FileAccess])] },
    Case { sql: "KILL 42", dialect: MY, want: &[(Kind::Other, &[], &[Flag::Admin])] },
    Case { sql: "SET GLOBAL max_connections = 10", dialect: MY,
        want: &[(Kind::Session, &[], &[Flag::SessionChange, Flag::Admin])] },
    Case { sql: "CREATE TABLE f (a int) ENGINE=FEDERATED CONNECTION='mysql://x/db/t'", dialect: MY,
        want: &[(Kind::Ddl, &["shop.f"], &[Flag::RemoteAccess])] },
    // Explain, cursors, prepared statements.
    Case { sql: "explain select * from t", dialect: PG, want: &[(Kind::Explain, &["public.t"], &[])] },
    Case { sql: "explain analyze delete from t", dialect: PG, want: &[(Kind::Delete, &["public.t"], &[])] },
    Case { sql: "explain (analyze, buffers) delete from t", dialect: PG, want: &[(Kind::Delete, &["public.t"], &[])] },
    Case { sql: "declare c cursor for select * from t", dialect: PG, want: &[(Kind::Select, &["public.t"], &[])] },
    Case { sql: "fetch 10 from c; move next in c; close c", dialect: PG,
        want: &[(Kind::Select, &[], &[]), (Kind::Select, &[], &[]), (Kind::Select, &[], &[])] },
    Case { sql: "prepare p (int) as delete from t where id = $1", dialect: PG,
        want: &[(Kind::Delete, &["public.t"], &[])] },
    Case { sql: "PREPARE s FROM 'DELETE FROM t'", dialect: MY, want: &[(Kind::Delete, &["shop.t"], &[])] },
    Case { sql: "deallocate p", dialect: PG, want: &[(Kind::Session, &[], &[])] },
    Case { sql: "call do_things(1)", dialect: PG, want: &[(Kind::Call, &[], &[])] },
    Case { sql: "do $$ begin perform 1; end $$", dialect: PG, want: &[(Kind::Call, &[], &[])] },
    // Quoting traps.
    Case { sql: "select 'it''s; fine' from \"weird;name\"", dialect: PG,
        want: &[(Kind::Select, &["public.weird;name"], &[])] },
    Case { sql: "select E'\\'; drop table t; --'", dialect: PG,
        want: &[(Kind::Select, &[], &[])] },
    Case { sql: "select * from \"a.b\".c", dialect: PG, want: &[(Kind::Select, &["\"a.b\".c"], &[])] },
    Case { sql: "select * from pg_class", dialect: PG,
        want: &[(Kind::Select, &["pg_catalog.pg_class", "public.pg_class"], &[])] },
];

#[test]
fn table_of_tricky_statements() {
    let mut failures = Vec::new();
    for case in CASES {
        let got = facts(case.sql, case.dialect);
        let got_short: Vec<(Kind, Vec<String>, Vec<Flag>)> = got
            .iter()
            .map(|(f, _, _)| (f.kind, f.tables.to_vec(), f.flags.iter().collect()))
            .collect();
        let want: Vec<(Kind, Vec<String>, Vec<Flag>)> = case
            .want
            .iter()
            .map(|(k, t, f)| (*k, t.iter().map(|s| (*s).to_owned()).collect(), f.to_vec()))
            .collect();
        if got_short != want {
            failures.push(format!(
                "{:?} [{:?}]\n   got  {got_short:?}\n   want {want:?}\n   {:?}",
                case.sql,
                case.dialect,
                got.iter().map(|g| &g.0).collect::<Vec<_>>()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn where_and_limit() {
    let one = |sql: &str, d| facts(sql, d).remove(0);
    assert_eq!(one("delete from t", PG).0.has_where, Some(false));
    assert_eq!(
        one("update t set a = 1 where id = 2", PG).0.has_where,
        Some(true)
    );
    assert_eq!(
        one(
            "with x as (delete from t) update u set a = 1 where b = 2",
            PG
        )
        .0
        .has_where,
        Some(false)
    );
    assert_eq!(one("select 1", PG).0.has_where, None);
    let (f, _, info) = one("select * from t limit 50", PG);
    assert!(f.limit_literal);
    assert_eq!(info.limit, Some(50));
    let (f, _, _) = one("select * from t limit $1", PG);
    assert!(!f.limit_literal);
    let (f, _, info) = one("select * from t limit 10, 500", MY);
    assert!(f.limit_literal);
    assert_eq!(info.limit, Some(500));
    let (f, _, _) = one("select * from t limit 5 + 5", PG);
    assert!(!f.limit_literal);
    let (f, _, _) = one("insert into t select * from u limit 5", PG);
    assert!(!f.limit_literal);
}

#[test]
fn effects() {
    let eff = |sql: &str, d| facts(sql, d).remove(0).1;
    assert_eq!(eff("use Shop2", MY), Effect::Use("shop2".into()));
    assert_eq!(
        eff("set search_path to app, \"$user\"", PG),
        Effect::SearchPath(SearchPathChange::Set {
            schemas: vec!["app".into(), "$user".into()],
            local: false
        })
    );
    assert_eq!(
        eff("set local search_path = 'a, b'", PG),
        Effect::SearchPath(SearchPathChange::Set {
            schemas: vec!["a".into(), "b".into()],
            local: true
        })
    );
    assert_eq!(
        eff("reset all", PG),
        Effect::SearchPath(SearchPathChange::Reset)
    );
    assert_eq!(eff("execute p(1)", PG), Effect::Execute("p".into()));
    assert_eq!(eff("EXECUTE s USING @a", MY), Effect::Execute("s".into()));
    assert!(
        matches!(eff("prepare p as select * from t limit 5", PG), Effect::Prepare { name, body: PreparedBody::Text(b) } if name == "p" && b.contains("limit 5"))
    );
    assert!(matches!(
        eff("PREPARE s FROM @sql", MY),
        Effect::Prepare {
            body: PreparedBody::Unknown,
            ..
        }
    ));
    assert_eq!(eff("deallocate all", PG), Effect::Deallocate(None));
    assert_eq!(
        eff("DEALLOCATE PREPARE s", MY),
        Effect::Deallocate(Some("s".into()))
    );
    assert_eq!(eff("begin", PG), Effect::Begin);
    assert_eq!(eff("rollback", PG), Effect::End);
    assert_eq!(eff("rollback to savepoint a", PG), Effect::None);
}

/// Statements PostgreSQL runs that sqlparser alone does not read (from
/// PostgreSQL's regression suite): parsed, with their facts.
#[test]
fn postgres_forms_repaired_before_parsing() {
    for (sql, kind, tables) in [
        ("select 'a'\n'b' from t", Kind::Select, &["public.t"][..]),
        ("fetch from cur", Kind::Select, &[][..]),
        ("fetch in cur", Kind::Select, &[][..]),
        ("fetch cur", Kind::Select, &[][..]),
        ("create domain d int4 check (value > 0)", Kind::Ddl, &[][..]),
        (
            "update arr set f1[1] = 2, f2[1][2] = 3 where id = 1",
            Kind::Update,
            &["public.arr"][..],
        ),
        (
            "create trigger tr before insert on ttest for each row execute procedure trig('PS', 'x')",
            Kind::Ddl,
            &[][..],
        ),
        (
            "select U&'d!0061t' UESCAPE '!' from t",
            Kind::Select,
            &["public.t"][..],
        ),
        (
            "copy x to stdout where a = 1",
            Kind::Copy,
            &["public.x"][..],
        ),
        ("prepare transaction 'foo1'", Kind::Tcl, &[][..]),
    ] {
        let (f, _, _) = facts(sql, PG).remove(0);
        assert!(!f.unparsed, "{sql}: {f:?}");
        assert_eq!(f.kind, kind, "{sql}");
        for t in tables {
            assert!(f.tables.iter().any(|x| x == t), "{sql}: {:?}", f.tables);
        }
    }
}

/// What sqlparser cannot read, PostgreSQL's own grammar does: the facts
/// come from the server's parse tree.
#[test]
fn postgres_grammar_reads_what_sqlparser_cannot() {
    // Rule actions: one statement (a `;` inside parentheses does not
    // split), every action's tables, CTE names scoped to their action.
    let sql = "create rule r as on insert to t do also (with payroll as (select 1) select * from payroll; select * from payroll; delete from u)";
    let all = facts(sql, PG);
    assert_eq!(all.len(), 1, "{sql}");
    let f = &all[0].0;
    assert!(!f.unparsed, "{f:?}");
    assert_eq!(f.kind, Kind::Ddl);
    assert_eq!(&f.tables[..], ["public.payroll", "public.t", "public.u"]);
    assert_eq!(f.tables_written, ["public.t", "public.u"]);
    // A catalogued function's text argument is not analysed here: what
    // the statement reads is unknown.
    let (f, _, _) = facts(
        "select query_to_xml('select * from payroll', true, true, '') from t for no key update skip locked",
        PG,
    )
    .remove(0);
    assert!(!f.unparsed && f.tables_unknown, "{f:?}");
    assert!(f.flags.contains(Flag::DynamicSql));
    for (sql, kind) in [
        (
            "create aggregate newavg (sfunc = int4_accum, basetype = int4, stype = _numeric)",
            Kind::Ddl,
        ),
        ("alter table fk alter constraint fk_c deferrable", Kind::Ddl),
        ("security label on table t is 'x'", Kind::Ddl),
    ] {
        let (f, _, _) = facts(sql, PG).remove(0);
        assert!(!f.unparsed, "{sql}: {f:?}");
        assert_eq!(f.kind, kind, "{sql}");
    }
    // Neither parser reads it: the reason names both.
    let (f, _, _) = facts("selec * from t", PG).remove(0);
    let why = f.parse_error.unwrap();
    assert!(
        why.contains("PostgreSQL's parser: ") && why.contains("syntax error"),
        "{why}"
    );
}

#[test]
fn unparsable_is_lexical_and_marked() {
    let (f, _, _) = facts("selec * from t", PG).remove(0);
    assert!(f.unparsed);
    let (f, _, _) = facts("delete from orders where id = 'unterminated", PG).remove(0);
    assert!(f.unparsed);
    assert_eq!(f.kind, Kind::Delete);
    assert_eq!(*f.tables, ["public.orders"]);
    let (f, _, _) = facts("with x as (delete from t) frobnicate", PG).remove(0);
    assert!(f.unparsed);
    assert_eq!(f.kind, Kind::Delete);
}

#[test]
fn deep_nesting_is_bounded() {
    // Runs on the test thread's 2 MiB stack, in a debug build.
    for n in [10, 63, 64, 65, 200, 10_000] {
        let sql = format!("select {}1{}", "(".repeat(n), ")".repeat(n));
        let (f, _, _) = facts(&sql, PG).remove(0);
        assert_eq!(f.kind, Kind::Select, "{n}");
        assert_eq!(f.unparsed, n > 64, "{n}");
    }
    for sql in [
        format!("select a{}", "[1]".repeat(20_000)),
        format!("select {}1", "not ".repeat(20_000)),
        format!("select {}1", "- ".repeat(20_000)),
        format!("select 1{}", " + 1".repeat(20_000)),
        format!("select {}1{}", "(select ".repeat(5000), ")".repeat(5000)),
        format!("select {}1{}", "array[".repeat(5000), "]".repeat(5000)),
    ] {
        let _ = facts(&sql, PG);
        let _ = facts(&sql, MY);
    }
}

#[test]
fn bulk_insert_is_cheap() {
    let blob = "x".repeat(20 << 20);
    let sql = format!("INSERT INTO blobs (id, data) VALUES (1, '{blob}'), (2, '{blob}')");
    let started = std::time::Instant::now();
    let got = facts(&sql, PG);
    let took = started.elapsed();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.kind, Kind::Insert);
    assert_eq!(*got[0].0.tables, ["public.blobs"]);
    assert!(!got[0].0.unparsed);
    // Generous even for a debug build: the point is no quadratic blow-up.
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
}

#[test]
fn many_row_inserts_are_parsed_not_refused_as_too_long() {
    // sysbench's prepare, pg_dump --inserts --rows-per-insert, ORMs' bulk
    // saves: thousands of literal rows collapse to one row for the parser.
    let rows: Vec<String> = (0..5000).map(|i| format!("({i}, 'c{i}', 'pad')")).collect();
    let sql = format!("INSERT INTO sbtest1 (k, c, pad) VALUES {}", rows.join(", "));
    for d in [PG, MY] {
        let got = facts(&sql, d);
        assert_eq!(got[0].0.kind, Kind::Insert);
        assert!(!got[0].0.unparsed, "{d:?}");
    }
}

#[test]
fn fingerprints_normalise_literals_only() {
    let fp = |sql: &str, d| {
        let mut c = String::new();
        normalize(
            sql,
            LexMode::default_for(d),
            false,
            &mut c,
            &mut Scratch::default(),
        );
        Fingerprint::of(&c, d).to_string()
    };
    assert_eq!(
        fp("SELECT * FROM t WHERE a = 1", PG),
        fp("select *\nfrom t where a=2 -- x", PG)
    );
    assert_eq!(
        fp("select * from t where a in (1,2,3)", PG),
        fp("select * from t where a in (4)", PG)
    );
    assert_ne!(fp("select * from t", PG), fp("select * from u", PG));
    assert_ne!(fp("select * from s.t", PG), fp("select * from t", PG));
    assert_ne!(fp("select a, b from t", PG), fp("select b, a from t", PG));
    assert_ne!(fp("set search_path = a", PG), fp("set search_path = b", PG));
    assert_ne!(fp("execute p1", PG), fp("execute p2", PG));
    assert_ne!(fp("select 1", PG), fp("select 1", MY));
}

fn any_sql() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "select",
        "from",
        "t",
        "'",
        "\"",
        "`",
        "$$",
        "$a$",
        "/*",
        "*/",
        "/*!",
        "--",
        "#",
        "\n",
        ";",
        "(",
        ")",
        "[",
        "]",
        ",",
        ".",
        "1",
        "e'",
        "\\",
        "with",
        "as",
        "delete",
        "insert",
        "into",
        "values",
        "set",
        "search_path",
        "=",
        "prepare",
        "execute",
        "limit",
        "union",
        "copy",
        "program",
        " ",
        "é",
        "\0",
        "?",
        "$1",
        "@",
        "@@global.x",
        "not",
        "-",
    ]);
    prop_oneof![
        prop::collection::vec(atoms, 0..40).prop_map(|v| v.join(" ")),
        prop::collection::vec(
            prop::sample::select(vec!["(", ")", "'", "/*", "*/", "$$", ";", "x", " "]),
            0..60
        )
        .prop_map(|v| v.concat()),
        ".{0,200}",
    ]
}

proptest! {
    #[test]
    fn never_panics(sql in any_sql()) {
        for d in [PG, MY] {
            for (f, _, _) in facts(&sql, d) {
                prop_assert!(f.tables.iter().all(|t| !t.is_empty()));
            }
        }
    }

    #[test]
    fn splitting_covers_no_less_than_the_text(sql in any_sql()) {
        for d in [PG, MY] {
            for s in split(&sql, d) {
                prop_assert!(s.start < s.end && s.end <= sql.len());
                prop_assert!(sql.is_char_boundary(s.start) && sql.is_char_boundary(s.end));
            }
        }
    }

    #[test]
    fn normalising_is_idempotent_on_parse(sql in any_sql()) {
        for d in [PG, MY] {
            let mut a = String::new();
            let mut scratch = Scratch::default();
            normalize(&sql, LexMode::default_for(d), false, &mut a, &mut scratch);
            let _ = Fingerprint::of(&a, d);
        }
    }
}

#[test]
fn redact_replaces_every_literal() {
    use super::redact;
    let cases = [
        (
            Dialect::Postgres,
            "SELECT * FROM t WHERE a = 'alice' AND b = 42",
            "select * from t where a = '' and b = 0",
        ),
        (
            Dialect::Postgres,
            "ALTER ROLE app PASSWORD 'hunter2'",
            "alter role app password ''",
        ),
        (
            Dialect::Postgres,
            "SET app.secret = 'k3y'",
            "set app . secret = ''",
        ),
        (
            Dialect::Postgres,
            "SELECT set_config('x', 'v', false)",
            "select set_config ( '' , '' , false )",
        ),
        (
            Dialect::Mysql,
            "INSERT INTO t VALUES (1, 'a'), (2, 'b')",
            "insert into t values ( 0 )",
        ),
    ];
    for (d, raw, want) in cases {
        assert_eq!(redact(raw, d), want, "{raw}");
    }
    // A literal cut off by truncation is still a literal.
    for (d, raw) in [
        (Dialect::Postgres, "SELECT 'secret tail"),
        (Dialect::Postgres, "SELECT $$secret tail"),
        (Dialect::Mysql, "SELECT \"secret tail"),
        (Dialect::Postgres, "SELECT E'it\\'s secret'"),
        (Dialect::Mysql, "SELECT 'it\\' OR secret' FROM t"),
    ] {
        let r = redact(raw, d);
        assert!(!r.contains("secret"), "{raw} -> {r}");
    }
}

// ---------------------------------------------------------------------------
// Statements that read what they never name (issue 19).

struct HiddenCase {
    sql: &'static str,
    dialect: Dialect,
    kind: Kind,
    tables: &'static [&'static str],
    flags: &'static [Flag],
    /// Some table is unknown (`dynamic_sql`).
    unknown: bool,
}

const DYN: &[Flag] = &[Flag::DynamicSql];

#[rustfmt::skip]
const HIDDEN_CASES: &[HiddenCase] = &[
    // The issue's four, and the same rule's TABLE form.
    HiddenCase { sql: "SELECT database_to_xml(true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "SELECT schema_to_xml('public', true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "SELECT query_to_xml('select * from payroll', true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "SELECT * FROM ts_stat('select to_tsvector(note) from payroll')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "TABLE orders", dialect: PG, kind: Kind::Select, tables: &["public.orders"], flags: &[], unknown: false },
    HiddenCase { sql: "table sales.orders order by 1 limit 5", dialect: PG, kind: Kind::Select, tables: &["sales.orders"], flags: &[], unknown: false },
    HiddenCase { sql: "with r as (table orders) select * from r", dialect: PG, kind: Kind::Select, tables: &["public.orders"], flags: &[], unknown: false },
    HiddenCase { sql: "with r as (select 1) table r", dialect: PG, kind: Kind::Select, tables: &[], flags: &[], unknown: false },
    HiddenCase { sql: "select * from customers union all table payroll", dialect: PG, kind: Kind::Select, tables: &["public.customers", "public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "table orders union table payroll", dialect: PG, kind: Kind::Select, tables: &["public.orders", "public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "(table orders) except (table payroll)", dialect: PG, kind: Kind::Select, tables: &["public.orders", "public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "insert into orders table payroll", dialect: PG, kind: Kind::Insert, tables: &["public.orders", "public.payroll"], flags: &[], unknown: false },
    // Names: qualified, quoted, upper case; relation names read as regclass does.
    HiddenCase { sql: "select pg_catalog.query_to_xml('select * from payroll', true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select \"query_to_xml\"('select * from payroll', true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "SELECT QUERY_TO_XML('SELECT * FROM PayRoll', TRUE, TRUE, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select table_to_xml('payroll', true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select table_to_xml('hr.\"PayRoll\"'::regclass, true, true, '')", dialect: PG, kind: Kind::Select, tables: &["hr.PayRoll"], flags: &[], unknown: false },
    HiddenCase { sql: "select table_to_xml(regclass 'Payroll', true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select table_to_xml(cast('pg_authid' as regclass), true, true, '')", dialect: PG, kind: Kind::Select, tables: &["pg_catalog.pg_authid", "public.pg_authid"], flags: &[], unknown: false },
    HiddenCase { sql: "select table_to_xml(16384, true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "select table_to_xml('16384', true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "select table_to_xml(relname::regclass, true, true, '') from pg_class", dialect: PG, kind: Kind::Select, tables: &["pg_catalog.pg_class", "public.pg_class"], flags: DYN, unknown: true },
    // Literal forms, and what is not a literal.
    HiddenCase { sql: "select query_to_xml(E'select * from payroll', true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select query_to_xml($q$select * from payroll where note = 'x'$q$, true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select query_to_xml('select * from payroll'::text, true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select query_to_xml('select * from ' || 'payroll', true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "select query_to_xml(format('select * from %I', 'payroll'), true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "select query_to_xml($1, true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "select query_to_xml(q, true, true, '') from saved_queries", dialect: PG, kind: Kind::Select, tables: &["public.saved_queries"], flags: DYN, unknown: true },
    HiddenCase { sql: "select query_to_xml((select q from saved_queries limit 1), true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.saved_queries"], flags: DYN, unknown: true },
    HiddenCase { sql: "select query_to_xml('select * from payroll where n = ''\\''', true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "select query_to_xml(null, true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: &[], unknown: false },
    // Named notation.
    HiddenCase { sql: "select query_to_xml(query => 'select * from payroll', nulls => true, tableforest => true, targetns => '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select query_to_xml(nulls => true, tableforest => true, targetns => '', query => q) from saved", dialect: PG, kind: Kind::Select, tables: &["public.saved"], flags: DYN, unknown: true },
    // Nested: subqueries, CTEs, function arguments, INSERT ... SELECT, hidden in hidden.
    HiddenCase { sql: "select * from (select query_to_xml('select * from payroll', true, true, '') x) s", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "with x as (select table_to_xml('payroll', true, true, '') d) select * from x", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select length(query_to_xml('select * from payroll', true, true, '')::text)", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select * from orders where note = query_to_xml('select 1 from payroll', true, true, '')::text", dialect: PG, kind: Kind::Select, tables: &["public.orders", "public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "insert into orders (note) select query_to_xml('select * from payroll', true, true, '')::text", dialect: PG, kind: Kind::Insert, tables: &["public.orders", "public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select query_to_xml('select query_to_xml(''select * from payroll'', true, true, '''')', true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select query_to_xml('select query_to_xml(q, true, true, '''') from saved', true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.saved"], flags: DYN, unknown: true },
    HiddenCase { sql: "select query_to_xml('select pg_read_file(''/etc/passwd'')', true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: &[Flag::FileAccess], unknown: false },
    HiddenCase { sql: "select query_to_xml('with d as (delete from payroll returning *) select * from d', true, true, '')", dialect: PG, kind: Kind::Delete, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select query_to_xml('select 1; select * from payroll', true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "prepare p as select query_to_xml('select * from payroll', true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "explain analyze select query_to_xml('select * from payroll', true, true, '')", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "copy (select table_to_xml('payroll', true, true, '')) to stdout", dialect: PG, kind: Kind::Copy, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "create table loot as select query_to_xml('select * from payroll', true, true, '')", dialect: PG, kind: Kind::Ddl, tables: &["public.loot", "public.payroll"], flags: &[], unknown: false },
    // Whole schemas and databases, cursors, pasted fragments.
    HiddenCase { sql: "select schema_to_xmlschema('public', true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "select database_to_xml_and_xmlschema(true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "select cursor_to_xml('c', 10, true, true, '')", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "select * from connectby('payroll', 'id', 'boss', '1', 0) as t(id int, boss int, level int)", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "select * from xpath_table('id', 'doc', 'payroll', '/a', 'true') as t(id int, a text)", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    // Other query-text functions.
    HiddenCase { sql: "select ts_rewrite('a & b'::tsquery, 'select t, s from aliases')", dialect: PG, kind: Kind::Select, tables: &["public.aliases"], flags: &[], unknown: false },
    HiddenCase { sql: "select ts_rewrite('a'::tsquery, 'b'::tsquery, 'c'::tsquery)", dialect: PG, kind: Kind::Select, tables: &[], flags: &[], unknown: false },
    HiddenCase { sql: "select * from dblink('dbname=app', 'select * from payroll') as t(a int)", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[Flag::RemoteAccess], unknown: false },
    HiddenCase { sql: "select * from dblink('select * from payroll', true) as t(a int)", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[Flag::RemoteAccess], unknown: false },
    HiddenCase { sql: "select dblink_exec('dbname=app', 'delete from payroll')", dialect: PG, kind: Kind::Delete, tables: &["public.payroll"], flags: &[Flag::RemoteAccess], unknown: false },
    HiddenCase { sql: "select dblink_exec(c) from conns", dialect: PG, kind: Kind::Select, tables: &["public.conns"], flags: &[Flag::RemoteAccess, Flag::DynamicSql], unknown: true },
    HiddenCase { sql: "select * from crosstab('select a, b, c from payroll', 'select distinct b from payroll') as t(a text)", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "select get_raw_page('payroll', 0)", dialect: PG, kind: Kind::Select, tables: &["public.payroll"], flags: &[], unknown: false },
    // Reviewed, reads no rows: not hidden SQL.
    HiddenCase { sql: "select nextval('orders_id_seq'), pg_relation_size('payroll')", dialect: PG, kind: Kind::Select, tables: &[], flags: &[], unknown: false },
    // A statement no parser reads that calls one: unknown.
    HiddenCase { sql: "select query_to_xml('select 1', true, true, '') frobnicate frobnicate", dialect: PG, kind: Kind::Select, tables: &[], flags: DYN, unknown: true },
    // MySQL / MariaDB.
    HiddenCase { sql: "EXECUTE IMMEDIATE 'SELECT * FROM payroll'", dialect: MY, kind: Kind::Select, tables: &["shop.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "execute immediate 'delete from payroll where id = ?' using 1", dialect: MY, kind: Kind::Delete, tables: &["shop.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "EXECUTE IMMEDIATE @q", dialect: MY, kind: Kind::Other, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "EXECUTE IMMEDIATE CONCAT('SELECT * FROM ', 'payroll')", dialect: MY, kind: Kind::Other, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "PREPARE s FROM @q", dialect: MY, kind: Kind::Other, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "PREPARE s FROM CONCAT('SELECT * FROM ', @t)", dialect: MY, kind: Kind::Other, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "CALL sys.execute_prepared_stmt('SELECT * FROM payroll')", dialect: MY, kind: Kind::Call, tables: &["shop.payroll"], flags: &[], unknown: false },
    HiddenCase { sql: "call `sys`.`EXECUTE_PREPARED_STMT`(@q)", dialect: MY, kind: Kind::Call, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "CALL sys.create_synonym_db('shop', 'shop2')", dialect: MY, kind: Kind::Call, tables: &[], flags: DYN, unknown: true },
    HiddenCase { sql: "CALL mysql.AddGeometryColumn('', 'shop', 'payroll', 'g', 0)", dialect: MY, kind: Kind::Call, tables: &[], flags: DYN, unknown: true },
];

#[test]
fn table_of_hidden_sql() {
    let mut failures = Vec::new();
    for case in HIDDEN_CASES {
        let got = facts(case.sql, case.dialect);
        let f = got
            .iter()
            .map(|g| &g.0)
            .fold(None::<StatementFacts>, |acc, f| {
                Some(acc.map_or_else(
                    || f.clone(),
                    |mut a| {
                        let mut t = a.tables.to_vec();
                        t.extend(f.tables.iter().cloned());
                        t.sort();
                        t.dedup();
                        a.tables = t.into();
                        a.flags = a.flags.union(f.flags);
                        a.tables_unknown |= f.tables_unknown;
                        a
                    },
                ))
            });
        let Some(f) = f else {
            failures.push(format!("{:?}: no statement", case.sql));
            continue;
        };
        let flags: Vec<Flag> = f.flags.iter().collect();
        let want: Vec<String> = case.tables.iter().map(|s| (*s).to_owned()).collect();
        if f.kind != case.kind
            || *f.tables != *want
            || flags != case.flags
            || f.tables_unknown != case.unknown
        {
            failures.push(format!(
                "{:?} [{:?}]\n   got  {:?} {:?} {flags:?} unknown={}\n   want {:?} {want:?} {:?} unknown={}\n   {:?}",
                case.sql, case.dialect, f.kind, f.tables, f.tables_unknown, case.kind, case.flags,
                case.unknown, f.hidden
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A constant of a parameter's type, for calls built from the catalogue.
fn filler(ty: &str) -> &'static str {
    match ty {
        "boolean" => "true",
        "integer" | "bigint" | "smallint" | "int" | "tinyint" | "decimal" | "oid" => "1",
        "text[]" => "array['a']",
        "int2vector" => "'1'::int2vector",
        "tid[]" => "array['(0,1)'::tid]",
        "tsquery" => "'a'::tsquery",
        _ => "'x'",
    }
}

/// Every catalogue entry that reads something, every overload: a literal
/// inner query (or relation name) is analysed as part of the statement; a
/// non-literal one, and the whole-schema, whole-database, cursor and
/// fragment forms, make it `dynamic_sql` with its tables unknown. Entries
/// reviewed as reading no rows stay ordinary function calls.
#[test]
fn every_catalogue_entry() {
    use hidden::{Reads, Role};
    let mut failures = Vec::new();
    let mut checked = 0;
    for d in [PG, MY] {
        let (schema_t, call) = match d {
            PG => ("public", "select"),
            MY => ("shop", "call"),
        };
        let cat = hidden::entries(d);
        assert!(!cat.is_empty());
        for (name, entry) in cat {
            for ov in &entry.overloads {
                let build = |literal: bool| {
                    let args: Vec<String> = ov
                        .iter()
                        .map(|p| match (p.role, literal) {
                            (Some(Role::Sql), true) => "'select * from payroll'".to_owned(),
                            (Some(Role::Relation | Role::Written), true) => "'payroll'".to_owned(),
                            (Some(Role::Schema | Role::Database), true) => "'public'".to_owned(),
                            (Some(Role::Cursor | Role::Fragment), true) => "'payroll'".to_owned(),
                            (Some(_), false) => "c".to_owned(),
                            (None, _) => filler(&p.ty).to_owned(),
                        })
                        .collect();
                    let q = match d {
                        PG => format!("{call} {}.{name}({}) from t", entry.schema, args.join(", ")),
                        MY => format!("{call} {}.{name}({})", entry.schema, args.join(", ")),
                    };
                    // PostgreSQL: also as a table function.
                    let q2 = format!("select * from {name}({}) as x", args.join(", "));
                    (q, q2)
                };
                let has_role = ov.iter().any(|p| p.role.is_some());
                for literal in [true, false] {
                    let (q, q2) = build(literal);
                    let forms: Vec<&str> = match d {
                        PG => vec![&q, &q2],
                        MY => vec![&q],
                    };
                    for sql in forms {
                        checked += 1;
                        let got = facts(sql, d);
                        let Some((f, _, _)) = got.first() else {
                            failures.push(format!("{sql}: no statement"));
                            continue;
                        };
                        let dynamic = f.flags.contains(Flag::DynamicSql);
                        let payroll = format!("{schema_t}.payroll");
                        let ok = match entry.reads {
                            Reads::None => !dynamic && !f.tables_unknown,
                            Reads::Schema | Reads::Database | Reads::Cursor | Reads::Fragment => {
                                dynamic && f.tables_unknown && !f.hidden.is_empty()
                            }
                            Reads::Sql | Reads::Relation if !has_role => {
                                // An overload without the argument (e.g.
                                // ts_rewrite(tsquery, tsquery, tsquery)).
                                !dynamic
                            }
                            Reads::Sql | Reads::Relation if literal => {
                                !dynamic
                                    && !f.tables_unknown
                                    && f.tables.contains(&payroll)
                                    && f.hidden.iter().any(|h| {
                                        h.function == name.to_lowercase()
                                            && h.tables.contains(&payroll)
                                    })
                                    && (!ov.iter().any(|p| p.role == Some(Role::Written))
                                        || f.tables_written.contains(&payroll))
                            }
                            Reads::Sql | Reads::Relation => {
                                dynamic
                                    && f.tables_unknown
                                    && !f.tables.contains(&payroll)
                                    && f.hidden.iter().any(|h| h.dynamic.is_some())
                            }
                        };
                        // A non-literal argument may leave another
                        // overload's literal to be read as SQL (dblink's
                        // connection string): unparsed is fine there.
                        if !ok || (f.unparsed && literal) {
                            failures.push(format!(
                                "{name} ({:?}, literal={literal}): {sql}\n   {f:?}",
                                entry.reads
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 250, "{checked}");
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn hidden_literals_are_part_of_the_shape() {
    let fp = |sql: &str, d| {
        let mut c = String::new();
        normalize(
            sql,
            LexMode::default_for(d),
            false,
            &mut c,
            &mut Scratch::default(),
        );
        Fingerprint::of(&c, d).to_string()
    };
    assert_ne!(
        fp(
            "select query_to_xml('select * from orders', true, true, '')",
            PG
        ),
        fp(
            "select query_to_xml('select * from payroll', true, true, '')",
            PG
        )
    );
    assert_ne!(
        fp("select table_to_xml('orders', true, true, '')", PG),
        fp("select table_to_xml('payroll', true, true, '')", PG)
    );
    assert_ne!(
        fp("EXECUTE IMMEDIATE 'select * from orders'", MY),
        fp("EXECUTE IMMEDIATE 'select * from payroll'", MY)
    );
    // Ordinary statements keep normalising their literals.
    assert_eq!(
        fp("select * from t where a = 'x'", PG),
        fp("select * from t where a = 'y'", PG)
    );
    // Redaction still replaces them.
    assert_eq!(
        super::redact(
            "select query_to_xml('select * from payroll', true, true, '')",
            PG
        ),
        "select query_to_xml ( '' , true , true , '' )"
    );
}

// ---------------------------------------------------------------------------
// MariaDB forms (`mysql_forms`): statements read whole, pieces of stored
// program bodies, and rewrites. Each case: parsed (not `unparsed`), with the
// kind, tables (`+` marks a written one), flags and procedural code given.

struct MariaCase {
    sql: &'static str,
    kind: Kind,
    tables: &'static [&'static str],
    flags: &'static [Flag],
    procedural: bool,
}

#[rustfmt::skip]
const MARIA: &[MariaCase] = &[
    // Accounts and privileges.
    MariaCase { sql: "grant select on `my\\_1`.* to mysqltest_2@localhost", kind: Kind::Dcl, tables: &[], flags: &[], procedural: false },
    MariaCase { sql: "GRANT UPDATE ON db1.payroll TO u1@localhost WITH GRANT OPTION", kind: Kind::Dcl, tables: &["db1.payroll"], flags: &[], procedural: false },
    MariaCase { sql: "grant r1 to u1@localhost", kind: Kind::Dcl, tables: &[], flags: &[Flag::RoleChange], procedural: false },
    MariaCase { sql: "revoke all privileges, grant option from 'mysqltest_1'", kind: Kind::Dcl, tables: &[], flags: &[], procedural: false },
    MariaCase { sql: "create user mysqltest_1@'test@test' identified by 'x'", kind: Kind::Dcl, tables: &[], flags: &[], procedural: false },
    MariaCase { sql: "DROP USER IF EXISTS pauline@localhost", kind: Kind::Dcl, tables: &[], flags: &[], procedural: false },
    MariaCase { sql: "rename user 'a'@'%' to 'b'@'%'", kind: Kind::Dcl, tables: &[], flags: &[], procedural: false },
    // Locks, FLUSH, table maintenance, administration.
    MariaCase { sql: "LOCK TABLES mysql.time_zone READ, t1 AS a WRITE", kind: Kind::Other, tables: &["mysql.time_zone", "shop.t1"], flags: &[Flag::Lock], procedural: false },
    MariaCase { sql: "flush tables t1, t2 with read lock", kind: Kind::Other, tables: &["shop.t1", "shop.t2"], flags: &[Flag::Lock, Flag::Admin], procedural: false },
    MariaCase { sql: "flush status", kind: Kind::Other, tables: &[], flags: &[Flag::Admin], procedural: false },
    MariaCase { sql: "backup stage start", kind: Kind::Other, tables: &[], flags: &[Flag::Lock, Flag::Admin], procedural: false },
    MariaCase { sql: "check table t1, t2 extended", kind: Kind::Other, tables: &["shop.t1", "shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "REPAIR TABLE t1 QUICK", kind: Kind::Other, tables: &["+shop.t1"], flags: &[Flag::Admin], procedural: false },
    MariaCase { sql: "optimize no_write_to_binlog table t1", kind: Kind::Other, tables: &["+shop.t1"], flags: &[Flag::Admin], procedural: false },
    MariaCase { sql: "binlog 'AAAA'", kind: Kind::Other, tables: &[], flags: &[Flag::Admin], procedural: false },
    MariaCase { sql: "cache index t1, t2 in keycache1", kind: Kind::Other, tables: &["shop.t1", "shop.t2"], flags: &[Flag::Admin], procedural: false },
    MariaCase { sql: "show columns from t1 from other", kind: Kind::Other, tables: &["other.t1"], flags: &[], procedural: false },
    MariaCase { sql: "SHOW CREATE TABLE payroll", kind: Kind::Other, tables: &["shop.payroll"], flags: &[], procedural: false },
    MariaCase { sql: "SHOW TRIGGERS FROM test WHERE `Table` = 't'", kind: Kind::Other, tables: &[], flags: &[], procedural: false },
    MariaCase { sql: "show tables where tables_in_test in (select name from payroll)", kind: Kind::Other, tables: &["shop.payroll"], flags: &[], procedural: false },
    MariaCase { sql: "help 'contents'", kind: Kind::Other, tables: &[], flags: &[], procedural: false },
    // DDL: ALTER TABLE, sequences, partitions, views, DROP TABLES.
    MariaCase { sql: "alter online table t1 modify b int default 5, engine=innodb", kind: Kind::Ddl, tables: &["+shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "ALTER TABLE t1 EXCHANGE PARTITION p0 WITH TABLE t2", kind: Kind::Ddl, tables: &["+shop.t1", "+shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "alter table t1 rename to t2", kind: Kind::Ddl, tables: &["+shop.t1", "+shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "create sequence s1 start with 10 maxvalue=9", kind: Kind::Ddl, tables: &["+shop.s1"], flags: &[], procedural: false },
    MariaCase { sql: "drop sequence if exists s1, s2", kind: Kind::Ddl, tables: &["+shop.s1", "+shop.s2"], flags: &[], procedural: false },
    MariaCase { sql: "create table t1 (i int) partition by hash(i) partitions 2", kind: Kind::Ddl, tables: &["+shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "create table t1 (a varchar(10) charset utf8 collate utf8_bin not null) ignore select a from t2", kind: Kind::Ddl, tables: &["+shop.t1", "shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "CREATE TABLE t1 (t1.a int, s DATE, e DATE, PERIOD FOR p(s,e), unique index (a) visible)", kind: Kind::Ddl, tables: &["+shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "create table t1 (a int) transactional=0 page_checksum=1", kind: Kind::Ddl, tables: &["+shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "create table t2 with recursive r (id) as (select id from folks union select id + 1 from r) select * from r", kind: Kind::Ddl, tables: &["+shop.t2", "shop.folks"], flags: &[], procedural: false },
    MariaCase { sql: "CREATE ALGORITHM = MERGE DEFINER = u@localhost SQL SECURITY INVOKER VIEW v1 AS SELECT f1 FROM t1 WITH CASCADED CHECK OPTION", kind: Kind::Ddl, tables: &["+shop.v1", "shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "drop tables t1, t2", kind: Kind::Ddl, tables: &["+shop.t1", "+shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "DROP EVENT e_x1", kind: Kind::Ddl, tables: &[], flags: &[], procedural: false },
    // Stored programs: the head is opaque procedural code.
    MariaCase { sql: "CREATE PROCEDURE p1() BEGIN END", kind: Kind::Ddl, tables: &[], flags: &[], procedural: true },
    MariaCase { sql: "CREATE DEFINER = u3@localhost PROCEDURE db1.p2() INSERT INTO t4 VALUES (1)", kind: Kind::Ddl, tables: &["+shop.t4"], flags: &[], procedural: true },
    MariaCase { sql: "create function f1() returns int return (select count(*) from payroll)", kind: Kind::Ddl, tables: &["shop.payroll"], flags: &[], procedural: true },
    MariaCase { sql: "CREATE DEFINER='inv'@'localhost' TRIGGER trg1 BEFORE UPDATE ON t1 FOR EACH ROW SET @new_sum = 0", kind: Kind::Ddl, tables: &["+shop.t1"], flags: &[], procedural: true },
    MariaCase { sql: "CREATE EVENT e1 ON SCHEDULE EVERY 1 SECOND DO DELETE FROM log", kind: Kind::Ddl, tables: &["+shop.log"], flags: &[], procedural: true },
    MariaCase { sql: "create function metaphon returns string soname 'udf.so'", kind: Kind::Ddl, tables: &[], flags: &[Flag::FileAccess, Flag::Admin], procedural: true },
    // Pieces of a body (the splitter cuts at every `;`).
    MariaCase { sql: "declare v_a int default null", kind: Kind::Other, tables: &[], flags: &[], procedural: true },
    MariaCase { sql: "DECLARE c CURSOR (p INT) FOR SELECT * FROM t1 WHERE a = p", kind: Kind::Select, tables: &["shop.t1"], flags: &[], procedural: true },
    // A local variable's SET is read as any SET (a session setting).
    MariaCase { sql: "DECLARE CONTINUE HANDLER FOR SQLSTATE '02000', NOT FOUND SET done = TRUE", kind: Kind::Other, tables: &[], flags: &[Flag::SessionChange], procedural: true },
    MariaCase { sql: "declare exit handler for sqlexception delete from payroll", kind: Kind::Delete, tables: &["+shop.payroll"], flags: &[], procedural: true },
    MariaCase { sql: "IF (SELECT count(*) FROM t1) > 0 THEN DELETE FROM t2 WHERE a = 1", kind: Kind::Delete, tables: &["+shop.t2", "shop.t1"], flags: &[], procedural: true },
    MariaCase { sql: "if done then leave read_loop", kind: Kind::Other, tables: &[], flags: &[], procedural: true },
    MariaCase { sql: "ELSE INSERT INTO t1 VALUES ('x')", kind: Kind::Insert, tables: &["+shop.t1"], flags: &[], procedural: true },
    MariaCase { sql: "read_loop: LOOP FETCH cur INTO va", kind: Kind::Select, tables: &[], flags: &[], procedural: true },
    MariaCase { sql: "WHEN 10 THEN BEGIN CASE arg WHEN 1 THEN UPDATE t1 SET a = 2", kind: Kind::Update, tables: &["+shop.t1"], flags: &[], procedural: true },
    MariaCase { sql: "while i < 4 do insert into t1 select i", kind: Kind::Insert, tables: &["+shop.t1"], flags: &[], procedural: true },
    MariaCase { sql: "FOR rec IN (SELECT a FROM payroll) DO SELECT rec.a", kind: Kind::Select, tables: &["shop.payroll"], flags: &[], procedural: true },
    MariaCase { sql: "until (select max(a) from t1) > 3 end repeat", kind: Kind::Select, tables: &["shop.t1"], flags: &[], procedural: true },
    MariaCase { sql: "end if", kind: Kind::Other, tables: &[], flags: &[], procedural: true },
    MariaCase { sql: "END", kind: Kind::Other, tables: &[], flags: &[], procedural: true },
    MariaCase { sql: "OPEN c(a_a)", kind: Kind::Other, tables: &[], flags: &[], procedural: true },
    MariaCase { sql: "return (select a from payroll limit 1)", kind: Kind::Select, tables: &["shop.payroll"], flags: &[], procedural: true },
    MariaCase { sql: "BEGIN NOT ATOMIC SELECT a FROM t1", kind: Kind::Select, tables: &["shop.t1"], flags: &[], procedural: true },
    MariaCase { sql: "signal sqlstate '45000' set message_text = 'x'", kind: Kind::Other, tables: &[], flags: &[], procedural: true },
    // SET STATEMENT ... FOR: decided as the statement it runs.
    MariaCase { sql: "SET STATEMENT sql_mode = '' FOR delete from payroll", kind: Kind::Delete, tables: &["+shop.payroll"], flags: &[Flag::SessionChange], procedural: false },
    MariaCase { sql: "SET STATEMENT myisam_sort_buffer_size=800000 FOR OPTIMIZE TABLE t1", kind: Kind::Other, tables: &["+shop.t1"], flags: &[Flag::SessionChange, Flag::Admin], procedural: false },
    MariaCase { sql: "SET STATEMENT sort_buffer_size=1 FOR SET STATEMENT sql_mode='' FOR SELECT a FROM t1", kind: Kind::Select, tables: &["shop.t1"], flags: &[Flag::SessionChange], procedural: false },
    // Rewrites: queries and writes.
    MariaCase { sql: "EXPLAIN EXTENDED WITH cte AS (SELECT * FROM t1) SELECT i FROM cte", kind: Kind::Explain, tables: &["shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "explain partitions select * from t1 where a < 1", kind: Kind::Explain, tables: &["shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "analyze format=json delete from t1 where a = 1", kind: Kind::Delete, tables: &["+shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "UPDATE t1, t2 SET t1.a = 200 WHERE t1.a = t2.a", kind: Kind::Update, tables: &["+shop.t1", "+shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "explain update t1, t2 set f = 126 order by f limit 2", kind: Kind::Explain, tables: &["+shop.t1", "+shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "delete ignore t11.*, t12.* from t11, t12 where t11.a = t12.a", kind: Kind::Delete, tables: &["+shop.t11", "+shop.t12"], flags: &[], procedural: false },
    MariaCase { sql: "select next value for s1, previous value for db2.s2", kind: Kind::Select, tables: &["db2.s2", "shop.s1"], flags: &[], procedural: false },
    MariaCase { sql: "insert into t1 values (next value for s1)", kind: Kind::Insert, tables: &["+shop.t1", "shop.s1"], flags: &[], procedural: false },
    MariaCase { sql: "select date_add(d, INTERVAL '1:1' MINUTE_SECOND), extract(YEAR_MONTH FROM d) from t1", kind: Kind::Select, tables: &["shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "select interval(qty, 2, 3) from t1 group by qty desc", kind: Kind::Select, tables: &["shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "select trim(leading from a), a sounds like 'x', a mod 2 from t1", kind: Kind::Select, tables: &["shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "SELECT a FROM t1 LIMIT 1 INTO @x, @y", kind: Kind::Select, tables: &["shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "(select 1) union (select a from t1) into @var", kind: Kind::Select, tables: &["shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "select * from (t1, t2) join (t3, t4) on (a < y and t2.b < t3.c)", kind: Kind::Select, tables: &["shop.t1", "shop.t2", "shop.t3", "shop.t4"], flags: &[], procedural: false },
    MariaCase { sql: "SELECT * FROM t1 LEFT JOIN (t2) ON (t1.pk = t2.fk)", kind: Kind::Select, tables: &["shop.t1", "shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "select t1.* from { oj t2 left outer join t1 on (t1.a = t2.a) }", kind: Kind::Select, tables: &["shop.t1", "shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "WITH RECURSIVE cte AS (SELECT 5 UNION SELECT @c:=@c+1 FROM cte WHERE @c<3) SELECT * FROM cte", kind: Kind::Select, tables: &[], flags: &[], procedural: false },
    MariaCase { sql: "SELECT user FROM payroll WHERE user=@u AND host=@`h`", kind: Kind::Select, tables: &["shop.payroll"], flags: &[], procedural: false },
    MariaCase { sql: "select count(*) over (order by a rows between 1 preceding and 1 following exclude current row) from t1", kind: Kind::Select, tables: &["shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "SELECT CHAR(0xff, 0x8f USING utf8), cast(2 as unsigned int), JSON_SET('{}', '$.a', _utf8 0xC3B6)", kind: Kind::Select, tables: &[], flags: &[], procedural: false },
    MariaCase { sql: "EXPLAIN EXTENDED SELECT STRAIGHT_JOIN t2.v2 FROM t1 STRAIGHT_JOIN t2", kind: Kind::Explain, tables: &["shop.t1", "shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "do (select count(*) from payroll)", kind: Kind::Select, tables: &["shop.payroll"], flags: &[], procedural: false },
    MariaCase { sql: "INSERT INTO t1 (a) SELECT 0 ON DUPLICATE KEY UPDATE a = a + VALUES (a)", kind: Kind::Update, tables: &["+shop.t1"], flags: &[], procedural: false },
    // Names that start with digits or hold `$`, variables after operators.
    MariaCase { sql: "create table 1ea10 (1a20 int,1e int)", kind: Kind::Ddl, tables: &["+shop.1ea10"], flags: &[], procedural: false },
    MariaCase { sql: "select 1ea10.1a20,1e+ 1e+10 from 1ea10", kind: Kind::Select, tables: &["shop.1ea10"], flags: &[], procedural: false },
    MariaCase { sql: "create table mysqltest.$test1 (a$1 int, $b int, c$ int)", kind: Kind::Ddl, tables: &["+mysqltest.$test1"], flags: &[], procedural: false },
    MariaCase { sql: "insert into mysqltest.$test1 values (1,2,3)", kind: Kind::Insert, tables: &["+mysqltest.$test1"], flags: &[], procedural: false },
    MariaCase { sql: "select a from t1 where a=@b and b<>@`c`", kind: Kind::Select, tables: &["shop.t1"], flags: &[], procedural: false },
    // A derived table in a multi-table UPDATE is read (MariaDB cannot
    // update through one).
    MariaCase { sql: "UPDATE IGNORE (SELECT 1 FROM t1 WHERE f1 = (select * from v1)) x, t3 SET t3.f1 = 1", kind: Kind::Update, tables: &["+shop.t3", "shop.t1", "shop.v1"], flags: &[], procedural: false },
    // CREATE TABLE filled by a parenthesised query or union.
    MariaCase { sql: "create table t4 (select a,b from t1) union (select a,b from t2) limit 2", kind: Kind::Ddl, tables: &["+shop.t4", "shop.t1", "shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "create table t1 (primary key (a)) (select 1 as a) union all (select a from t2)", kind: Kind::Ddl, tables: &["+shop.t1", "shop.t2"], flags: &[], procedural: false },
    MariaCase { sql: "create table t5 ( with recursive r (id) as (select id from folks union select id + 1 from r where id < 5) select * from r )", kind: Kind::Ddl, tables: &["+shop.t5", "shop.folks"], flags: &[], procedural: false },
    // Column forms: a qualified keyword, dynamic column types, PERSISTENT.
    MariaCase { sql: "create table t1 (t1.index int)", kind: Kind::Ddl, tables: &["+shop.t1"], flags: &[], procedural: false },
    MariaCase { sql: "create table t1 (c char(32) as (COLUMN_GET(d, 1 as char)) persistent, e blob as (COLUMN_CREATE(1, 'blue' as char(3) character set utf8)), n int, f char(32) as (convert(cast(n as char), char)) persistent, d blob)", kind: Kind::Ddl, tables: &["+shop.t1"], flags: &[], procedural: false },
    // A VALUES query where sqlparser reads no query.
    MariaCase { sql: "SET res=(VALUES(1) LIMIT unknown_ident)", kind: Kind::Select, tables: &[], flags: &[Flag::SessionChange], procedural: false },
    MariaCase { sql: "SET res=(VALUES(1), ((select a from payroll)) ORDER BY unknown_ident)", kind: Kind::Select, tables: &["shop.payroll"], flags: &[Flag::SessionChange], procedural: false },
    // Rewrites never rename a table nor lose the one altered (a reserved
    // word is a name after a qualifier).
    MariaCase { sql: "select * from shop.day_hour where a sounds like 'x' and d > now() - interval '1 1' day_hour", kind: Kind::Select, tables: &["shop.day_hour"], flags: &[], procedural: false },
    MariaCase { sql: "alter table if exists payroll add column x int", kind: Kind::Ddl, tables: &["+shop.payroll"], flags: &[], procedural: false },
    MariaCase { sql: "create table p9 (a int) values ((select a from payroll))", kind: Kind::Ddl, tables: &["+shop.p9", "shop.payroll"], flags: &[], procedural: false },
    MariaCase { sql: "create table p8 (a int) partition by hash(a) partitions 2 values ((select a from payroll))", kind: Kind::Ddl, tables: &["+shop.p8", "shop.payroll"], flags: &[], procedural: false },
    MariaCase { sql: "create table p10 (a int) partition by hash(a) partitions 2 as (select a from payroll)", kind: Kind::Ddl, tables: &["+shop.p10", "shop.payroll"], flags: &[], procedural: false },
];

#[test]
fn mariadb_forms() {
    let mut failures = Vec::new();
    for c in MARIA {
        let got = facts(c.sql, MY);
        let Some((f, _, _)) = got.first() else {
            failures.push(format!("{}: no statement", c.sql));
            continue;
        };
        let mut tables: Vec<String> = f
            .tables
            .iter()
            .map(|t| {
                if f.tables_written.contains(t) {
                    format!("+{t}")
                } else {
                    t.clone()
                }
            })
            .collect();
        tables.sort();
        let mut want: Vec<String> = c.tables.iter().map(|t| (*t).to_owned()).collect();
        want.sort();
        let flags: FlagSet = c.flags.iter().copied().collect();
        if got.len() != 1
            || f.unparsed
            || f.kind != c.kind
            || tables != want
            || f.flags != flags
            || f.procedural != c.procedural
        {
            failures.push(format!(
                "{}\n   got {} statement(s): kind {:?}, tables {tables:?}, flags {:?}, procedural {}, unparsed {:?}",
                c.sql,
                got.len(),
                f.kind,
                f.flags.iter().collect::<Vec<_>>(),
                f.procedural,
                f.parse_error
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// MySQL names that start with digits are quoted in the canonical text (so
/// no second reading takes them for numbers), `$` belongs to names, and `@`
/// always starts a variable; PostgreSQL's `$` forms are unchanged.
#[test]
fn mariadb_names_and_variables_lex_as_the_server_does() {
    let canon = |sql: &str, d: Dialect| {
        let mut out = String::new();
        normalize(
            sql,
            LexMode::default_for(d),
            false,
            &mut out,
            &mut Scratch::default(),
        );
        out
    };
    assert_eq!(
        canon("select * from t where a=@b", MY),
        "select * from t where a = @b"
    );
    assert_eq!(canon("select @c:=@c+1", MY), "select @c := @c + 0");
    assert_eq!(
        canon(
            "select t.1a20, 1ea10.1e5, 1e+ 1e+10, 1e5x, 1.5x, 0x1f, 0xzz, 1_000 from 1ea10",
            MY
        ),
        "select t . `1a20` , `1ea10` . `1e5` , `1e` + 0 , 0 x , 0 x , 0 , `0xzz` , `1_000` from `1ea10`"
    );
    assert_eq!(
        canon("select $t, a$1, c$ from db.$t", MY),
        "select $t , a$1 , c$ from db . $t"
    );
    assert_eq!(
        canon("select $1, $q$x$q$, a$b from t where c = 1.5", PG),
        "select $1 , '' , a$b from t where c = 0"
    );
}

/// `END` inside a body is not a transaction's end in MariaDB; `BEGIN`
/// alone still starts one.
#[test]
fn mariadb_end_is_not_commit() {
    let got = facts("end", MY);
    assert_eq!(got[0].1, Effect::None);
    let got = facts("begin", MY);
    assert_eq!(got[0].1, Effect::Begin);
    let got = facts("begin work", MY);
    assert_eq!(got[0].1, Effect::Begin);
}
