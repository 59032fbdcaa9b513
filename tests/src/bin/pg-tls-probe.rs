//! A PostgreSQL client speaking TLS by hand, run inside a test cgroup:
//! direct TLS as PostgreSQL 17 clients send it (the installed libpq 15
//! cannot), and the bad inputs the agent must survive.
//!
//! `pg-tls-probe MODE HOST PORT [ARG]`, modes:
//! - `direct CA_FILE` / `direct-no-alpn CA_FILE`: TLS first (ALPN
//!   `postgresql`, or none), verified against CA_FILE for HOST; startup as
//!   postgres; prints the result of `select 'direct-ok'`;
//! - `plaintext-after-s`: SSLRequest, then a plain startup packet after `S`;
//! - `pipelined`: SSLRequest and a startup packet in one write;
//! - `garbage`: a TLS record header followed by junk;
//! - `stall`: SSLRequest, then silence until the agent gives up.
//!
//! Prints what came back; exit status 0 unless the probe itself failed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Instant};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

fn startup() -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0postgres\0database\0postgres\0\0");
    let mut out = u32::try_from(body.len() + 4)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    out.extend(body);
    out
}

fn ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&8u32.to_be_bytes());
    out[4..].copy_from_slice(&80_877_103u32.to_be_bytes());
    out
}

fn query(sql: &str) -> Vec<u8> {
    let mut out = vec![b'Q'];
    out.extend_from_slice(&u32::try_from(sql.len() + 5).unwrap().to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out
}

/// Reads messages until ReadyForQuery; returns (tag, body) pairs.
async fn until_ready<S: AsyncRead + Unpin>(s: &mut S) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.expect("read message header");
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.expect("read message body");
        let done = head[0] == b'Z';
        out.push((head[0], body));
        if done {
            return out;
        }
    }
}

/// Everything until the peer closes (or 30 s pass).
async fn drain<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), s.read_to_end(&mut out)).await;
    out
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(&startup()).await.unwrap();
    for (tag, body) in until_ready(s).await {
        assert_ne!(
            tag,
            b'E',
            "startup failed: {}",
            String::from_utf8_lossy(&body)
        );
    }
    s.write_all(&query("select 'direct-ok'")).await.unwrap();
    for (tag, body) in until_ready(s).await {
        match tag {
            // DataRow: 1 column, length, value.
            b'D' => println!("{}", String::from_utf8_lossy(&body[6..])),
            b'E' => panic!("query failed: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, host, port) = (&args[0], &args[1], &args[2]);
    let mut tcp = TcpStream::connect(format!("{host}:{port}")).await.unwrap();
    match mode.as_str() {
        "direct" | "direct-no-alpn" => {
            let pem = std::fs::read(&args[3]).unwrap();
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
                roots.add(c.unwrap()).unwrap();
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            if mode == "direct" {
                config.alpn_protocols = vec![b"postgresql".to_vec()];
            }
            let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let mut tls = match connector.connect(name, tcp).await {
                Ok(t) => t,
                Err(e) => {
                    println!("handshake failed: {e}");
                    std::process::exit(2);
                }
            };
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            eprintln!("alpn: {:?}", alpn.map(String::from_utf8));
            if mode == "direct" {
                session(&mut tls).await;
            } else {
                println!(
                    "reply: {:?}",
                    String::from_utf8_lossy(&drain(&mut tls).await)
                );
            }
        }
        "plaintext-after-s" => {
            tcp.write_all(&ssl_request()).await.unwrap();
            let mut s = [0u8; 1];
            tcp.read_exact(&mut s).await.unwrap();
            assert_eq!(s[0], b'S', "agent answered {:?}", char::from(s[0]));
            tcp.write_all(&startup()).await.unwrap();
            let reply = drain(&mut tcp).await;
            // A TLS alert record (type 21) or nothing: never a session.
            println!("reply: {reply:?}");
        }
        "pipelined" => {
            let mut both = ssl_request().to_vec();
            both.extend(startup());
            tcp.write_all(&both).await.unwrap();
            println!("reply: {}", String::from_utf8_lossy(&drain(&mut tcp).await));
        }
        "garbage" => {
            tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8])
                .await
                .unwrap();
            println!("reply: {:?}", drain(&mut tcp).await);
        }
        "stall" => {
            tcp.write_all(&ssl_request()).await.unwrap();
            let started = Instant::now();
            let reply = drain(&mut tcp).await;
            println!(
                "reply: {:?} closed after {} s",
                String::from_utf8_lossy(&reply),
                started.elapsed().as_secs()
            );
        }
        other => panic!("unknown mode {other}"),
    }
}
