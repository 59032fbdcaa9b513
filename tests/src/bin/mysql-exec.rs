//! Runs inside a test cgroup for `tests/tests/executions.rs`: executions
//! of server-side prepared statements through the agent, with
//! mysql_async: INSERT (one of them a duplicate key), SELECT, UPDATE,
//! DELETE, and text queries with rows and an error. Prints `ok` at the end.
//!
//! Usage: mysql-exec PORT USER PASSWORD
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mysql_async::{
    Conn, Error, OptsBuilder,
    prelude::{Query as _, Queryable as _},
};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().unwrap().parse().unwrap();
    let user = args.next().unwrap();
    let password = args.next().unwrap();
    let opts = OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some(user))
        .pass(Some(password))
        .db_name(Some("shop"))
        .prefer_socket(false)
        .stmt_cache_size(Some(16));
    let mut conn = Conn::new(opts).await.unwrap();
    "DROP TABLE IF EXISTS exec_items"
        .ignore(&mut conn)
        .await
        .unwrap();
    "CREATE TABLE exec_items (id INT PRIMARY KEY, v VARCHAR(8))"
        .ignore(&mut conn)
        .await
        .unwrap();
    let insert = conn
        .prep("INSERT INTO exec_items VALUES (?, ?)")
        .await
        .unwrap();
    for i in 1..=5 {
        conn.exec_drop(&insert, (i, "a")).await.unwrap();
    }
    match conn.exec_drop(&insert, (1, "dup")).await {
        Err(Error::Server(e)) if e.code == 1062 => {}
        other => panic!("expected a duplicate key, got {other:?}"),
    }
    conn.close(insert).await.unwrap();
    let rows: Vec<i32> = conn
        .exec("SELECT id FROM exec_items WHERE id > ?", (0,))
        .await
        .unwrap();
    assert_eq!(rows.len(), 5);
    conn.exec_drop("UPDATE exec_items SET v = 'b' WHERE id < ?", (3,))
        .await
        .unwrap();
    assert_eq!(conn.affected_rows(), 2);
    conn.exec_drop("DELETE FROM exec_items WHERE id = ?", (5,))
        .await
        .unwrap();
    assert_eq!(conn.affected_rows(), 1);
    let ids: Vec<i32> = "SELECT id FROM exec_items".fetch(&mut conn).await.unwrap();
    assert_eq!(ids.len(), 4);
    match "INSERT INTO exec_items VALUES (1, 'dup')"
        .ignore(&mut conn)
        .await
    {
        Err(Error::Server(e)) if e.code == 1062 => {}
        other => panic!("expected a duplicate key, got {other:?}"),
    }
    conn.disconnect().await.unwrap();
    println!("ok");
}
