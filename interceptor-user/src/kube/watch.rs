//! One task per watched Service (and Service port): LIST the Service and
//! its EndpointSlices, then WATCH both from the listed resource versions;
//! on each event the target's addresses are worked out again and a change
//! is reported. A watch that ends is resumed; 410 Gone means LIST again;
//! any other failure is reported, the last good addresses stay, and the
//! task LISTs again after a backoff.

use std::{
    convert::Infallible,
    fmt::Write as _,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use tokio::{sync::mpsc, task::AbortHandle};

use super::{
    InCluster, KubeError,
    api::{EndpointSlice, Event, List, Service, ServiceView, parse_event, parse_list},
    client::{Client, WATCH_SECONDS, WatchStream},
};
use crate::policy::{NameChange, PolicyFile, ServiceAddress, TargetDest};

const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A watch the server ends sooner than this is treated as a failure (so a
/// misbehaving server cannot make the agent spin).
const MIN_WATCH: Duration = Duration::from_secs(1);
/// More EndpointSlices than any Service has (100 endpoints each by
/// default): a bound on what a peer can make the agent hold.
const MAX_SLICES: usize = 10_000;
/// Bounds the initial LIST of a policy load, which the load waits for.
const FIRST_LIST: Duration = Duration::from_secs(10);

/// What a watcher learned, for the agent to audit and put in the kernel.
#[derive(Debug)]
pub enum Report {
    Changed {
        target: String,
        service: ServiceAddress,
        change: NameChange,
    },
    /// The last good addresses stay in force.
    Failed {
        target: String,
        service: ServiceAddress,
        error: String,
    },
}

struct Running {
    service: ServiceAddress,
    target: Arc<Mutex<String>>,
    task: AbortHandle,
}

/// The watchers of the Services the policies name.
pub struct Watchers {
    mark: u32,
    client: Mutex<Option<Arc<Client>>>,
    tx: mpsc::UnboundedSender<Report>,
    running: Mutex<Vec<Running>>,
}

impl Watchers {
    /// Watchers whose reports arrive on the receiver; their sockets carry
    /// `mark`.
    #[must_use]
    pub fn new(mark: u32) -> (Self, mpsc::UnboundedReceiver<Report>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                mark,
                client: Mutex::new(None),
                tx,
                running: Mutex::new(Vec::new()),
            },
            rx,
        )
    }

    fn client(&self) -> Result<Arc<Client>, KubeError> {
        let mut c = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = c.as_ref() {
            return Ok(Arc::clone(c));
        }
        let client = Arc::new(Client::new(InCluster::detect()?, self.mark));
        *c = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Before `file` is published: each of its Service targets shares the
    /// addresses of the same Service already watched, or is LISTed now
    /// (within a bound; a failure is reported and leaves it empty while
    /// its watcher retries) and gets a watcher.
    ///
    /// # Errors
    /// When the file names a Service and the agent is not in a cluster.
    pub async fn prepare(&self, file: &mut PolicyFile) -> Result<(), KubeError> {
        for t in &mut file.targets {
            let TargetDest::Service(svc) = &mut t.address else {
                continue;
            };
            let existing = self
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .find(|r| r.service == *svc)
                .map(|r| (r.service.clone(), Arc::clone(&r.target)));
            if let Some((watched, name)) = existing {
                svc.adopt(&watched);
                t.name
                    .clone_into(&mut name.lock().unwrap_or_else(PoisonError::into_inner));
                continue;
            }
            let watch = Watch {
                service: svc.clone(),
                target: Arc::new(Mutex::new(t.name.clone())),
                client: self.client()?,
                tx: self.tx.clone(),
            };
            let first = match tokio::time::timeout(FIRST_LIST, watch.list()).await {
                Ok(listed) => listed.ok(),
                Err(_) => {
                    watch.failed(format!("no LIST reply within {}s", FIRST_LIST.as_secs()));
                    None
                }
            };
            let target = Arc::clone(&watch.target);
            let task = tokio::spawn(watch.run(first)).abort_handle();
            self.running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Running {
                    service: svc.clone(),
                    target,
                    task,
                });
        }
        Ok(())
    }

    /// Stops the watchers of Services `file` (the policy in force) does not
    /// name.
    pub fn retain(&self, file: &PolicyFile) {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|r| {
                let keep = file.service_targets().any(|(_, _, s)| s.shares(&r.service));
                if !keep {
                    r.task.abort();
                }
                keep
            });
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for r in self
            .running
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            r.task.abort();
        }
    }
}

struct Watch {
    service: ServiceAddress,
    target: Arc<Mutex<String>>,
    client: Arc<Client>,
    tx: mpsc::UnboundedSender<Report>,
}

struct Listed {
    view: ServiceView,
    services_rv: String,
    slices_rv: String,
}

#[derive(Clone, Copy)]
enum Kind {
    Services,
    Slices,
}

/// A resource version as a query value (they are opaque strings).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

