//! A workload using mysql_async, run inside the test cgroup by
//! `tests/tests/mysql.rs`: server-side prepared statements, multi-statement
//! queries with a denied part, payloads over 16 MiB, transactions, session
//! resets. Prints `ok <case>` per case; panics with context on the first
//! surprise. Expects the policy of `driver_cases_through_the_agent`:
//! everything allowed but what touches `shop.secrets`.
//!
//! Usage: mysql-driver PORT USER PASSWORD
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mysql_async::{
    ChangeUserOpts, Conn, Error, OptsBuilder, TxOpts,
    prelude::{Query as _, Queryable as _},
};

fn denied(e: &Error) -> String {
    match e {
        Error::Server(s) if s.code == 1142 && s.state == "42000" => s.message.clone(),
        other => panic!("expected a denial (1142, 42000), got {other:?}"),
    }
}

async fn count(conn: &mut Conn, sql: &str) -> i64 {
    conn.query_first::<i64, _>(sql).await.unwrap().unwrap()
}

#[allow(clippy::too_many_lines)]
async fn run(port: u16, user: &str, password: &str) {
    let opts = OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some(user))
        .pass(Some(password))
        .db_name(Some("shop"))
        .prefer_socket(false)
        .stmt_cache_size(Some(16));
    let mut conn = Conn::new(opts).await.unwrap();
    println!("ok connect");

    // Server-side prepared statements: one prepare, several executes.
    let stmt = conn
        .prep("SELECT id, name FROM items WHERE id > ? ORDER BY id")
        .await
        .unwrap();
    let rows: Vec<(i32, String)> = conn.exec(&stmt, (1,)).await.unwrap();
    assert_eq!(rows, vec![(2, "pear".into()), (3, "fig".into())]);
    let rows: Vec<(i32, String)> = conn.exec(&stmt, (2,)).await.unwrap();
    assert_eq!(rows, vec![(3, "fig".into())]);
    conn.exec_drop("INSERT INTO log (note) VALUES (?)", ("prepared",))
        .await
        .unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT COUNT(*) FROM log WHERE note = 'prepared'"
        )
        .await,
        1
    );
    conn.close(stmt).await.unwrap();
    println!("ok prepared");

    // A refused prepare: nothing reaches the server, the session goes on.
    let e = conn
        .prep("SELECT secret FROM secrets WHERE id = ?")
        .await
        .unwrap_err();
    let msg = denied(&e);
    assert!(msg.contains("decision"), "{msg}");
    let rows: Vec<(i32, String)> = conn
        .exec("SELECT id, name FROM items WHERE id = ?", (1,))
        .await
        .unwrap();
    assert_eq!(rows, vec![(1, "apple".into())]);
    println!("ok prepare-denied");

    // Several statements in one COM_QUERY: all results come back...
    let mut result = conn
        .query_iter("SELECT 1; SELECT name FROM items WHERE id = 2; SELECT 3")
        .await
        .unwrap();
    let mut sets = Vec::new();
    while !result.is_empty() {
        let rows: Vec<String> = result.collect().await.unwrap();
        sets.push(rows);
    }
    assert_eq!(sets, vec![vec!["1"], vec!["pear"], vec!["3"]]);
    // ...and with a denied part, none of it runs.
    let e = conn
        .query_drop("INSERT INTO log (note) VALUES ('multi'); SELECT secret FROM secrets")
        .await
        .unwrap_err();
    denied(&e);
    assert_eq!(
        count(&mut conn, "SELECT COUNT(*) FROM log WHERE note = 'multi'").await,
        0
    );
    println!("ok multi-statement");

    // Over 16 MiB: a text query and a prepared statement's parameter (sent
    // as long data), each read back as a row of over 16 MiB.
    let big = 17 * 1024 * 1024 + 3;
    let text = "x".repeat(big);
    conn.query_drop(format!("INSERT INTO blobs VALUES (1, '{text}')"))
        .await
        .unwrap();
    let body: Vec<u8> = (0..big).map(|i| (i % 251) as u8).collect();
    conn.exec_drop("INSERT INTO blobs VALUES (2, ?)", (body.clone(),))
        .await
        .unwrap();
    let (len, back): (u64, Vec<u8>) = conn
        .query_first("SELECT LENGTH(body), body FROM blobs WHERE id = 1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((len, back.len()), (big as u64, big));
    assert!(back.iter().all(|b| *b == b'x'));
    let back: Vec<u8> = conn
        .exec_first("SELECT body FROM blobs WHERE id = ?", (2,))
        .await
        .unwrap()
        .unwrap();
    assert!(back == body, "16 MiB+ parameter came back different");
    println!("ok large-payload");

    // Transactions: rollback, commit, and a denial inside one (MySQL keeps
    // the transaction open after an error; so must the agent).
    let mut tx = conn.start_transaction(TxOpts::default()).await.unwrap();
    tx.query_drop("INSERT INTO log (note) VALUES ('rolled-back')")
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = conn.start_transaction(TxOpts::default()).await.unwrap();
    tx.exec_drop("INSERT INTO log (note) VALUES (?)", ("committed",))
        .await
        .unwrap();
    let e = tx
        .query_drop("SELECT secret FROM secrets")
        .await
        .unwrap_err();
    denied(&e);
    tx.query_drop("INSERT INTO log (note) VALUES ('after-denial')")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT COUNT(*) FROM log WHERE note IN ('committed', 'after-denial')"
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT COUNT(*) FROM log WHERE note = 'rolled-back'"
        )
        .await,
        0
    );
    println!("ok transaction");

    // COM_RESET_CONNECTION and COM_CHANGE_USER: statements prepared before
    // are gone on both sides; new ones work.
    conn.ping().await.unwrap();
    assert!(conn.reset().await.unwrap());
    let n: Option<i64> = conn
        .exec_first("SELECT COUNT(*) FROM items WHERE id < ?", (3,))
        .await
        .unwrap();
    assert_eq!(n, Some(2));
    conn.change_user(ChangeUserOpts::new().with_db_name(Some("sbtest".into())))
        .await
        .unwrap();
    let db: Option<String> = conn.query_first("SELECT DATABASE()").await.unwrap();
    assert_eq!(db.as_deref(), Some("sbtest"));
    // Qualified names still resolve; the denial still holds.
    let e = conn
        .query_drop("SELECT secret FROM shop.secrets")
        .await
        .unwrap_err();
    denied(&e);
    "USE shop".ignore(&mut conn).await.unwrap();
    let name: Option<String> = conn
        .exec_first("SELECT name FROM items WHERE id = ?", (3,))
        .await
        .unwrap();
    assert_eq!(name.as_deref(), Some("fig"));
    println!("ok reset-and-change-user");

    conn.disconnect().await.unwrap();
    println!("ok done");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, port, user, password] = &args[..] else {
        panic!("usage: mysql-driver PORT USER PASSWORD");
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(port.parse().unwrap(), user, password));
}
