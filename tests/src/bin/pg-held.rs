//! Runs inside a test cgroup: sends a statement held for approval through
//! the extended protocol (tokio-postgres: Parse/Describe/Sync, then
//! Bind/Execute/Sync) with a query pipelined behind it, and prints how
//! each ended: `ddl ok` or `ddl error SQLSTATE`, then `after N`.
//!
//! Usage: pg-held HOST PORT SQL
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (client, rest) = interceptor_tests::pg_client_from_args().await;
    let sql = rest.first().expect("usage: pg-held HOST PORT SQL").clone();
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