impl Watch {
    fn target(&self) -> String {
        self.target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The collection path and selector for one kind; with `rv`, a WATCH
    /// from that resource version.
    fn path(&self, kind: Kind, rv: Option<&str>) -> String {
        let (ns, name) = (&self.service.namespace, &self.service.name);
        // Namespace and name are DNS labels (checked at load): no escaping.
        let mut p = match kind {
            Kind::Services => {
                format!("/api/v1/namespaces/{ns}/services?fieldSelector=metadata.name%3D{name}")
            }
            Kind::Slices => format!(
                "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3D{name}"
            ),
        };
        if let Some(rv) = rv {
            let _ = write!(
                p,
                "&watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={}",
                encode(rv)
            );
        }
        p
    }

    fn send(&self, r: Report) {
        // The receiver goes only when the agent stops.
        let _ = self.tx.send(r);
    }

    fn failed(&self, error: String) {
        self.service.fail(error.clone());
        self.send(Report::Failed {
            target: self.target(),
            service: self.service.clone(),
            error,
        });
    }

    /// Works out the addresses from `view` and records them; a Service
    /// that is gone or lacks the port keeps the last good addresses
    /// (reported once per distinct error).
    fn publish(&self, view: &ServiceView) {
        match view.addresses(&self.service.key(), self.service.port) {
            Ok(addrs) => {
                let change = self.service.apply(&addrs, SystemTime::now());
                if !change.is_empty() {
                    self.send(Report::Changed {
                        target: self.target(),
                        service: self.service.clone(),
                        change,
                    });
                }
            }
            Err(e) => {
                if self.service.state().last_error.as_deref() != Some(e.as_str()) {
                    self.failed(e);
                }
            }
        }
    }

    async fn list_inner(&self) -> Result<Listed, KubeError> {
        let services: List<Service> = parse_list(
            &self.client.list(&self.path(Kind::Services, None)).await?,
            "ServiceList",
        )?;
        let slices: List<EndpointSlice> = parse_list(
            &self.client.list(&self.path(Kind::Slices, None)).await?,
            "EndpointSliceList",
        )?;
        if slices.items.len() > MAX_SLICES {
            return Err(KubeError::Malformed(format!(
                "more than {MAX_SLICES} EndpointSlices"
            )));
        }
        Ok(Listed {
            view: ServiceView {
                service: services
                    .items
                    .into_iter()
                    .find(|s| s.metadata.name == self.service.name),
                slices: slices
                    .items
                    .into_iter()
                    .map(|s| (s.metadata.name.clone(), s))
                    .collect(),
            },
            services_rv: services.metadata.resource_version,
            slices_rv: slices.metadata.resource_version,
        })
    }

    /// LISTs both and records the addresses; a failure is reported.
    async fn list(&self) -> Result<Listed, KubeError> {
        match self.list_inner().await {
            Ok(l) => {
                self.publish(&l.view);
                Ok(l)
            }
            Err(e) => {
                self.failed(format!("list: {e}"));
                Err(e)
            }
        }
    }

    async fn run(self, mut first: Option<Listed>) {
        let mut backoff = MIN_BACKOFF;
        let mut wait = first.is_none();
        loop {
            if wait {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            wait = true;
            let listed = match first.take() {
                Some(l) => l,
                None => match self.list().await {
                    Ok(l) => l,
                    Err(_) => continue,
                },
            };
            let started = Instant::now();
            let Err(e) = self.watch(listed).await;
            if started.elapsed() > Duration::from_secs(60) {
                backoff = MIN_BACKOFF;
            }
            match e {
                KubeError::Gone => {
                    tracing::debug!(service = %self.service.key(), "watch expired: listing again");
                    tokio::time::sleep(MIN_BACKOFF / 5).await;
                    wait = false;
                }
                e => self.failed(format!("watch: {e}")),
            }
        }
    }

    async fn open(&self, kind: Kind, rv: &str) -> Result<(WatchStream, Instant), KubeError> {
        Ok((
            self.client.watch(&self.path(kind, Some(rv))).await?,
            Instant::now(),
        ))
    }

    /// Follows both watches until one fails.
    async fn watch(&self, listed: Listed) -> Result<Infallible, KubeError> {
        let Listed {
            mut view,
            mut services_rv,
            mut slices_rv,
        } = listed;
        let mut services = self.open(Kind::Services, &services_rv).await?;
        let mut slices = self.open(Kind::Slices, &slices_rv).await?;
        loop {
            let (kind, line) = tokio::select! {
                l = services.0.next_line() => (Kind::Services, l?),
                l = slices.0.next_line() => (Kind::Slices, l?),
            };
            let Some(line) = line else {
                // The server ended the watch (its timeout): resume from the
                // last resource version seen.
                let (stream, rv) = match kind {
                    Kind::Services => (&mut services, &services_rv),
                    Kind::Slices => (&mut slices, &slices_rv),
                };
                if stream.1.elapsed() < MIN_WATCH {
                    return Err(KubeError::Malformed("the watch ended at once".into()));
                }
                *stream = self.open(kind, rv).await?;
                continue;
            };
            match kind {
                Kind::Services => match parse_event::<Service>(&line)? {
                    Event::Added(s) | Event::Modified(s) => {
                        s.metadata.resource_version.clone_into(&mut services_rv);
                        if s.metadata.name == self.service.name {
                            view.service = Some(s);
                        }
                    }
                    Event::Deleted(s) => {
                        s.metadata.resource_version.clone_into(&mut services_rv);
                        if s.metadata.name == self.service.name {
                            view.service = None;
                        }
                    }
                    Event::Bookmark(rv) => services_rv = rv,
                },
                Kind::Slices => match parse_event::<EndpointSlice>(&line)? {
                    Event::Added(s) | Event::Modified(s) => {
                        s.metadata.resource_version.clone_into(&mut slices_rv);
                        if view.slices.len() >= MAX_SLICES
                            && !view.slices.contains_key(&s.metadata.name)
                        {
                            return Err(KubeError::Malformed(format!(
                                "more than {MAX_SLICES} EndpointSlices"
                            )));
                        }
                        view.slices.insert(s.metadata.name.clone(), s);
                    }
                    Event::Deleted(s) => {
                        s.metadata.resource_version.clone_into(&mut slices_rv);
                        view.slices.remove(&s.metadata.name);
                    }
                    Event::Bookmark(rv) => slices_rv = rv,
                },
            }
            self.publish(&view);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_versions_are_escaped() {
        assert_eq!(encode("48213"), "48213");
        assert_eq!(encode("a b&c=d"), "a%20b%26c%3Dd");
    }
}
