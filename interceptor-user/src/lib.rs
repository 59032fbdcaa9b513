//! Interceptor: a host agent that puts every database statement of every
//! non-human workload through a policy decision. This library is the agent;
//! `main.rs` is its command line.

pub mod approval;
pub mod audit;
pub mod block;
pub mod blocklist;
pub mod cli;
pub mod conn;
pub mod control;
pub mod ebpf;
pub mod handover;
pub mod identity;
pub mod kube;
#[cfg(test)]
mod layers;
pub mod netns;
pub mod notify;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod sql;
pub mod tls;
pub mod worker;
