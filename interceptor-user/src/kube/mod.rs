//! Kubernetes Services as targets (`service: NAMESPACE/NAME`, `port:`):
//! the agent, running in a pod of the cluster, LISTs and WATCHes the
//! Service and its EndpointSlices through the API server and keeps the
//! target's addresses (ClusterIPs at the Service port, ready endpoints at
//! the endpoint port) in the policy's shared state; the caller puts them in
//! the kernel's targets map.
//!
//! Both the ClusterIP and the endpoints are redirected because a workload's
//! `connect()` may carry either: kube-proxy rewrites the ClusterIP after the
//! socket hook, a socket-level load balancer (Cilium's) before it.

mod api;
mod client;
mod watch;

use std::path::PathBuf;

pub use client::{Client, InCluster};
pub use watch::{Report, Watchers};

use crate::policy::PolicyFile;

/// Where the service account's token and CA are mounted in a pod.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Overrides [`SA_DIR`]: for tests only (a fake API server's CA and token).
pub const SA_DIR_ENV: &str = "INTERCEPTOR_K8S_SA_DIR";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The agent does not run in a cluster (or its pod has no service
    /// account mounted).
    #[error(
        "service targets need the agent to run in a Kubernetes pod with a service account: {0}"
    )]
    NotInCluster(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("the cluster CA {path} holds no usable certificate")]
    BadCa { path: PathBuf },
    #[error("API server {addr}: {message}")]
    Connect { addr: String, message: String },
    /// The resource version is too old: LIST again.
    #[error("resource version expired (410 Gone)")]
    Gone,
    #[error("API server answered {code}: {message}")]
    Status { code: u16, message: String },
    #[error("malformed API reply: {0}")]
    Malformed(String),
    #[error("API reply larger than {0} bytes")]
    TooLarge(usize),
    #[error("API server {0}")]
    Timeout(&'static str),
}

/// Refuses a policy naming a `service:` target when the agent cannot
/// watch Services (not in a cluster): at start, on reload and in
/// `policy check`.
///
/// # Errors
/// The first Service target and why it cannot be watched here.
pub fn check_policy(file: &PolicyFile) -> Result<(), String> {
    let Some((_, t, svc)) = file.service_targets().next() else {
        return Ok(());
    };
    InCluster::detect()
        .map(drop)
        .map_err(|e| format!("target {:?} (service {}): {e}", t.name, svc.key()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn outside_a_cluster_service_targets_are_refused() {
        let p = PolicyFile::parse(
            "version: 1\ntargets:\n  - {name: db, protocol: postgres, service: prod/pg, port: 5432}\n",
            Path::new("p.yaml"),
        )
        .unwrap();
        // Unit tests never run in a pod with these set.
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            let err = check_policy(&p).unwrap_err();
            assert!(
                err.contains("\"db\"")
                    && err.contains("prod/pg")
                    && err.contains("KUBERNETES_SERVICE_HOST is not set"),
                "{err}"
            );
        }
        let plain = PolicyFile::parse(
            "version: 1\ntargets:\n  - {name: db, protocol: postgres, address: 10.0.0.1:5432}\n",
            Path::new("p.yaml"),
        )
        .unwrap();
        assert!(check_policy(&plain).is_ok());
    }
}
