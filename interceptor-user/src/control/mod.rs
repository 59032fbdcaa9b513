//! The control socket: a Unix stream socket speaking one JSON request line
//! and one JSON response line per connection (a streaming request, such as
//! `tail` with `follow`, then gets one JSON line per item until either side
//! closes). Every operator subcommand goes through it.
//!
//! The caller's uid, gid and pid come from `SO_PEERCRED`, never from the
//! request: they are the actor recorded for every command that changes
//! something.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
};

use crate::{approval::GrantScope, conn::Caller};

pub mod approvals;
pub mod metrics;
pub mod tail;

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach the agent at {path}: {source} (is `interceptor run` up? set --control-socket or INTERCEPTOR_CONTROL_SOCKET)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad response from the agent: {0}")]
    BadResponse(String),
    #[error("agent refused: {0}")]
    Refused(String),
    #[error("cannot bind control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// Recent audit records, then (with `follow`) live ones.
    Tail {
        #[serde(default)]
        filter: tail::Filter,
        #[serde(default = "ten")]
        last: usize,
        #[serde(default)]
        follow: bool,
    },
    /// Workloads with live connections.
    Identities,
    /// Kill switch: refuse and close a workload's connections.
    Block {
        selector: String,
        #[serde(default)]
        reason: Option<String>,
    },
    Unblock {
        selector: String,
    },
    /// The active blocks.
    Blocks,
    /// Pending approvals.
    ApprovalsList,
    /// Approve a pending statement (optionally with a standing grant).
    Approve {
        id: String,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        grant: Option<GrantScope>,
        /// Grant length in seconds.
        #[serde(default)]
        for_secs: Option<u64>,
    },
    /// Deny a pending statement.
    Deny {
        id: String,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Standing grants.
    GrantsList,
    /// Revoke a grant.
    GrantRevoke {
        id: String,
    },
}

const fn ten() -> usize {
    10
}

/// What a handler answers.
pub enum Reply {
    /// One response line.
    Value(Value),
    /// A first response line, then one line per item until the sender is
    /// dropped or the caller hangs up.
    Stream {
        first: Value,
        items: tokio::sync::mpsc::Receiver<Value>,
    },
}

impl From<Value> for Reply {
    fn from(v: Value) -> Self {
        Self::Value(v)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Response {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Answers requests; implemented by the agent.
pub trait Handler: Send + Sync + 'static {
    /// # Errors
    /// A message for the caller when the request cannot be served.
    fn handle(&self, caller: &Caller, req: Request) -> Result<Reply, String>;
}

/// Group that may use the control socket, when it exists on the host.
pub const SOCKET_GROUP: &str = "interceptor";

/// Binds the socket (replacing a stale one) with mode 0660, owned by the
/// group `interceptor` when that group exists.
///
/// # Errors
/// When the directory or socket cannot be created.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if StdUnixStream::connect(path).is_ok() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another agent is listening there",
        )));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Ok(Some(group)) = nix::unistd::Group::from_name(SOCKET_GROUP) {
        nix::unistd::chown(path, None, Some(group.gid))
            .map_err(|e| err(std::io::Error::from(e)))?;
    }
    Ok(listener)
}

/// Serves requests until the task is dropped.
pub async fn serve(listener: UnixListener, handler: Arc<dyn Handler>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    if let Err(e) = serve_one(stream, handler).await {
                        tracing::debug!("control client: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("control accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_one(stream: UnixStream, handler: Arc<dyn Handler>) -> std::io::Result<()> {
    let caller = stream
        .peer_cred()
        .map(|c| Caller::from_ids(c.uid(), c.gid(), c.pid()));
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await;
    let reply = match (read, caller) {
        (_, Err(e)) => Err(format!("cannot identify the caller (SO_PEERCRED): {e}")),
        (Err(_), _) => Err("timed out waiting for a request".to_owned()),
        (Ok(Err(e)), _) => Err(format!("unreadable request: {e}")),
        (Ok(Ok(_)), _) if !line.ends_with('\n') => Err(format!(
            "request must be one line of at most {MAX_REQUEST} bytes"
        )),
        (Ok(Ok(_)), Ok(caller)) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Err(format!("bad request: {e}")),
            Ok(req) => handler.handle(&caller, req),
        },
    };
    let (response, items) = match reply {
        Ok(Reply::Value(data)) => (Response::data(data), None),
        Ok(Reply::Stream { first, items }) => (Response::data(first), Some(items)),
        Err(e) => (Response::error(e), None),
    };
    write_line(&mut write, &response).await?;
    if let Some(mut items) = items {
        // The caller hanging up (EOF or error on its side) ends the stream.
        let mut hangup = [0u8; 1];
        let mut read = reader.into_inner().into_inner();
        loop {
            tokio::select! {
                item = items.recv() => match item {
                    Some(v) => write_line(&mut write, &v).await?,
                    None => break,
                },
                _ = read.read(&mut hangup) => break,
            }
        }
    }
    write.shutdown().await
}

async fn write_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    value: &impl Serialize,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(value).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    write.write_all(&out).await
}

impl Response {
    fn data(data: Value) -> Self {
        Self {
            ok: true,
            data: Some(data),
            error: None,
        }
    }

    fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            data: None,
            error: Some(msg.into()),
        }
    }
}

