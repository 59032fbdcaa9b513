//! `uring-probe HOST PORT SQL`: a workload that connects with io_uring's
//! `IORING_OP_CONNECT` instead of connect(2), then runs SQL over that
//! socket with tokio-postgres as user postgres. Prints `ok ROWS` or
//! `error SQLSTATE MESSAGE`, and the comm the kernel saw is the test's to
//! check. For the bypass tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, os::fd::AsRawFd as _};

use io_uring::{IoUring, opcode, types};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let host: std::net::IpAddr = args.next().unwrap().parse().unwrap();
    let port: u16 = args.next().unwrap().parse().unwrap();
    let sql = args.next().unwrap();
    let addr = SocketAddr::new(host, port);
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    let sa = socket2::SockAddr::from(addr);
    let mut ring = IoUring::new(4).unwrap();
    let op = opcode::Connect::new(types::Fd(sock.as_raw_fd()), sa.as_ptr().cast(), sa.len())
        .build()
        .user_data(7);
    // SAFETY: the socket and the address outlive the operation, which is
    // waited for right below.
    unsafe { ring.submission().push(&op).unwrap() };
    ring.submit_and_wait(1).unwrap();
    let cqe = ring.completion().next().unwrap();
    assert!(
        cqe.result() >= 0,
        "io_uring connect: {}",
        std::io::Error::from_raw_os_error(-cqe.result())
    );
    let stream: std::net::TcpStream = sock.into();
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::TcpStream::from_std(stream).unwrap();
    let (client, conn) = tokio_postgres::Config::new()
        .user("postgres")
        .dbname("postgres")
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    match client.simple_query(&sql).await {
        Ok(msgs) => {
            let rows = msgs
                .iter()
                .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                .count();
            println!("ok {rows}");
        }
        Err(e) => match e.as_db_error() {
            Some(db) => println!("error {} {}", db.code().code(), db.message()),
            None => println!("error - {e}"),
        },
    }
}
