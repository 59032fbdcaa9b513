//! Runs inside a test cgroup: sends a statement held for approval through
//! the extended protocol (tokio-postgres: Parse/Describe/Sync, then
//! Bind/Execute/Sync) with a query pipelined behind it, and prints how
//! each ended: `ddl ok` or `ddl error SQLSTATE`, then `after N`.
//!
//! Usage: pg-held HOST PORT SQL
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tokio_postgres::NoTls;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let host = args.next().expect("host");
    let port = args.next().expect("port");
    let sql = args.next().expect("sql");
    let conninfo = format!("host={host} port={port} user=postgres dbname=postgres");
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .expect("connect");
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("connection error: {e}");
        }
    });
    // Both are sent before either answer arrives: the second waits behind
    // the held one, and runs after it either way.
    let (held, after) = tokio::join!(
        client.execute(sql.as_str(), &[]),
        client.query_one("SELECT 41 + $1::int", &[&1i32]),
    );
    match held {
        Ok(_) => println!("ddl ok"),
        Err(e) => println!("ddl error {}", e.code().map_or("none", |c| c.code())),
    }
    let n: i32 = after.expect("the pipelined query").get(0);
    println!("after {n}");
}
