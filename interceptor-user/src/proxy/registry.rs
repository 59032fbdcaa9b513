//! The live connections: who they belong to, what they have been told, and
//! a handle to end them. Touched once at connect and once at disconnect
//! (one short lock); per-statement counters are the connection's own
//! atomics, so the per-query path shares nothing with other connections.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::{
    conn::{CancelKey, ConnInfo},
    policy::Decision,
};

/// Statements decided on one connection, by decision.
#[derive(Debug, Default)]
pub struct DecisionCounts {
    allow: AtomicU64,
    approve: AtomicU64,
    deny: AtomicU64,
}

impl DecisionCounts {
    pub fn add(&self, d: Decision) {
        let c = match d {
            Decision::Allow => &self.allow,
            Decision::Approve => &self.approve,
            Decision::Deny => &self.deny,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// `[allow, approve, deny]`.
    #[must_use]
    pub fn get(&self) -> [u64; 3] {
        [
            self.allow.load(Ordering::Relaxed),
            self.approve.load(Ordering::Relaxed),
            self.deny.load(Ordering::Relaxed),
        ]
    }
}

/// One live connection.
#[derive(Debug)]
pub struct LiveConn {
    pub info: ConnInfo,
    pub opened: OffsetDateTime,
    pub decisions: DecisionCounts,
    /// Executions of its prepared statements (summary windows, total).
    pub executions: super::executions::Tally,
    session: Mutex<SessionFacts>,
    killed: AtomicBool,
    kill: Notify,
    kill_reason: Mutex<Option<String>>,
}

/// Facts the protocol learns after connect.
#[derive(Clone, Debug, Default)]
pub struct SessionFacts {
    pub db_user: String,
    pub database: String,
    pub cancel: Option<CancelKey>,
    /// The agent logged in for the workload (a `logins:` entry).
    pub brokered: bool,
}

impl LiveConn {
    #[must_use]
    pub fn new(info: ConnInfo) -> Self {
        Self {
            info,
            opened: OffsetDateTime::now_utc(),
            decisions: DecisionCounts::default(),
            executions: super::executions::Tally::default(),
            session: Mutex::default(),
            killed: AtomicBool::new(false),
            kill: Notify::new(),
            kill_reason: Mutex::new(None),
        }
    }

    /// Updates the session facts.
    pub fn update(&self, f: impl FnOnce(&mut SessionFacts)) {
        f(&mut self.session.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Records how the server can cancel this connection's statement.
    pub fn set_cancel_key(&self, key: CancelKey) {
        self.update(|s| s.cancel = Some(key));
    }

    #[must_use]
    pub fn session(&self) -> SessionFacts {
        self.session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Asks the connection's handler to close it; the reason goes into its
    /// `disconnect` event. Idempotent.
    pub fn kill(&self, reason: &str) {
        if !self.killed.swap(true, Ordering::AcqRel) {
            *self
                .kill_reason
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(reason.to_owned());
            // A stored permit: a handler that is not waiting yet still sees it.
            self.kill.notify_one();
        }
    }

    #[must_use]
    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// Resolves once [`LiveConn::kill`] was called; returns its reason.
    pub async fn killed(&self) -> String {
        if !self.is_killed() {
            self.kill.notified().await;
        }
        self.kill_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default()
    }
}

/// Every live connection of the agent, by connection id.
#[derive(Debug, Default)]
pub struct Registry {
    conns: Mutex<HashMap<u64, Arc<LiveConn>>>,
}

impl Registry {
    /// Adds a connection; it is removed when the returned guard drops.
    #[must_use]
    pub fn insert(self: &Arc<Self>, info: ConnInfo) -> Registered {
        let live = Arc::new(LiveConn::new(info));
        self.lock().insert(live.info.id, Arc::clone(&live));
        Registered {
            registry: Arc::clone(self),
            live,
        }
    }

    /// A snapshot of the live connections.
    #[must_use]
    pub fn all(&self) -> Vec<Arc<LiveConn>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|c| c.info.id);
        v
    }

    #[must_use]
    pub fn get(&self, id: u64) -> Option<Arc<LiveConn>> {
        self.lock().get(&id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveConn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The workloads behind the live connections: connections of one
/// executable, user and cgroup grouped together (several processes of one
/// service are one workload), with the policy identities they match now.
#[must_use]
pub fn workloads(
    conns: &[Arc<LiveConn>],
    engine: &crate::policy::Engine,
) -> Vec<serde_json::Value> {
    use std::collections::BTreeMap;
    type Key = (Option<String>, Option<String>, u32, Option<String>);
    let mut groups: BTreeMap<Key, Vec<&Arc<LiveConn>>> = BTreeMap::new();
    for c in conns {
        let id = &c.info.identity;
        groups
            .entry((
                id.exe.clone(),
                id.exe_sha256.clone(),
                id.uid,
                id.cgroup.clone(),
            ))
            .or_default()
            .push(c);
    }
    groups
        .into_values()
        .filter_map(|members| {
            let first = members.first()?;
            let id = &first.info.identity;
            let mut pids: Vec<u32> = members.iter().map(|c| c.info.identity.tgid).collect();
            pids.sort_unstable();
            pids.dedup();
            let mut targets: Vec<&str> = members
                .iter()
                .map(|c| c.info.target.name.as_str())
                .collect();
            targets.sort_unstable();
            targets.dedup();
            let mut netns: Vec<u64> = members
                .iter()
                .map(|c| c.info.identity.netns_inode)
                .collect();
            netns.sort_unstable();
            netns.dedup();
            let mut totals = [0u64; 3];
            for c in &members {
                for (t, n) in totals.iter_mut().zip(c.decisions.get()) {
                    *t += n;
                }
            }
            let executions: u64 = members.iter().map(|c| c.executions.total()).sum();
            // Database users, each with how the workload logs in as it.
            let mut logins: Vec<(String, &str)> = members
                .iter()
                .map(|c| c.session())
                .filter(|s| !s.db_user.is_empty())
                .map(|s| {
                    let how = if s.brokered {
                        "brokered"
                    } else {
                        "passthrough"
                    };
                    (s.db_user, how)
                })
                .collect();
            logins.sort_unstable();
            logins.dedup();
            let logins: Vec<serde_json::Value> = logins
                .into_iter()
                .map(|(db_user, how)| serde_json::json!({"db_user": db_user, "login": how}))
                .collect();
            let since = members.iter().map(|c| c.opened).min()?;
            Some(serde_json::json!({
                "identities": engine.bind_identity(id).names,
                "user": id.user,
                "uid": id.uid,
                "comm": id.comm,
                "exe": id.exe,
                "exe_sha256": id.exe_sha256,
                "cgroup": id.cgroup,
                "unit": id.unit,
                "container": id.container,
                "pod_uid": id.pod_uid,
                "netns": netns,
                "pids": pids,
                "targets": targets,
                "connections": members.len(),
                "statements": {"allow": totals[0], "approve": totals[1], "deny": totals[2]},
                "executions": executions,
                "logins": logins,
                "since": crate::audit::format_ts(since),
            }))
        })
        .collect()
}

/// A connection's place in the registry, for as long as it lives.
pub struct Registered {
    registry: Arc<Registry>,
    pub live: Arc<LiveConn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.live.info.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64) -> ConnInfo {
        let target: crate::policy::TargetSpec =
            serde_yaml_ng::from_str("{name: pg, protocol: postgres, address: '127.0.0.1:5432'}")
                .unwrap();
        ConnInfo::new(
            id,
            target,
            "127.0.0.1:5432".parse().unwrap(),
            crate::identity::Identity::default(),
        )
    }

    #[tokio::test]
    async fn registers_counts_and_kills() {
        let reg = Arc::new(Registry::default());
        let a = reg.insert(info(1));
        {
            let _b = reg.insert(info(2));
            assert_eq!(reg.all().len(), 2);
        }
        assert_eq!(reg.all().len(), 1);
        a.live.decisions.add(Decision::Deny);
        a.live.decisions.add(Decision::Allow);
        a.live.decisions.add(Decision::Allow);
        assert_eq!(a.live.decisions.get(), [2, 0, 1]);
        // Killed before anyone waits: the waiter still sees it.
        reg.get(1).unwrap().kill("blocked");
        reg.get(1).unwrap().kill("again");
        assert_eq!(a.live.killed().await, "blocked");
        drop(a);
        assert!(reg.all().is_empty());
    }
}
