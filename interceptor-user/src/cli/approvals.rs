//! `interceptor approvals …` and `interceptor grants …`: people deciding
//! held statements. The agent knows who calls (SO_PEERCRED); nothing here
//! claims an identity.

use std::path::Path;

use clap::{Subcommand, ValueEnum};
use serde_json::Value;

use crate::{
    approval::GrantScope,
    control::{self, Request},
    policy::parse_duration,
};

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Show the statements waiting for approval.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Approve a held statement (you must be in one of the rule's approver groups).
    Approve {
        id: String,
        /// Why (audited, sent to webhooks).
        #[arg(long)]
        reason: Option<String>,
        /// Also let later statements through: `fingerprint` (same shape,
        /// same workload and target) or `identity` (anything this rule holds
        /// for the workload on this target).
        #[arg(long, value_enum, default_value = "once")]
        grant: Scope,
        /// How long a grant lasts, such as 30m, 1h, 1d [default: 1h].
        #[arg(long = "for", value_name = "DURATION")]
        for_: Option<String>,
    },
    /// Deny a held statement; the client gets a denial.
    Deny {
        id: String,
        /// Why (audited, shown to the client, sent to webhooks).
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// Show the standing grants.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a grant.
    Revoke { id: String },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Scope {
    Once,
    Fingerprint,
    Identity,
}

impl From<Scope> for GrantScope {
    fn from(s: Scope) -> Self {
        match s {
            Scope::Once => Self::Once,
            Scope::Fingerprint => Self::Fingerprint,
            Scope::Identity => Self::Identity,
        }
    }
}

fn call(socket: &Path, req: &Request) -> Result<Value, i32> {
    control::request(socket, req).map_err(|e| {
        eprintln!("interceptor: {e}");
        1
    })
}

fn s(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

pub fn approvals(cmd: ApprovalsCommand, socket: &Path) -> i32 {
    let result = match cmd {
        ApprovalsCommand::List { json } => {
            call(socket, &Request::ApprovalsList).map(|data| print_approvals(&data, json))
        }
        ApprovalsCommand::Approve {
            id,
            reason,
            grant,
            for_,
        } => {
            let for_secs = match for_.as_deref().map(parse_duration).transpose() {
                Ok(d) => d.map(|d| d.as_secs().max(1)),
                Err(e) => {
                    eprintln!("interceptor: --for: {e}");
                    return 2;
                }
            };
            if for_secs.is_some() && matches!(grant, Scope::Once) {
                eprintln!("interceptor: --for needs --grant fingerprint or --grant identity");
                return 2;
            }
            let req = Request::Approve {
                id,
                reason,
                grant: Some(grant.into()),
                for_secs,
            };
            call(socket, &req).map(|d| print_decided(&d))
        }
        ApprovalsCommand::Deny { id, reason } => {
            call(socket, &Request::Deny { id, reason }).map(|d| print_decided(&d))
        }
    };
    result.map_or_else(|code| code, |()| 0)
}

fn print_approvals(data: &Value, json: bool) {
    if json {
        println!("{data}");
        return;
    }
    let list = data.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        println!("no pending approvals");
        return;
    }
    for a in list {
        let id = &a["identity"];
        println!("{}", s(&a["id"]));
        println!(
            "  rule:      {}  (approvers {}; {} of {} approved)",
            s(&a["rule"]),
            a["approvers"],
            a["approved_by"].as_array().map_or(0, Vec::len),
            a["required"]
        );
        println!(
            "  workload:  {} uid {} pid {} {}",
            s(&id["user"]),
            id["uid"],
            id["pid"],
            s(&id["exe"])
        );
        println!(
            "  target:    {} database {} as {}",
            s(&a["target"]),
            s(&a["database"]),
            s(&a["db_user"])
        );
        println!(
            "  requested: {}  expires: {}{}",
            s(&a["requested_at"]),
            s(&a["expires_at"]),
            if a["escalated"] == true {
                "  (escalated)"
            } else {
                ""
            }
        );
        for line in s(&a["query"]).lines() {
            println!("  | {line}");
        }
    }
}

fn print_decided(d: &Value) {
    match d["state"].as_str() {
        Some("pending") => println!(
            "{}: approval recorded ({} of {} needed)",
            s(&d["id"]),
            d["approvals"],
            d["required"]
        ),
        Some("approved") if d["grant"].is_object() => println!(
            "{}: approved; grant {} ({}) until {}",
            s(&d["id"]),
            s(&d["grant"]["id"]),
            s(&d["grant"]["scope"]),
            s(&d["grant"]["expires_at"])
        ),
        Some(state) => println!("{}: {state}", s(&d["id"])),
        None => println!("{d}"),
    }
}

pub fn grants(cmd: GrantsCommand, socket: &Path) -> i32 {
    let result = match cmd {
        GrantsCommand::List { json } => call(socket, &Request::GrantsList).map(|data| {
            if json {
                println!("{data}");
                return;
            }
            let list = data.as_array().map(Vec::as_slice).unwrap_or_default();
            if list.is_empty() {
                println!("no grants");
            }
            for g in list {
                let w = &g["workload"];
                println!(
                    "{}  {}  rule {}  target {}  uid {} {}  until {}  used {}",
                    s(&g["id"]),
                    s(&g["scope"]),
                    s(&g["rule"]),
                    s(&g["target"]),
                    w["uid"],
                    s(&w["exe"]),
                    s(&g["expires_at"]),
                    g["uses"]
                );
                if let Some(fp) = g["fingerprint"].as_str() {
                    println!("  fingerprint {fp}: {}", s(&g["query"]));
                }
            }
        }),
        GrantsCommand::Revoke { id } => {
            call(socket, &Request::GrantRevoke { id }).map(|d| print_decided(&d))
        }
    };
    result.map_or_else(|code| code, |()| 0)
}
