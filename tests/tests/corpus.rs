//! Parser coverage on the servers' own test suites (issue 22): every
//! statement of PostgreSQL's regression suite and of the MariaDB test-suite
//! files in `tests/data/corpus/` that the real server accepts must be
//! parsed by the agent into facts (`policy test` with `on_parse_error:
//! deny` reports none unparsed).
//!
//! "Accepted" is the server's own verdict: each statement runs, in file
//! order, on one connection per file in a database of its own; it counts
//! unless the server's parser refused it (PostgreSQL: an error raised in
//! its grammar or scanner, by the error's source file; MariaDB: 1064 and
//! 1149). A statement that fails for a missing object or data counts.
//!
//! `INTERCEPTOR_CORPUS_FILES=a,b` limits a run to some files (by name).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use futures_util::{SinkExt as _, StreamExt as _};
use interceptor_tests::{PgServer, agent_bin, mysql::MariaDb, run_any};
use serde_json::Value;

/// One statement of a corpus file.
struct Statement {
    line: u64,
    sql: String,
}

/// The server's verdict on one statement.
enum Verdict {
    Accepted,
    /// Refused by the server's parser.
    Syntax,
    /// Failed after parsing.
    Failed,
}

/// Source files of PostgreSQL's raw parser: an error raised there is the
/// grammar refusing the text, whatever its SQLSTATE.
const PG_PARSER_FILES: [&str; 4] = ["gram.y", "scan.l", "parser.c", "scansup.c"];

fn corpus_dir(dialect: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/corpus")
        .join(dialect)
}

fn corpus(dialect: &str) -> Vec<(String, Vec<Statement>)> {
    let only: Option<Vec<String>> = std::env::var("INTERCEPTOR_CORPUS_FILES")
        .ok()
        .map(|v| v.split(',').map(ToOwned::to_owned).collect());
    let mut files: Vec<PathBuf> = fs::read_dir(corpus_dir(dialect))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            if only.as_ref().is_some_and(|o| !o.contains(&name)) {
                return None;
            }
            let statements = fs::read_to_string(&p)
                .unwrap()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    Statement {
                        line: v["line"].as_u64().unwrap(),
                        sql: v["sql"].as_str().unwrap().to_owned(),
                    }
                })
                .collect();
            Some((name, statements))
        })
        .collect()
}

/// What the agent made of one accepted statement.
struct Unparsed {
    file: String,
    line: u64,
    reason: String,
    sql: String,
}

/// Why the agent gives for statements whose SQL exists only at run time
/// (`PREPARE s FROM @var`, `EXECUTE IMMEDIATE @var`, and the EXECUTE of
/// such a statement, which the agent refused to prepare): no parser can
/// know what they run, so they stay unparsed by design and are counted
/// apart.
const RUN_TIME_SQL: [&str; 3] = [
    "prepared statement text is not a literal",
    "of text built at run time",
    "which this session did not prepare",
];

/// Decides the accepted statements of one file in one `policy test`
/// session; returns the unparsed ones, and counts those that run SQL
/// built at run time in `run_time`.
fn unparsed(
    policy: &Path,
    file: &str,
    accepted: &[(&Statement, Verdict)],
    work: &Path,
    run_time: &mut usize,
) -> Vec<Unparsed> {
    let messages = work.join(format!("{file}.messages"));
    let mut text = String::new();
    for (s, _) in accepted {
        text.push_str(&serde_json::to_string(&s.sql).unwrap());
        text.push('\n');
    }
    fs::write(&messages, text).unwrap();
    let out = run_any(
        Command::new(agent_bin())
            .args(["policy", "test", "--target", "db", "--json", "--policy"])
            .arg(policy)
            .arg("--messages")
            .arg(&messages),
    );
    assert!(
        out.status.success(),
        "{file}: policy test failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        accepted.len(),
        "{file}: one verdict per message"
    );
    let mut missed = Vec::new();
    for ((s, _), line) in accepted.iter().zip(lines) {
        let v: Value = serde_json::from_str(line).unwrap();
        for st in v["statements"].as_array().unwrap() {
            if st["unparsed"] != true {
                continue;
            }
            let reason = st["parse_error"].as_str().unwrap_or("").to_owned();
            if RUN_TIME_SQL.iter().any(|r| reason.contains(r)) {
                *run_time += 1;
                break;
            }
            missed.push(Unparsed {
                file: file.to_owned(),
                line: s.line,
                reason,
                sql: s.sql.clone(),
            });
            break;
        }
    }
    missed
}

