//! Runs inside a test cgroup: exercises a real Rust driver (tokio-postgres)
//! through the agent and prints one `ok NAME` line per scenario; any
//! failure panics (non-zero exit) with context.
//!
//! Usage: pg-driver HOST PORT
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, TryStreamExt as _, pin_mut};
use tokio_postgres::{NoTls, SimpleQueryMessage, error::SqlState};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (client, _) = interceptor_tests::pg_client_from_args().await;

    client
        .batch_execute("DROP TABLE IF EXISTS items; CREATE TABLE items (id int primary key, name text, data bytea)")
        .await
        .unwrap();

    // Prepared statements, reused, with binary results.
    let insert = client
        .prepare("INSERT INTO items VALUES ($1, $2, $3)")
        .await
        .unwrap();
    for i in 0..20i32 {
        client
            .execute(
                &insert,
                &[
                    &i,
                    &format!("item {i}"),
                    &vec![0u8, 1, 2, u8::try_from(i).unwrap()],
                ],
            )
            .await
            .unwrap();
    }
    let row = client
        .query_one("SELECT id, data FROM items WHERE id = $1", &[&7i32])
        .await
        .unwrap();
    let (id, data): (i32, Vec<u8>) = (row.get(0), row.get(1));
    assert_eq!((id, data), (7, vec![0, 1, 2, 7]));
    println!("ok prepared");

    // Pipelining: several queries in flight at once on one connection.
    let stmt = client
        .prepare("SELECT name FROM items WHERE id = $1")
        .await
        .unwrap();
    let (a, b, c) = tokio::join!(
        client.query_one(&stmt, &[&1i32]),
        client.query_one(&stmt, &[&2i32]),
        client.query_one(&stmt, &[&3i32]),
    );
    let names: Vec<String> = [a, b, c].into_iter().map(|r| r.unwrap().get(0)).collect();
    assert_eq!(names, ["item 1", "item 2", "item 3"]);
    println!("ok pipeline");

    // A denial in the middle of a pipeline: only that query fails.
    let (a, b, c) = tokio::join!(
        client.query_one(&stmt, &[&4i32]),
        client.query("SELECT * FROM secrets", &[]),
        client.query_one(&stmt, &[&5i32]),
    );
    assert_eq!(a.unwrap().get::<_, String>(0), "item 4");
    let err = b.expect_err("secrets must be denied");
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{err:?}"
    );
    let msg = err.as_db_error().unwrap().message().to_owned();
    assert!(
        msg.contains("no-secrets") && msg.contains("decision"),
        "{msg}"
    );
    assert_eq!(c.unwrap().get::<_, String>(0), "item 5");
    println!("ok pipeline-denial");

    // COPY in and out.
    let sink = client
        .copy_in("COPY items (id, name) FROM STDIN")
        .await
        .unwrap();
    pin_mut!(sink);
    let mut data = String::new();
    for i in 100..1100 {
        data.push_str(&format!("{i}\tcopied {i}\n"));
    }
    sink.send(Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1000);
    let stream = client
        .copy_out("COPY (SELECT id FROM items WHERE id >= 100 ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let text: String = chunks
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    assert_eq!(text.lines().count(), 1000);
    println!("ok copy");

    // Cancel a running pg_sleep: the CancelRequest goes through the agent too.
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(NoTls).await
    });
    let started = std::time::Instant::now();
    let err = client
        .simple_query("SELECT pg_sleep(30)")
        .await
        .expect_err("must be cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    canceller.await.unwrap().unwrap();
    println!("ok cancel");

    // Still usable, in a transaction, and simple queries.
    let rows = client
        .simple_query("BEGIN; SELECT count(*) FROM items; COMMIT")
        .await
        .unwrap();
    let count = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(count.as_deref(), Some("1020"));
    println!("ok usable");
}
