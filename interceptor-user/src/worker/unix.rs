//! The agent's unix listeners: one per unix target, at the path the kernel
//! redirects that target's connects to ([`crate::conn::unix_listener`]).
//!
//! Each is bound before the kernel learns its path (at start, and on a
//! reload before the targets change), so no redirected connect finds
//! nothing there. A successor agent binds its own over the same path
//! (rename), so the files are never removed at exit; a reload that drops a
//! target stops its listener and removes its file.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::sync::{mpsc::UnboundedSender, oneshot};

use crate::{
    conn::{Netns, bind_unix_listener, unix_bound_name, unix_listener},
    netns::{Listener, ServeListener},
    policy::TargetSpec,
};

struct Live {
    file: PathBuf,
    /// Bound, not yet handed to a worker.
    pending: Option<std::os::unix::net::UnixListener>,
    /// Dropping it stops the worker's accept loop.
    _stop: Option<oneshot::Sender<()>>,
}

/// The listeners of the unix targets in force.
pub struct UnixListeners {
    dir: PathBuf,
    live: Mutex<HashMap<u32, Live>>,
    worker: Mutex<Option<(UnboundedSender<ServeListener>, Arc<Netns>)>>,
}

impl UnixListeners {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            live: Mutex::new(HashMap::new()),
            worker: Mutex::new(None),
        }
    }

    /// Binds a listener for every unix target that has none, and stops
    /// those of targets gone.
    ///
    /// # Errors
    /// When a listener cannot be bound (the policy should then not take
    /// effect: its unix targets would be refused).
    pub fn sync(&self, targets: &[TargetSpec]) -> Result<(), String> {
        let mut live = self.live.lock().map_err(|_| "unix listeners lock")?;
        let mut wanted = Vec::new();
        for t in targets {
            let Some(path) = t.address.unix() else {
                continue;
            };
            let (id, file) = unix_listener(&self.dir, path);
            wanted.push(id);
            if live.contains_key(&id) {
                continue;
            }
            let bound = unix_bound_name(&self.dir, path);
            let listener = bind_unix_listener(&bound, &file).map_err(|e| {
                format!(
                    "target {:?}: cannot listen on {}: {e}",
                    t.name,
                    file.display()
                )
            })?;
            live.insert(
                id,
                Live {
                    file,
                    pending: Some(listener),
                    _stop: None,
                },
            );
        }
        let gone: Vec<u32> = live
            .keys()
            .filter(|id| !wanted.contains(id))
            .copied()
            .collect();
        for id in gone {
            if let Some(l) = live.remove(&id) {
                let _ = std::fs::remove_file(&l.file);
            }
        }
        drop(live);
        self.hand_over();
        Ok(())
    }

    /// From now on, listeners go to this worker, serving in `home`.
    pub fn serve_with(&self, worker: UnboundedSender<ServeListener>, home: Arc<Netns>) {
        if let Ok(mut w) = self.worker.lock() {
            *w = Some((worker, home));
        }
        self.hand_over();
    }

    fn hand_over(&self) {
        let Ok(worker) = self.worker.lock() else {
            return;
        };
        let Some((tx, home)) = worker.as_ref() else {
            return;
        };
        let Ok(mut live) = self.live.lock() else {
            return;
        };
        for (id, l) in live.iter_mut() {
            let Some(listener) = l.pending.take() else {
                continue;
            };
            let (stop, rx) = oneshot::channel();
            let sent = tx.send(ServeListener {
                listener: Listener::Unix {
                    listener,
                    listen_id: *id,
                },
                netns: Arc::clone(home),
                stop: rx,
            });
            if sent.is_ok() {
                l._stop = Some(stop);
            }
        }
    }
}
