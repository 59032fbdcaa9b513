//! The in-cluster API client: HTTP/1.1 (hyper) over TLS (rustls), the API
//! server verified against the service account's CA, the service
//! account's bearer token on every request. One connection per request:
//! a LIST or a long-lived WATCH, so there is nothing to pool.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::net::TcpSocket;

use super::{KubeError, SA_DIR, SA_DIR_ENV, api::Status};

/// Largest LIST reply read (a Service, or EndpointSlices of a few
/// thousand endpoints, is far smaller).
const MAX_LIST: usize = 32 * 1024 * 1024;
/// Largest single watch event (one object).
const MAX_EVENT: usize = 4 * 1024 * 1024;
/// Largest error body read for its message.
const MAX_ERROR: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// For the reply's head, and for a whole LIST.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The API server ends a watch after `timeoutSeconds` and sends bookmarks
/// meanwhile; silence for longer means the connection is dead.
pub const WATCH_SECONDS: u64 = 290;
const WATCH_IDLE: Duration = Duration::from_secs(WATCH_SECONDS + 30);

/// How to reach the API server from inside a pod.
#[derive(Clone, Debug)]
pub struct InCluster {
    pub host: String,
    pub port: u16,
    pub token: PathBuf,
    pub ca: PathBuf,
}

impl InCluster {
    /// What the kubelet gives every pod: `KUBERNETES_SERVICE_HOST` and
    /// `_PORT`, and the service account's token and CA files.
    ///
    /// # Errors
    /// [`KubeError::NotInCluster`], saying what is missing.
    pub fn detect() -> Result<Self, KubeError> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| KubeError::NotInCluster(format!("{name} is not set")))
        };
        let host = var("KUBERNETES_SERVICE_HOST")?;
        let port = var("KUBERNETES_SERVICE_PORT")?;
        let port: u16 = port.parse().map_err(|_| {
            KubeError::NotInCluster(format!("KUBERNETES_SERVICE_PORT {port:?} is not a port"))
        })?;
        let dir = std::env::var_os(SA_DIR_ENV).map_or_else(|| PathBuf::from(SA_DIR), PathBuf::from);
        let (token, ca) = (dir.join("token"), dir.join("ca.crt"));
        for f in [&token, &ca] {
            std::fs::metadata(f).map_err(|e| {
                KubeError::NotInCluster(format!(
                    "no service account credentials at {}: {e}",
                    f.display()
                ))
            })?;
        }
        Ok(Self {
            host,
            port,
            token,
            ca,
        })
    }

    /// `host:port` for the Host header (an IPv6 host in brackets).
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Reads the files afresh for each connection: the kubelet rotates the
/// token, and the CA may be rotated too.
fn tls_config(ca: &Path) -> Result<Arc<ClientConfig>, KubeError> {
    let pem = std::fs::read(ca).map_err(|source| KubeError::Read {
        path: ca.to_owned(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots
        .add_parsable_certificates(CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok));
    if added == 0 {
        return Err(KubeError::BadCa {
            path: ca.to_owned(),
        });
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| KubeError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The API client.
#[derive(Debug)]
pub struct Client {
    cluster: InCluster,
    /// SO_MARK on the agent's sockets, so the kernel programs never
    /// redirect them.
    mark: u32,
}

impl Client {
    #[must_use]
    pub fn new(cluster: InCluster, mark: u32) -> Self {
        Self { cluster, mark }
    }

    fn connect_err(&self, message: impl ToString) -> KubeError {
        KubeError::Connect {
            addr: self.cluster.authority(),
            message: message.to_string(),
        }
    }

    /// GETs `path` (with its query); returns the reply if it is 200 OK.
    async fn get(&self, path: &str) -> Result<Response<Incoming>, KubeError> {
        let c = &self.cluster;
        let token = std::fs::read_to_string(&c.token).map_err(|source| KubeError::Read {
            path: c.token.clone(),
            source,
        })?;
        let tls = tokio_rustls::TlsConnector::from(tls_config(&c.ca)?);
        let name = ServerName::try_from(c.host.clone())
            .map_err(|_| self.connect_err("KUBERNETES_SERVICE_HOST is not a host name"))?;
        let addr: SocketAddr = tokio::net::lookup_host((c.host.as_str(), c.port))
            .await
            .map_err(|e| self.connect_err(e))?
            .next()
            .ok_or_else(|| self.connect_err("no address"))?;
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| self.connect_err(e))?;
        if self.mark != 0 {
            socket2::SockRef::from(&sock)
                .set_mark(self.mark)
                .map_err(|e| self.connect_err(format!("SO_MARK: {e}")))?;
        }
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr))
            .await
            .map_err(|_| KubeError::Timeout("did not accept the connection"))?
            .map_err(|e| self.connect_err(e))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
            .await
            .map_err(|_| KubeError::Timeout("did not finish the TLS handshake"))?
            .map_err(|e| self.connect_err(format!("TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.connect_err(e))?;
        // Ends when the reply's body is read or dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(path)
            .header(header::HOST, c.authority())
            .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("interceptor/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.connect_err(e))?;
        let resp = tokio::time::timeout(REPLY_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| KubeError::Timeout("did not answer"))?
            .map_err(|e| self.connect_err(e))?;
        if resp.status() == StatusCode::OK {
            return Ok(resp);
        }
        let code = resp.status().as_u16();
        let body = tokio::time::timeout(
            REPLY_TIMEOUT,
            Limited::new(resp.into_body(), MAX_ERROR).collect(),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
        let status: Status = serde_json::from_slice(&body).unwrap_or_default();
        Err(if code == 410 || status.code == 410 {
            KubeError::Gone
        } else {
            KubeError::Status {
                code,
                message: if status.message.is_empty() {
                    String::from_utf8_lossy(&body).chars().take(200).collect()
                } else {
                    status.message
                },
            }
        })
    }

    /// A LIST: the whole reply body.
    ///
    /// # Errors
    /// Connection, TLS, HTTP and size errors.
    pub async fn list(&self, path: &str) -> Result<Bytes, KubeError> {
        tokio::time::timeout(REPLY_TIMEOUT, async {
            let resp = self.get(path).await?;
            Limited::new(resp.into_body(), MAX_LIST)
                .collect()
                .await
                .map(http_body_util::Collected::to_bytes)
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        KubeError::TooLarge(MAX_LIST)
                    } else {
                        self.connect_err(e)
                    }
                })
        })
        .await
        .map_err(|_| KubeError::Timeout("did not finish a LIST reply"))?
    }

    /// A WATCH: its events, one JSON object per line.
    ///
    /// # Errors
    /// As [`Client::list`].
    pub async fn watch(&self, path: &str) -> Result<WatchStream, KubeError> {
        let resp = self.get(path).await?;
        Ok(WatchStream {
            body: resp.into_body(),
            buf: Vec::new(),
            addr: self.cluster.authority(),
        })
    }
}

/// The lines of a WATCH reply.
#[derive(Debug)]
pub struct WatchStream {
    body: Incoming,
    buf: Vec<u8>,
    /// The API server, for errors.
    addr: String,
}

impl WatchStream {
    /// The next event line; `None` when the server ended the watch.
    /// Cancel-safe: a call dropped while waiting loses nothing.
    ///
    /// # Errors
    /// A broken connection, silence past the watch timeout, or a line
    /// longer than the event limit.
    pub async fn next_line(&mut self) -> Result<Option<Vec<u8>>, KubeError> {
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf) {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.buf.len() > MAX_EVENT {
                return Err(KubeError::TooLarge(MAX_EVENT));
            }
            match tokio::time::timeout(WATCH_IDLE, self.body.frame()).await {
                Err(_) => return Err(KubeError::Timeout("went silent on a watch")),
                Ok(None) if self.buf.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                Ok(None) => return Ok(Some(std::mem::take(&mut self.buf))),
                Ok(Some(Err(e))) => {
                    return Err(KubeError::Connect {
                        addr: self.addr.clone(),
                        message: format!("watch broken: {e}"),
                    });
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