/// Runs every file through `run` (the server's verdicts) and the agent,
/// prints coverage per file, and fails listing what was left unparsed.
fn check(dialect: &str, protocol: &str, mut run: impl FnMut(&str, &[Statement]) -> Vec<Verdict>) {
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.yaml");
    fs::write(
        &policy,
        format!(
            "version: 1\ntargets:\n  - name: db\n    protocol: {protocol}\n    address: 127.0.0.1:1\non_parse_error: deny\ndefault: allow\n"
        ),
    )
    .unwrap();
    let mut report = String::new();
    let mut missed = Vec::new();
    let (mut total, mut total_accepted, mut total_run_time) = (0, 0, 0);
    let started = Instant::now();
    for (file, statements) in corpus(dialect) {
        let verdicts = run(&file, &statements);
        let accepted: Vec<(&Statement, Verdict)> = statements
            .iter()
            .zip(verdicts)
            .filter(|(_, v)| !matches!(v, Verdict::Syntax))
            .collect();
        let mut run_time = 0;
        let miss = if accepted.is_empty() {
            Vec::new()
        } else {
            unparsed(&policy, &file, &accepted, work.path(), &mut run_time)
        };
        let judged = accepted.len() - run_time;
        let parsed = judged - miss.len();
        let _ = writeln!(
            report,
            "{file:<32} {:>6} {:>9} {:>8} {:>7} {:>7.2}%",
            statements.len(),
            accepted.len(),
            run_time,
            parsed,
            100.0 * parsed as f64 / judged.max(1) as f64
        );
        total += statements.len();
        total_accepted += accepted.len();
        total_run_time += run_time;
        missed.extend(miss);
    }
    let judged = total_accepted - total_run_time;
    let parsed = judged - missed.len();
    println!(
        "{dialect} corpus: {total} statements, {total_accepted} accepted by the server ({total_run_time} run SQL built at run time), {parsed} of the other {judged} parsed ({:.2}%), in {:.0?}\n{:<32} {:>6} {:>9} {:>8} {:>7} {:>8}\n{report}",
        100.0 * parsed as f64 / judged.max(1) as f64,
        started.elapsed(),
        "file",
        "total",
        "accepted",
        "run-time",
        "parsed",
        "coverage"
    );
    let mut list = String::new();
    for m in missed.iter().take(60) {
        let _ = writeln!(
            list,
            "{}:{}: {}\n    {}",
            m.file,
            m.line,
            m.reason,
            m.sql
                .replace('\n', " ")
                .chars()
                .take(300)
                .collect::<String>()
        );
    }
    assert!(
        missed.is_empty(),
        "{} accepted statements were left unparsed:\n{list}",
        missed.len()
    );
}

fn is_copy(sql: &str, direction: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    lower.trim_start().starts_with("copy") && lower.contains(direction)
}

async fn pg_connect(server: &PgServer, db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host_path(server.socket_dir())
        .port(server.port)
        .user("postgres")
        .dbname(db)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
        .batch_execute("set statement_timeout = '10s'; set lock_timeout = '2s'")
        .await
        .unwrap();
    client
}

async fn pg_run(client: &tokio_postgres::Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    if is_copy(sql, "from stdin") || is_copy(sql, "from stdout") {
        let sink = client.copy_in::<_, bytes::Bytes>(sql).await?;
        futures_util::pin_mut!(sink);
        sink.close().await?;
        return Ok(());
    }
    if is_copy(sql, "to stdout") {
        let stream = client.copy_out(sql).await?;
        futures_util::pin_mut!(stream);
        while let Some(chunk) = stream.next().await {
            chunk?;
        }
        return Ok(());
    }
    client.simple_query(sql).await.map(drop)
}

#[test]
fn postgres_regression_statements_are_parsed() {
    let server = PgServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut n = 0;
    check("postgres", "postgres", |file, statements| {
        n += 1;
        let db = format!("corpus_{n}");
        server.sql(&format!("create database {db}"));
        rt.block_on(async {
            let mut client = pg_connect(&server, &db).await;
            let mut verdicts = Vec::with_capacity(statements.len());
            for s in statements {
                let r = tokio::time::timeout(Duration::from_secs(30), pg_run(&client, &s.sql))
                    .await
                    .unwrap_or_else(|_| panic!("{file}:{}: no answer in 30 s", s.line));
                verdicts.push(match r {
                    Ok(()) => Verdict::Accepted,
                    Err(e) => match e.as_db_error() {
                        Some(d)
                            if *d.code() == tokio_postgres::error::SqlState::SYNTAX_ERROR
                                || d.file().is_some_and(|f| PG_PARSER_FILES.contains(&f)) =>
                        {
                            Verdict::Syntax
                        }
                        _ => Verdict::Failed,
                    },
                });
                if client.is_closed() {
                    client = pg_connect(&server, &db).await;
                }
            }
            verdicts
        })
    });
}

#[test]
fn mariadb_test_suite_statements_are_parsed() {
    use mysql_async::prelude::Queryable as _;
    let server = MariaDb::start();
    // Many scripts name `test.t1` or run `use test`, as mysql-test's own
    // server has it.
    server.sql("create database if not exists test");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let opts = |db: &str| -> mysql_async::Opts {
        mysql_async::OptsBuilder::default()
            .socket(Some(server.socket.to_string_lossy().into_owned()))
            .user(Some("root"))
            .db_name(Some(db.to_owned()))
            .into()
    };
    let mut n = 0;
    check("mariadb", "mysql", |file, statements| {
        n += 1;
        let db = format!("corpus_{n}");
        server.sql(&format!("create database {db}"));
        rt.block_on(async {
            let connect = || async {
                let mut c = mysql_async::Conn::new(opts(&db)).await.unwrap();
                c.query_drop("set session max_statement_time = 10")
                    .await
                    .unwrap();
                c
            };
            let mut conn = connect().await;
            let mut verdicts = Vec::with_capacity(statements.len());
            for s in statements {
                let r = tokio::time::timeout(Duration::from_secs(30), conn.query_drop(&s.sql))
                    .await
                    .unwrap_or_else(|_| panic!("{file}:{}: no answer in 30 s", s.line));
                verdicts.push(match r {
                    Ok(()) => Verdict::Accepted,
                    Err(mysql_async::Error::Server(e)) if matches!(e.code, 1064 | 1149) => {
                        Verdict::Syntax
                    }
                    Err(mysql_async::Error::Server(_)) => Verdict::Failed,
                    Err(_) => {
                        conn = connect().await;
                        Verdict::Failed
                    }
                });
            }
            let _ = conn.disconnect().await;
            verdicts
        })
    });
}
