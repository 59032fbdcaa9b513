//! The control socket: a Unix stream socket speaking one JSON request line
//! and one JSON response line per connection. Every operator subcommand
//! goes through it.

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
    fn handle(&self, req: Request) -> Result<Value, String>;
}

/// Binds the socket (replacing a stale one) with mode 0660.
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
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await;
    let response = match read {
        Err(_) => Response::error("timed out waiting for a request"),
        Ok(Err(e)) => Response::error(format!("unreadable request: {e}")),
        Ok(Ok(_)) if !line.ends_with('\n') => Response::error(format!(
            "request must be one line of at most {MAX_REQUEST} bytes"
        )),
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::error(format!("bad request: {e}")),
            Ok(req) => match handler.handle(req) {
                Ok(data) => Response {
                    ok: true,
                    data: Some(data),
                    error: None,
                },
                Err(e) => Response::error(e),
            },
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

impl Response {
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
    let stream = StdUnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::BadResponse(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reader = BufReader::new(&stream);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    let resp: Response =
        serde_json::from_str(&answer).map_err(|e| ControlError::BadResponse(e.to_string()))?;
    if resp.ok {
        Ok(resp.data.unwrap_or(Value::Null))
    } else {
        Err(ControlError::Refused(resp.error.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, req: Request) -> Result<Value, String> {
            match req {
                Request::Status => Ok(serde_json::json!({"up": true})),
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
        let data = tokio::task::spawn_blocking(move || request(&p, &Request::Status))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(data["up"], true);
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
