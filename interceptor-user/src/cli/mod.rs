//! The `interceptor` command line.

mod approvals;
mod audit;
mod block;
mod identities;
mod policy;
mod run;
mod status;
mod tail;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use run::RunArgs;

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/interceptor/control.sock";

#[derive(Debug, Parser)]
#[command(
    name = "interceptor",
    version,
    about = "Query-level guard for non-human database access"
)]
pub struct Cli {
    /// Control socket of the agent (every subcommand uses it).
    #[arg(
        long,
        global = true,
        env = "INTERCEPTOR_CONTROL_SOCKET",
        default_value = DEFAULT_CONTROL_SOCKET
    )]
    pub control_socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach the kernel programs and proxy redirected connections.
    Run(RunArgs),
    /// Show whether the agent is ready: cgroup, targets, connections. Exits non-zero when it is not.
    Status(status::StatusArgs),
    /// Check, test and derive policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Print recent decisions and events; `-f` follows live ones.
    Tail(tail::TailArgs),
    /// The workloads with live connections: identity, connections, statements by decision.
    Identities(identities::IdentitiesArgs),
    /// Work with audit logs offline: verify their hash chain.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Kill switch: refuse a workload's new connections in the kernel, cancel its statements and close its connections.
    Block(block::BlockArgs),
    /// Lift a block.
    Unblock(block::UnblockArgs),
    /// List the active blocks.
    Blocks(block::BlocksArgs),
    /// List, approve and deny statements held for approval.
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCommand),
    /// List and revoke standing grants made by approvals.
    #[command(subcommand)]
    Grants(approvals::GrantsCommand),
    /// Remove the kernel programs an agent pinned (uninstall): connections go direct.
    Detach(DetachArgs),
}

#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The pin dir the agent ran with.
    #[arg(long, default_value = run::DEFAULT_PIN_DIR)]
    pub pin_dir: std::path::PathBuf,
}

fn detach(args: &DetachArgs) -> i32 {
    match crate::ebpf::unpin_all(&args.pin_dir) {
        Ok(removed) if removed.is_empty() => {
            println!("nothing pinned in {}", args.pin_dir.display());
            0
        }
        Ok(removed) => {
            for p in removed {
                println!("removed {}", p.display());
            }
            println!("detached: connections go direct once no agent holds the programs");
            0
        }
        Err(e) => {
            eprintln!("interceptor: {e}");
            1
        }
    }
}

/// Runs the command line; returns the process exit code.
#[must_use]
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(&args, &cli.control_socket),
        Command::Status(args) => status::status(&args, &cli.control_socket),
        Command::Policy(cmd) => policy::policy(cmd),
        Command::Tail(args) => tail::tail(&args, &cli.control_socket),
        Command::Identities(args) => identities::identities(&args, &cli.control_socket),
        Command::Audit(cmd) => audit::audit(cmd),
        Command::Block(args) => block::block(&args, &cli.control_socket),
        Command::Unblock(args) => block::unblock(&args, &cli.control_socket),
        Command::Blocks(args) => block::blocks(&args, &cli.control_socket),
        Command::Approvals(cmd) => approvals::approvals(cmd, &cli.control_socket),
        Command::Grants(cmd) => approvals::grants(cmd, &cli.control_socket),
        Command::Detach(args) => detach(&args),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Cli;

    fn deploy(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The shipped systemd unit and DaemonSet use flags this binary has.
    #[test]
    fn deploy_files_use_real_flags() {
        let unit = deploy("interceptor.service");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("no ExecStart"));
        let args: Vec<&str> = exec.split_whitespace().collect();
        if let Err(e) = Cli::try_parse_from(&args) {
            panic!("interceptor.service: {e}");
        }
        let ds = deploy("daemonset.yaml");
        let mut args = vec!["interceptor".to_owned()];
        let mut inside = false;
        for line in ds.lines() {
            let t = line.trim();
            if t == "args:" {
                inside = true;
            } else if inside {
                match t.strip_prefix("- ") {
                    Some(a) => args.push(a.to_owned()),
                    None => break,
                }
            }
        }
        assert!(args.len() > 3, "{args:?}");
        if let Err(e) = Cli::try_parse_from(&args) {
            panic!("daemonset.yaml: {e}");
        }
    }
}
