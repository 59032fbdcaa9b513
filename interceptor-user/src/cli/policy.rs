use std::path::PathBuf;

use clap::Subcommand;

use crate::policy::PolicyFile;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file; exits 1 with located errors.
    Check {
        /// Policy file to check.
        file: PathBuf,
    },
}

pub fn policy(cmd: PolicyCommand) -> i32 {
    match cmd {
        PolicyCommand::Check { file } => match PolicyFile::load(&file) {
            Ok(p) => {
                println!(
                    "{}: ok ({} targets, {} identities, {} rules)",
                    file.display(),
                    p.targets.len(),
                    p.identities.len(),
                    p.rules.len()
                );
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
    }
}
