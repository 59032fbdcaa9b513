//! `interceptor audit verify`: checks an audit log's hash chain offline.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::audit;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of an audit log: exits 0 and prints a summary
    /// when it is unbroken; exits 1 naming the first bad record (file, line,
    /// seq and what is wrong) otherwise.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Log files, in any order; they are put in chain order by their
    /// records' seq. A base path (audit.jsonl) also brings in its rotated
    /// files (audit.jsonl.1, audit.jsonl.2, ...); a file named like a
    /// rotated one (audit.jsonl.3) is taken alone.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// Runs an `audit` subcommand; returns the exit code.
#[must_use]
pub fn audit(cmd: AuditCommand) -> i32 {
    match cmd {
        AuditCommand::Verify(args) => verify(&args),
    }
}

fn verify(args: &VerifyArgs) -> i32 {
    let files = match audit::log_files(&args.files) {
        Ok(f) => f,
        Err(e) => {
            println!("broken: {e}");
            return 1;
        }
    };
    match audit::verify(files) {
        Ok(summary) => {
            println!("{summary}");
            0
        }
        Err(failure) => {
            println!("broken: {failure}");
            1
        }
    }
}
