//! Runs inside a test cgroup for `tests/tests/executions.rs`: executions
//! of prepared statements through the agent, with tokio-postgres.
//!
//! Usage:
//! - `pg-exec HOST PORT cases`: prepared INSERT, SELECT, UPDATE, DELETE,
//!   COPY, a portal fetched in parts, a constraint violation, a simple
//!   query; prints `ok` at the end.
//! - `pg-exec HOST PORT hold N`: executes a prepared SELECT N times, prints
//!   `ready`, then keeps the connection open until killed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, pin_mut};
use tokio_postgres::error::SqlState;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (mut client, args) = interceptor_tests::pg_client_from_args().await;
    match args.first().map(String::as_str) {
        Some("hold") => {
            let n: usize = args[1].parse().unwrap();
            let stmt = client.prepare("SELECT $1::int + 1").await.unwrap();
            for i in 0..n {
                let i = i32::try_from(i).unwrap();
                let row = client.query_one(&stmt, &[&i]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), i + 1);
            }
            println!("ready");
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Some("cases") => {
            client
                .batch_execute(
                    "DROP TABLE IF EXISTS exec_items; CREATE TABLE exec_items (id int primary key, v text)",
                )
                .await
                .unwrap();
            // INSERT: ten executions of one statement, a row each.
            let insert = client
                .prepare("INSERT INTO exec_items VALUES ($1, $2)")
                .await
                .unwrap();
            for i in 1..=10i32 {
                assert_eq!(client.execute(&insert, &[&i, &"a"]).await.unwrap(), 1);
            }
            // A constraint violation: the execution fails on the server.
            let err = client
                .execute(&insert, &[&1i32, &"dup"])
                .await
                .expect_err("duplicate key");
            assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{err:?}");
            // SELECT, all at once: 10 rows.
            let rows = client
                .query("SELECT id FROM exec_items WHERE id > $1", &[&0i32])
                .await
                .unwrap();
            assert_eq!(rows.len(), 10);
            // A portal fetched in parts: 3 + 3 + 3 + 1 rows.
            let tx = client.transaction().await.unwrap();
            let stmt = tx
                .prepare("SELECT id FROM exec_items WHERE id >= $1 ORDER BY id")
                .await
                .unwrap();
            let portal = tx.bind(&stmt, &[&1i32]).await.unwrap();
            let mut fetched = 0;
            loop {
                let part = tx.query_portal(&portal, 3).await.unwrap();
                fetched += part.len();
                if part.len() < 3 {
                    break;
                }
            }
            assert_eq!(fetched, 10);
            tx.commit().await.unwrap();
            // UPDATE 4 rows, DELETE 1.
            let n = client
                .execute("UPDATE exec_items SET v = 'b' WHERE id < $1", &[&5i32])
                .await
                .unwrap();
            assert_eq!(n, 4);
            let n = client
                .execute("DELETE FROM exec_items WHERE id = $1", &[&10i32])
                .await
                .unwrap();
            assert_eq!(n, 1);
            // COPY of 5 rows.
            let sink = client.copy_in("COPY exec_items FROM STDIN").await.unwrap();
            pin_mut!(sink);
            sink.send(Bytes::from_static(
                b"101\tc\n102\tc\n103\tc\n104\tc\n105\tc\n",
            ))
            .await
            .unwrap();
            assert_eq!(sink.finish().await.unwrap(), 5);
            // Simple protocol: the query record carries rows and errors.
            client
                .simple_query("SELECT id FROM exec_items WHERE id > 100")
                .await
                .unwrap();
            let err = client
                .simple_query("INSERT INTO exec_items VALUES (101, 'dup')")
                .await
                .expect_err("duplicate key");
            assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{err:?}");
            println!("ok");
        }
        other => panic!("unknown mode {other:?}"),
    }
}
