//! MySQL and MariaDB through the agent: a real MariaDB server, real
//! clients (the `mariadb` CLI, sysbench, mysql_async) in a test cgroup
//! whose connections the kernel programs redirect, and hostile peers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use interceptor_tests::{
    TestCgroup,
    mysql::{APP_PASSWORD, APP_USER, MariaDb, mariadb_in, mysql_policy, start_agent_with},
};

#[test]
fn mariadb_cli_reads_through_the_agent() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let agent = start_agent_with(&mysql_policy(db.port, "default: allow\n"), &cg, &[]);
    let out = mariadb_in(
        &cg,
        &db.client_args(APP_USER, APP_PASSWORD, "shop"),
        "SELECT name FROM items ORDER BY id",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "apple\npear\nfig\n");
    agent.wait_event("the query", |e| {
        e["event"] == "query" && e["query"] == "SELECT name FROM items ORDER BY id"
    });
}