/// Sends one request and returns the agent's data.
///
/// # Errors
/// When the agent cannot be reached, answers garbage, or refuses.
pub fn request(path: &Path, req: &Request) -> Result<Value, ControlError> {
    request_stream(path, req).map(|(data, _)| data)
}

/// Sends one request; returns the agent's data and the stream of items
/// that follow it (empty unless the request streams).
///
/// # Errors
/// When the agent cannot be reached, answers garbage, or refuses.
pub fn request_stream(path: &Path, req: &Request) -> Result<(Value, Items), ControlError> {
    let stream = StdUnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::BadResponse(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    let resp: Response =
        serde_json::from_str(&answer).map_err(|e| ControlError::BadResponse(e.to_string()))?;
    if !resp.ok {
        return Err(ControlError::Refused(resp.error.unwrap_or_default()));
    }
    // Streams may be quiet for a long time.
    reader.get_ref().set_read_timeout(None)?;
    Ok((resp.data.unwrap_or(Value::Null), Items { reader }))
}

/// The items of a streaming reply, one JSON value per line.
pub struct Items {
    reader: BufReader<StdUnixStream>,
}

impl Iterator for Items {
    type Item = Result<Value, ControlError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line).map_err(|e| ControlError::BadResponse(e.to_string())),
            ),
            Err(e) => Some(Err(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, caller: &Caller, req: Request) -> Result<Reply, String> {
            match req {
                Request::Tail { .. } | Request::Identities => Err("no".into()),
                Request::Block { .. } | Request::Unblock { .. } | Request::Blocks => {
                    Err("not served by this test handler".into())
                }
                Request::Status => {
                    let (tx, items) = tokio::sync::mpsc::channel(4);
                    let uid = caller.uid;
                    tokio::spawn(async move {
                        for i in 0..3 {
                            let _ = tx.send(serde_json::json!({ "i": i })).await;
                        }
                    });
                    Ok(Reply::Stream {
                        first: serde_json::json!({"up": true, "uid": uid}),
                        items,
                    })
                }
                _ => Err("not in this test".into()),
            }
        }
    }

    #[tokio::test]
    async fn round_trip_and_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = bind(&path).unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(Echo)));
        let p = path.clone();
        let (data, items) = tokio::task::spawn_blocking(move || {
            let (data, items) = request_stream(&p, &Request::Status)?;
            Ok::<_, ControlError>((data, items.collect::<Result<Vec<_>, _>>()?))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(data["up"], true);
        // The caller is who the kernel says it is.
        assert_eq!(data["uid"], nix::unistd::getuid().as_raw());
        assert_eq!(items.len(), 3);
        assert_eq!(items[2]["i"], 2);
        // Garbage gets an error answer, and the server keeps serving.
        let p = path.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let s = StdUnixStream::connect(&p).unwrap();
            (&s).write_all(b"{\"cmd\":\"explode\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
        assert!(answer.contains("\"ok\":false"), "{answer}");
        let p = path.clone();
        assert!(
            tokio::task::spawn_blocking(move || request(&p, &Request::Status))
                .await
                .unwrap()
                .is_ok()
        );
        // A second agent may not steal a live socket.
        assert!(bind(&path).is_err());
        server.abort();
    }
}
