//! Opens N PostgreSQL connections (tokio-postgres), runs one query on each,
//! prints `ready N` and holds them idle until its stdin closes. For the
//! idle-connection memory benchmark.
//!
//! Usage: idle-conns HOST PORT N
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;

use futures_util::{StreamExt as _, stream};
use tokio_postgres::NoTls;

/// Connections opened at once.
const PARALLEL: usize = 32;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [host, port, n] = &args[..] else {
        panic!("usage: idle-conns HOST PORT N");
    };
    let n: usize = n.parse().expect("N");
    let conninfo = format!("host={host} port={port} user=postgres dbname=postgres");
    let clients: Vec<tokio_postgres::Client> = stream::iter(0..n)
        .map(|_| {
            let conninfo = conninfo.clone();
            async move {
                let (client, conn) = tokio_postgres::connect(&conninfo, NoTls)
                    .await
                    .expect("connect");
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        eprintln!("connection error: {e}");
                    }
                });
                client.simple_query("SELECT 1").await.expect("query");
                client
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    println!("ready {}", clients.len());
    // Held until the benchmark closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await
    .unwrap();
    drop(clients);
}
