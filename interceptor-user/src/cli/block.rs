//! `interceptor block`, `unblock` and `blocks`: the kill switch.

use std::path::Path;

use clap::Args;
use serde_json::Value;

use crate::control::{self, Request};

#[derive(Debug, Args)]
pub struct BlockArgs {
    /// An identity name from the policy, or key=value conditions over
    /// identity fields, all of which must match (pid, uid, gid, user, comm,
    /// exe (glob), exe_sha256, cgroup (glob), unit, container, pod_uid),
    /// e.g. `uid=1000 comm=psql`.
    #[arg(required_unless_present = "list")]
    selector: Vec<String>,
    /// Why (recorded in the audit log and the block list).
    #[arg(long)]
    reason: Option<String>,
    /// List the active blocks instead (same as `interceptor blocks`).
    #[arg(long, conflicts_with_all = ["selector", "reason"])]
    list: bool,
    /// Print the agent's raw JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct UnblockArgs {
    /// The selector of an active block (as given to `block`; key order
    /// does not matter).
    #[arg(required = true)]
    selector: Vec<String>,
    /// Print the agent's raw JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct BlocksArgs {
    /// Print the agent's raw JSON answer.
    #[arg(long)]
    json: bool,
}

fn ask(socket: &Path, req: &Request) -> Result<Value, i32> {
    control::request(socket, req).map_err(|e| {
        eprintln!("interceptor: {e}");
        1
    })
}

fn s(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

pub fn block(args: &BlockArgs, socket: &Path) -> i32 {
    if args.list {
        return blocks(&BlocksArgs { json: args.json }, socket);
    }
    let req = Request::Block {
        selector: args.selector.join(" "),
        reason: args.reason.clone(),
    };
    let data = match ask(socket, &req) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if args.json {
        println!("{data}");
        return 0;
    }
    println!("blocked: {}", s(&data["selector"]));
    println!(
        "kernel keys: {}{}",
        data["kernel_keys"],
        data["kernel_error"]
            .as_str()
            .map(|e| format!(" (kernel update failed: {e}; the agent still refuses)"))
            .unwrap_or_default()
    );
    println!(
        "connections closed: {}, statements cancelled on the server: {}",
        data["connections_closed"], data["cancels_sent"]
    );
    for c in data["connections"].as_array().into_iter().flatten() {
        let err = c["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        println!(
            "  conn {} ({}): cancel {}{err}",
            c["conn"],
            s(&c["target"]),
            s(&c["cancel"])
        );
    }
    if let Some(e) = data["persist_error"].as_str() {
        eprintln!("warning: the block is in force but was not saved: {e}");
    }
    0
}

pub fn unblock(args: &UnblockArgs, socket: &Path) -> i32 {
    let req = Request::Unblock {
        selector: args.selector.join(" "),
    };
    let data = match ask(socket, &req) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if args.json {
        println!("{data}");
    } else {
        println!("unblocked: {}", s(&data["selector"]));
        if let Some(e) = data["persist_error"].as_str() {
            eprintln!("warning: lifted, but the state file was not updated: {e}");
        }
    }
    0
}

pub fn blocks(args: &BlocksArgs, socket: &Path) -> i32 {
    let data = match ask(socket, &Request::Blocks) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if args.json {
        println!("{data}");
        return 0;
    }
    let list = data["blocks"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no active blocks");
    }
    for b in list {
        let actor = &b["actor"];
        let by = actor["user"]
            .as_str()
            .map_or_else(|| format!("uid {}", actor["uid"]), str::to_owned);
        let reason = b["reason"]
            .as_str()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        println!(
            "{}  since {} by {by} ({} kernel keys){reason}",
            s(&b["selector"]),
            s(&b["since"]),
            b["kernel_keys"]
        );
    }
    0
}
