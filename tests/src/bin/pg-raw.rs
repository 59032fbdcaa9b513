//! Runs inside a test cgroup: a PostgreSQL client written against the wire
//! protocol (trust login as `postgres`), for the corners a driver hides:
//! pipelined queries, half-closes, a reset, a reader that stalls. Each mode
//! prints `ok MODE ...` with what it checked, and the socket's
//! `tcpi_bytes_received` (bytes that came by TCP, not past it).
//!
//! Usage: pg-raw HOST PORT MODE [ARG]
//! - `pipeline N`: N simple queries in one write; each answer in order.
//! - `terminated`: the server ends the session; its FATAL error, then EOF.
//! - `halfclose`: a query, Terminate and a write shutdown; EOF follows.
//! - `reset`: a query of 1 MB, then a close with RST before reading it.
//! - `readiness`: a query, then `poll` and `FIONREAD` before reading, as
//!   clients that check for input first do; prints both.
//! - `slow SECONDS`: a 51 MB result not read for SECONDS (prints `sent`
//!   first), then read whole and checked row by row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::fd::AsRawFd as _,
    time::Duration,
};

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(host: &str, port: &str) -> Self {
        let mut s = TcpStream::connect(format!("{host}:{port}")).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut body = 196_608u32.to_be_bytes().to_vec();
        for kv in ["user", "postgres", "database", "postgres", ""] {
            body.extend_from_slice(kv.as_bytes());
            body.push(0);
        }
        let mut startup = u32::try_from(body.len() + 4)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        startup.extend_from_slice(&body);
        s.write_all(&startup).unwrap();
        let mut c = Self { s, buf: Vec::new() };
        c.until_ready();
        c
    }

    /// The next message, or `None` at EOF.
    fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let m: Vec<u8> = self.buf.drain(..=len).collect();
                    return Some((m[0], m[5..].to_vec()));
                }
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("read");
            if n == 0 {
                assert!(self.buf.is_empty(), "EOF inside a message");
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn until_ready(&mut self) {
        loop {
            match self.next() {
                Some((b'Z', _)) => return,
                Some((b'E', e)) => panic!("error: {}", String::from_utf8_lossy(&e)),
                Some(_) => {}
                None => panic!("EOF before ReadyForQuery"),
            }
        }
    }

    /// The first column of every row up to ReadyForQuery, and the length
    /// of the second.
    fn rows(&mut self) -> Vec<(String, usize)> {
        let mut rows = Vec::new();
        loop {
            match self.next().expect("EOF before ReadyForQuery") {
                (b'D', d) => rows.push(columns(&d)),
                (b'Z', _) => return rows,
                (b'E', e) => panic!("error: {}", String::from_utf8_lossy(&e)),
                _ => {}
            }
        }
    }

    fn bytes_received(&self) -> u64 {
        // SAFETY: getsockopt into a zeroed tcp_info of the size passed.
        unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).unwrap();
            let r = libc::getsockopt(
                self.s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &raw mut len,
            );
            assert_eq!(r, 0, "TCP_INFO");
            info.tcpi_bytes_received
        }
    }
}

/// A DataRow's first column as text and its second column's length.
fn columns(d: &[u8]) -> (String, usize) {
    let n = u16::from_be_bytes([d[0], d[1]]);
    let mut at = 2;
    let mut first = String::new();
    let mut second = 0;
    for i in 0..n {
        let len = i32::from_be_bytes(d[at..at + 4].try_into().unwrap());
        at += 4;
        let len = usize::try_from(len.max(0)).unwrap();
        if i == 0 {
            first = String::from_utf8_lossy(&d[at..at + len]).into_owned();
        } else if i == 1 {
            second = len;
        }
        at += len;
    }
    (first, second)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (host, port, mode) = (&args[0], &args[1], args[2].as_str());
    let arg = args.get(3).map(String::as_str);
    match mode {
        "pipeline" => {
            let n: usize = arg.unwrap().parse().unwrap();
            let mut c = Conn::open(host, port);
            let mut all = Vec::new();
            for i in 0..n {
                all.extend(query(&format!("select {i}, repeat('y', {})", i % 97)));
            }
            c.s.write_all(&all).unwrap();
            for i in 0..n {
                let rows = c.rows();
                assert_eq!(rows, vec![(i.to_string(), i % 97)], "answer {i}");
            }
            println!("ok pipeline {n} bytes_received={}", c.bytes_received());
        }
        "terminated" => {
            let mut c = Conn::open(host, port);
            c.s.write_all(&query("select pg_terminate_backend(pg_backend_pid())"))
                .unwrap();
            let mut fatal = false;
            while let Some((tag, body)) = c.next() {
                if tag == b'E' && String::from_utf8_lossy(&body).contains("57P01") {
                    fatal = true;
                }
            }
            assert!(fatal, "no 57P01 before EOF");
            println!("ok terminated");
        }
        "halfclose" => {
            let mut c = Conn::open(host, port);
            let mut both = query("select 42");
            both.extend(message(b'X', &[]));
            c.s.write_all(&both).unwrap();
            c.s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rows = Vec::new();
            while let Some((tag, body)) = c.next() {
                if tag == b'D' {
                    rows.push(columns(&body).0);
                }
            }
            println!("ok halfclose rows={rows:?}");
        }
        "reset" => {
            let c = Conn::open(host, port);
            let mut s = c.s;
            s.write_all(&query("select repeat('z', 1000000)")).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
            println!("ok reset");
        }
        "readiness" => {
            let mut c = Conn::open(host, port);
            c.s.write_all(&query("select repeat('r', 5000)")).unwrap();
            let mut fds = [libc::pollfd {
                fd: c.s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd, its count passed.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) };
            std::thread::sleep(Duration::from_millis(50));
            let mut pending: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            let r = unsafe { libc::ioctl(c.s.as_raw_fd(), libc::FIONREAD, &raw mut pending) };
            assert_eq!(r, 0, "FIONREAD");
            let rows = c.rows();
            assert_eq!(rows, vec![(("r".repeat(5000)), 0)]);
            println!("ok readiness poll={ready} fionread={pending}");
        }
        "slow" => {
            let secs: u64 = arg.unwrap().parse().unwrap();
            let mut c = Conn::open(host, port);
            c.s.write_all(&query(
                "select i, repeat('s', 1000) from generate_series(1, 50000) i",
            ))
            .unwrap();
            println!("sent");
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(secs));
            let rows = c.rows();
            assert_eq!(rows.len(), 50_000);
            for (i, (first, len)) in rows.iter().enumerate() {
                assert_eq!((first.as_str(), *len), ((i + 1).to_string().as_str(), 1000));
            }
            println!(
                "ok slow rows={} bytes_received={}",
                rows.len(),
                c.bytes_received()
            );
        }
        other => panic!("unknown mode {other}"),
    }
}
