//! A redirected connection's facts, rendered once for all its audit events.

use std::{net::SocketAddr, sync::Arc};

use serde::Serialize;

use super::Netns;
use crate::{
    audit::{AuditEvent, DecisionFacts, ExecutionFacts},
    identity::Identity,
    policy::{Decision, TargetSpec},
};

/// The members of `query` records and of the records of executions: the
/// connection, and a part of its identity.
#[derive(Serialize)]
struct Fragment<'a, I> {
    conn: u64,
    target: &'a str,
    protocol: &'a str,
    identities: &'a [String],
    identity: I,
}

impl<I: Serialize> Fragment<'_, I> {
    fn render(conn: u64, target: &TargetSpec, identities: &[String], identity: I) -> String {
        serde_json::to_string(&Fragment {
            conn,
            target: &target.name,
            protocol: target.protocol.as_str(),
            identities,
            identity,
        })
        .unwrap_or_default()
    }
}

/// Where a redirected connection was going, and on whose behalf.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub id: u64,
    /// Shared by the connection's guard, its registry entry and its
    /// session: one copy per connection.
    pub target: Arc<TargetSpec>,
    pub dst: SocketAddr,
    pub identity: Arc<Identity>,
    /// Names of the policy's identities this workload matched at connect.
    pub identities: Arc<[String]>,
    /// The members above as JSON, rendered once for all of this
    /// connection's events.
    members: Arc<str>,
    /// The same with a short identity, for the records of executions
    /// (the whole identity is in the connection's `connect` record).
    short: Arc<str>,
    /// The same with a brief identity (`pid`, `tgid`, `uid`, `comm`), for
    /// `query` records: the per-statement record stays small; readers find
    /// the rest in the connection's `connect` (or `connection`) record.
    brief: Arc<str>,
    /// Metric labels: the target's name and the identity names joined.
    labels: (Arc<str>, Arc<str>),
    /// The workload's network namespace, where side connections (cancels)
    /// are made from; `None` in unit tests.
    pub netns: Option<Arc<Netns>>,
}

impl ConnInfo {
    #[must_use]
    pub fn new(id: u64, target: TargetSpec, dst: SocketAddr, identity: Identity) -> Self {
        Self::named(id, target, dst, identity, Vec::new())
    }

    /// With the names of the policy identities the workload matched.
    #[must_use]
    pub fn named(
        id: u64,
        target: TargetSpec,
        dst: SocketAddr,
        identity: Identity,
        identities: Vec<String>,
    ) -> Self {
        #[derive(Serialize)]
        struct Members<'a> {
            conn: u64,
            target: &'a str,
            protocol: &'a str,
            dst: String,
            identities: &'a [String],
            identity: &'a Identity,
        }
        let json = serde_json::to_string(&Members {
            conn: id,
            target: &target.name,
            protocol: target.protocol.as_str(),
            dst: target
                .address
                .unix()
                .map_or_else(|| dst.to_string(), |p| format!("unix:{}", p.display())),
            identities: &identities,
            identity: &identity,
        })
        .unwrap_or_default();
        #[derive(Serialize)]
        struct ShortIdentity<'a> {
            pid: u32,
            tgid: u32,
            uid: u32,
            gid: u32,
            user: Option<&'a str>,
            comm: &'a str,
            exe: Option<&'a str>,
            unit: Option<&'a str>,
            container: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct BriefIdentity<'a> {
            pid: u32,
            tgid: u32,
            uid: u32,
            comm: &'a str,
        }
        let short = Fragment::render(
            id,
            &target,
            &identities,
            ShortIdentity {
                pid: identity.pid,
                tgid: identity.tgid,
                uid: identity.uid,
                gid: identity.gid,
                user: identity.user.as_deref(),
                comm: &identity.comm,
                exe: identity.exe.as_deref(),
                unit: identity.unit.as_deref(),
                container: identity.container.as_deref(),
            },
        );
        let brief = Fragment::render(
            id,
            &target,
            &identities,
            BriefIdentity {
                pid: identity.pid,
                tgid: identity.tgid,
                uid: identity.uid,
                comm: &identity.comm,
            },
        );
        Self {
            id,
            members: Arc::from(crate::audit::members(&json)),
            short: Arc::from(crate::audit::members(&short)),
            brief: Arc::from(crate::audit::members(&brief)),
            labels: (
                Arc::from(target.name.as_str()),
                Arc::from(identities.join(",")),
            ),
            target: Arc::new(target),
            dst,
            identity: Arc::new(identity),
            identities: Arc::from(identities),
            netns: None,
        }
    }

    /// The same, reached from the workload's network namespace `netns`.
    #[must_use]
    pub fn in_netns(mut self, netns: Arc<Netns>) -> Self {
        self.netns = Some(netns);
        self
    }

    /// An audit event carrying this connection's fields.
    #[must_use]
    pub fn event(&self, event: &'static str) -> AuditEvent {
        AuditEvent::new(event).with_conn(self.id, Arc::clone(&self.members))
    }

    /// An audit event carrying this connection's id, target and a short
    /// identity (records of executions).
    #[must_use]
    pub fn short_event(&self, event: &'static str) -> AuditEvent {
        AuditEvent::new(event).with_conn(self.id, Arc::clone(&self.short))
    }

    /// What metrics count of `count` executions of a statement decided
    /// `decision`.
    #[must_use]
    pub fn execution_facts(&self, decision: Decision, count: u64) -> ExecutionFacts {
        ExecutionFacts {
            target: Arc::clone(&self.labels.0),
            identities: Arc::clone(&self.labels.1),
            decision,
            count,
        }
    }

    /// A `query` event of this connection (its identity brief), with what
    /// metrics count.
    #[must_use]
    pub fn query_event(&self, decision: Decision, eval_us: u64) -> AuditEvent {
        AuditEvent::new("query")
            .with_conn(self.id, Arc::clone(&self.brief))
            .with_decision(DecisionFacts {
                target: Arc::clone(&self.labels.0),
                identities: Arc::clone(&self.labels.1),
                decision,
                eval_us,
            })
    }
}
