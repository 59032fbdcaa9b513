//! `cargo xtask`: everything around the build that cargo alone can't do.
//!
//! - `setup`: installs what a fresh machine lacks (nightly rust-src,
//!   bpf-linker built against nightly's own LLVM, the Debian packages the
//!   tests use). Idempotent; seconds when everything is there.
//! - `build`: release build of the agent (kernel object embedded).
//! - `run -- ARGS`: build, then `interceptor run ARGS` (needs root).
//! - `test`: fmt check, clippy, unit tests, end-to-end tests.
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install toolchain pieces and test dependencies (idempotent).
    Setup,
    /// Build the release binary (target/release/interceptor).
    Build,
    /// Build, then run the agent with the given arguments (`cargo xtask run -- --cgroup DIR`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: `policy` (criterion), `postgres` (pgbench: direct, PgBouncer,
    /// agent), `mysql` (sysbench: direct, agent), or all of them.
    Bench {
        /// policy | postgres | mysql | all
        #[arg(default_value = "all")]
        which: String,
    },
    /// A newcomer's first five minutes: throwaway PostgreSQL and MariaDB, the
    /// agent on a cgroup of its own with policies/demo.yaml, a scripted
    /// workload under the live tail, then the audit log verified. Needs root.
    Demo,
    /// fmt check, clippy, unit tests and end-to-end tests.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
}

/// Debian packages the tests and benchmarks use.
const PACKAGES: &[&str] = &[
    "postgresql",
    "postgresql-client",
    "mariadb-server",
    "mariadb-client",
    "pgbouncer",
    "sysbench",
    "python3",
    "procps",
    "iproute2",
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Build => build(),
        Cmd::Run { args } => {
            build()?;
            let bin = root.join("target/release/interceptor");
            run(Command::new(bin).arg("run").args(args))
        }
        Cmd::Test { filter, no_lint } => test(filter.as_deref(), no_lint),
        Cmd::Bench { which } => bench(&which),
        Cmd::Demo => {
            build()?;
            run(Command::new("cargo")
                .args([
                    "run",
                    "--release",
                    "--locked",
                    "-q",
                    "-p",
                    "interceptor-tests",
                    "--bin",
                    "demo",
                ])
                .env("INTERCEPTOR_BIN", root.join("target/release/interceptor")))
        }
    }
}

fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or(manifest.clone(), Path::to_path_buf)
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

fn setup() -> Result<()> {
    let mut did = Vec::new();

    // 1. nightly with rust-src, for -Z build-std=core on the BPF target.
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if installed.is_empty() {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        did.push("installed the nightly toolchain");
    }
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        did.push("added nightly rust-src");
    }

    // 2. bpf-linker built against the LLVM nightly ships.
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV has no LLVM version")?
        .trim()
        .to_owned();
    let major = llvm.split('.').next().unwrap_or_default().to_owned();
    let stamp = home().join(".cache/interceptor/bpf-linker.llvm");
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == llvm);
    let linker_present = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !linker_ok {
        let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
        let libdir = Path::new(sysroot.trim()).join("lib");
        let lib = std::fs::read_dir(&libdir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("libLLVM.so.")
                        || (n.starts_with("libLLVM-") && n.ends_with(".so"))
                })
            })
            .with_context(|| format!("no libLLVM shared library in {}", libdir.display()))?;
        let prefix = home().join(".cache/interceptor/llvm");
        std::fs::create_dir_all(prefix.join("lib"))?;
        let link = prefix.join("lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
        if linker_present && !stamp.exists() {
            // A bpf-linker of unknown origin: rebuild so it matches nightly's LLVM.
            eprintln!("bpf-linker present but not known to match LLVM {llvm}; rebuilding");
        }
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            // The linker loads nightly's libLLVM at run time: find it without LD_LIBRARY_PATH.
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", libdir.display()),
            ))?;
        std::fs::create_dir_all(stamp.parent().context("stamp dir")?)?;
        std::fs::write(&stamp, &llvm)?;
        did.push("built bpf-linker against nightly's LLVM");
    }

    // 3. Debian packages.
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        did.push("installed Debian packages");
        // Packages may start their own servers; the tests start theirs on
        // other ports, so leave them be.
    }

    if did.is_empty() {
        println!(
            "setup: everything already in place (nightly rust-src, bpf-linker for LLVM {llvm}, {} packages)",
            PACKAGES.len()
        );
    } else {
        println!("setup: {}", did.join("; "));
    }
    Ok(())
}

fn build() -> Result<()> {
    run(Command::new("cargo").args(["build", "--release", "--locked", "--bin", "interceptor"]))
}

fn test(filter: Option<&str>, no_lint: bool) -> Result<()> {
    if !no_lint {
        run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
        run(Command::new("cargo").args([
            "clippy",
            "--locked",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    build()?;
    let bin = workspace_root().join("target/release/interceptor");
    let mut unit = Command::new("cargo");
    unit.args([
        "test",
        "--locked",
        "--release",
        "--workspace",
        "--exclude",
        "interceptor-ebpf",
        "--exclude",
        "interceptor-tests",
    ]);
    if let Some(f) = filter {
        unit.arg(f);
    }
    run(&mut unit)?;
    let mut e2e = Command::new("cargo");
    e2e.args([
        "test",
        "--locked",
        "--release",
        "-p",
        "interceptor-tests",
        "--",
        "--test-threads",
        "2",
    ])
    .env("INTERCEPTOR_BIN", &bin);
    if let Some(f) = filter {
        e2e.arg(f);
    }
    run(&mut e2e)
}

fn bench(which: &str) -> Result<()> {
    let known = ["policy", "postgres", "mysql", "all"];
    if !known.contains(&which) {
        bail!("unknown benchmark {which:?}; expected one of {known:?}");
    }
    if matches!(which, "policy" | "all") {
        run(Command::new("cargo").args([
            "bench",
            "--locked",
            "-p",
            "interceptor-user",
            "--bench",
            "policy",
        ]))?;
    }
    for proto in ["postgres", "mysql"] {
        if which == proto || which == "all" {
            build()?;
            let bin = workspace_root().join("target/release/interceptor");
            run(Command::new("cargo")
                .args([
                    "run",
                    "--locked",
                    "--release",
                    "-p",
                    "interceptor-tests",
                    "--bin",
                ])
                .arg(format!("bench-{proto}"))
                .env("INTERCEPTOR_BIN", &bin))?;
        }
    }
    Ok(())
}
