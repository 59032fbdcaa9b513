//! `cargo xtask`: everything around the build that cargo alone can't do.
//!
//! - `setup`: installs what a fresh machine lacks (nightly rust-src,
//!   bpf-linker built against nightly's own LLVM, the Debian packages the
//!   tests use). Idempotent; seconds when everything is there.
//! - `build`: release build of the agent (kernel object embedded);
//!   `--pgo`: profile-guided (instrumented build, training run, final build).
//! - `run -- ARGS`: build, then `interceptor run ARGS` (needs root).
//! - `test`: fmt check, clippy, deploy checks, unit tests, end-to-end
//!   tests, then each fuzz target for a short fixed time.
//! - `image`: OCI image of the agent, from scratch, with podman.
//! - `fuzz`: each fuzz target for longer, growing the corpus in the repo.
//! - `check-deploy`: the systemd unit and the Kubernetes manifest, offline.
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
    Build {
        /// Profile-guided: build an instrumented agent, run the training
        /// workload through it (throwaway PostgreSQL and MariaDB; needs
        /// root), build again with the profile: target/pgo/interceptor.
        #[arg(long)]
        pgo: bool,
    },
    /// Build, then run the agent with the given arguments (`cargo xtask run -- --cgroup DIR`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: `policy` (criterion), `postgres` (pgbench: direct, PgBouncer,
    /// agent), `mysql` (sysbench: direct, agent), `idle` (memory per idle
    /// connection: agent, PgBouncer), or all of them.
    Bench {
        /// policy | postgres | mysql | idle | all
        #[arg(default_value = "all")]
        which: String,
    },
    /// A newcomer's first five minutes: throwaway PostgreSQL and MariaDB, the
    /// agent on a cgroup of its own with policies/demo.yaml, a scripted
    /// workload under the live tail, then the audit log verified. Needs root.
    Demo,
    /// fmt check, clippy, deploy checks, unit tests, end-to-end tests and
    /// a short run of every fuzz target.
    Test {
        /// Only run tests whose name contains this (and skip the deploy
        /// checks and fuzzing).
        filter: Option<String>,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Build the OCI image localhost/interceptor:VERSION (podman, from
    /// scratch, no registry) and run `interceptor --version` in it.
    Image {
        /// Put the profile-guided build in the image (see `build --pgo`).
        #[arg(long)]
        pgo: bool,
    },
    /// Run every fuzz target (or one) for SECONDS each; new inputs join the
    /// corpus in fuzz/corpus/TARGET, minimised afterwards.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Only this target.
        target: Option<String>,
    },
    /// `systemd-analyze verify` and `security` on the unit, and
    /// kubernetes-validate on the DaemonSet, all offline.
    CheckDeploy,
}

/// Debian packages the tests and benchmarks use.
const PACKAGES: &[&str] = &[
    "postgresql",
    "postgresql-client",
    "mariadb-server",
    "mariadb-client",
    "pgbouncer",
    "sysbench",
    // The benchmarks' bare relay (the cost of the extra hop alone).
    "socat",
    "python3",
    "procps",
    "iproute2",
    "bpftool",
    // check-deploy: systemd-analyze.
    "systemd",
    // image: podman builds and runs it; runc because crun refuses hybrid
    // cgroup hosts; objcopy strips the binary.
    "podman",
    "runc",
    "binutils",
    // pg_query (PostgreSQL's own parser, the agent's fallback) generates
    // its C bindings with bindgen, which loads libclang.
    "libclang-dev",
];

/// PyPI package validating the DaemonSet against the Kubernetes schemas it
/// ships (offline).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// cargo-fuzz, installed with `cargo install --locked`.
const CARGO_FUZZ: &str = "cargo-fuzz@0.13.2";
/// `systemd-analyze security --offline=yes --threshold=N`: the unit's
/// exposure level times ten may not exceed this (4.0; the unit scores 3.3).
const SECURITY_THRESHOLD: u32 = 40;
/// Kubernetes versions the DaemonSet is validated against: the oldest with
/// `securityContext.appArmorProfile`, and kubernetes-validate's newest.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];
/// Seconds per fuzz target in `cargo xtask test`.
const CI_FUZZ_SECONDS: u64 = 20;

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Build { pgo: false } => build(),
        Cmd::Build { pgo: true } => build_pgo(&root).map(drop),
        Cmd::Run { args } => {
            build()?;
            let bin = root.join("target/release/interceptor");
            run(Command::new(bin).arg("run").args(args))
        }
        Cmd::Test { filter, no_lint } => test(filter.as_deref(), no_lint),
        Cmd::Image { pgo } => image(&root, pgo),
        Cmd::Fuzz { seconds, target } => fuzz(&root, seconds, target.as_deref(), false),
        Cmd::CheckDeploy => {
            build()?;
            check_deploy(&root)
        }
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

    // llvm-profdata for `build --pgo`: rust-toolchain.toml names the
    // component, but rustup adds it only when it installs the toolchain.
    let stable = output(Command::new("rustup").args(["component", "list", "--installed"]))
        .unwrap_or_default();
    if !stable.lines().any(|l| l.starts_with("llvm-tools")) {
        run(Command::new("rustup").args(["component", "add", "llvm-tools"]))?;
        did.push("added llvm-tools");
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

    // 4. kubernetes-validate (check-deploy), from PyPI.
    if !Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let pip = |extra: &[&str]| {
            run(Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", KUBERNETES_VALIDATE])
                .args(extra))
        };
        // Debian's own python3 refuses pip outside a venv (PEP 668).
        pip(&[]).or_else(|_| pip(&["--break-system-packages"]))?;
        did.push("installed kubernetes-validate");
    }

    // 5. cargo-fuzz (the fuzz runs of `test` and `fuzz`).
    if !Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        run(Command::new("cargo").args(["install", "--locked", CARGO_FUZZ]))?;
        did.push("installed cargo-fuzz");
    }

    if did.is_empty() {
        println!(
            "setup: everything already in place (nightly rust-src, bpf-linker for LLVM {llvm}, {} packages, kubernetes-validate, cargo-fuzz)",
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

/// Where `build --pgo` works and leaves the agent.
const PGO_DIR: &str = "target/pgo";

/// Profile-guided release build; returns the binary's path
/// (`target/pgo/interceptor`). The profile is made afresh from the source
/// being built, never kept: an instrumented build (its own target dir, so
/// `target/release` stays the plain build) runs the `pgo-train` workload,
/// LLVM's `llvm-profdata` (rustup's `llvm-tools`, which the toolchain file
/// names) merges what it wrote, and a second build uses the merge.
fn build_pgo(root: &Path) -> Result<PathBuf> {
    let host = host_triple()?;
    let dir = root.join(PGO_DIR);
    let raw = dir.join("profraw");
    if raw.exists() {
        std::fs::remove_dir_all(&raw)?;
    }
    std::fs::create_dir_all(&raw)?;
    let instrumented = dir.join("instrumented");
    run(&mut pgo_cargo(
        &host,
        &instrumented,
        &format!("-Cprofile-generate={}", raw.display()),
    ))?;
    run(Command::new("cargo").args([
        "build",
        "--locked",
        "--release",
        "-p",
        "interceptor-tests",
        "--bin",
        "pgo-train",
    ]))?;
    run(Command::new(root.join("target/release/pgo-train")).env(
        "INTERCEPTOR_BIN",
        instrumented.join(&host).join("release/interceptor"),
    ))?;
    let profile = dir.join("interceptor.profdata");
    run(Command::new(llvm_profdata(&host)?)
        .arg("merge")
        .arg("-o")
        .arg(&profile)
        .arg(&raw))?;
    let optimised = dir.join("optimised");
    run(&mut pgo_cargo(
        &host,
        &optimised,
        &format!("-Cprofile-use={}", profile.display()),
    ))?;
    let bin = dir.join("interceptor");
    std::fs::copy(optimised.join(&host).join("release/interceptor"), &bin)?;
    eprintln!("build --pgo: {}", bin.display());
    Ok(bin)
}

/// `cargo build` of the agent for `host` in `target_dir` with `rustflags`.
/// The flags go in `CARGO_TARGET_<HOST>_RUSTFLAGS` with `--target` given, so
/// they reach the agent and its dependencies but not build scripts, proc
/// macros or the kernel programs' own build (another target).
fn pgo_cargo(host: &str, target_dir: &Path, rustflags: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "build",
        "--release",
        "--locked",
        "--bin",
        "interceptor",
        "--target",
        host,
    ])
    .arg("--target-dir")
    .arg(target_dir)
    .env_remove("RUSTFLAGS")
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .env(target_rustflags_var(host), rustflags);
    cmd
}

/// Cargo's per-target flags variable: `x86_64-unknown-linux-gnu` →
/// `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS`.
fn target_rustflags_var(triple: &str) -> String {
    format!(
        "CARGO_TARGET_{}_RUSTFLAGS",
        triple.to_uppercase().replace(['-', '.'], "_")
    )
}

fn host_triple() -> Result<String> {
    let vv = output(Command::new("rustc").arg("-vV"))?;
    vv.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("no host in `rustc -vV`")
}

/// rustup's `llvm-tools` component puts `llvm-profdata` of the toolchain's
/// own LLVM in the sysroot.
fn llvm_profdata(host: &str) -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let p = PathBuf::from(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-profdata");
    if !p.exists() {
        bail!(
            "{} missing: the toolchain's llvm-tools component is not installed (rust-toolchain.toml names it; `rustup component add llvm-tools`)",
            p.display()
        );
    }
    Ok(p)
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
    let root = workspace_root();
    if filter.is_none() {
        check_deploy(&root)?;
    }
    let bin = root.join("target/release/interceptor");
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
    run(&mut e2e)?;
    if filter.is_none() {
        fuzz(&root, CI_FUZZ_SECONDS, None, true)?;
    }
    Ok(())
}

/// The deploy artifacts, checked offline: the unit with `systemd-analyze
/// verify` (its ExecStart pointed at the built binary, which verify
/// requires to exist) and `security` at [`SECURITY_THRESHOLD`]; the
/// DaemonSet with kubernetes-validate, strict, for [`KUBERNETES_VERSIONS`].
fn check_deploy(root: &Path) -> Result<()> {
    let unit = root.join("deploy/interceptor.service");
    let text = std::fs::read_to_string(&unit).with_context(|| unit.display().to_string())?;
    let bin = root.join("target/release/interceptor");
    let dir = root.join("target/check-deploy");
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("interceptor.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/interceptor", &bin.display().to_string()),
    )?;
    run(Command::new("systemd-analyze").arg("verify").arg(&copy))?;
    let security = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--threshold={SECURITY_THRESHOLD}"))
            .arg(&unit),
    )
    .with_context(|| {
        format!(
            "{} exposure above {}.{} (systemd-analyze security --offline=yes {})",
            unit.display(),
            SECURITY_THRESHOLD / 10,
            SECURITY_THRESHOLD % 10,
            unit.display()
        )
    })?;
    if let Some(level) = security.lines().find(|l| l.contains("Overall exposure")) {
        println!("{}", level.trim_start_matches(['→', ' ']));
    }
    for version in KUBERNETES_VERSIONS {
        run(Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k"])
            .arg(version)
            .arg(root.join("deploy/daemonset.yaml")))?;
    }
    println!(
        "check-deploy: unit verified, exposure within {}.{}; DaemonSet valid for Kubernetes {}",
        SECURITY_THRESHOLD / 10,
        SECURITY_THRESHOLD % 10,
        KUBERNETES_VERSIONS.join(", ")
    );
    Ok(())
}

/// The fuzz targets, from fuzz/Cargo.toml's `[[bin]]` names.
fn fuzz_targets(root: &Path) -> Result<Vec<String>> {
    let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml"))?;
    let mut targets = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(name) = line.strip_prefix("name = ") {
            targets.push(name.trim_matches('"').to_owned());
        }
    }
    if targets.is_empty() {
        bail!("no [[bin]] fuzz targets in fuzz/Cargo.toml");
    }
    Ok(targets)
}

/// Runs each fuzz target for `seconds` on the corpus in fuzz/corpus/TARGET.
/// In CI (`ci`), what the run finds goes to target/fuzz-new/TARGET and the
/// repository stays clean; otherwise new inputs join the repository's
/// corpus, which is then minimised (`cargo fuzz cmin`) for committing.
/// A crash, a leak or an input slower than 10 s fails the run; its input
/// lands in target/fuzz-artifacts/TARGET/.
fn fuzz(root: &Path, seconds: u64, only: Option<&str>, ci: bool) -> Result<()> {
    let targets = fuzz_targets(root)?;
    if let Some(t) = only
        && !targets.iter().any(|x| x == t)
    {
        bail!("unknown fuzz target {t:?}; expected one of {targets:?}");
    }
    let fuzz_dir = root.join("fuzz");
    run(Command::new("cargo")
        .args(["+nightly", "fuzz", "build"])
        .current_dir(&fuzz_dir))?;
    for target in targets.iter().filter(|t| only.is_none_or(|o| o == *t)) {
        let corpus = fuzz_dir.join("corpus").join(target);
        let artifacts = root.join("target/fuzz-artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let mut cmd = Command::new("cargo");
        cmd.args(["+nightly", "fuzz", "run", target])
            .current_dir(&fuzz_dir);
        if ci {
            let new = root.join("target/fuzz-new").join(target);
            std::fs::create_dir_all(&new)?;
            // libFuzzer writes new inputs to the first directory only.
            cmd.arg(&new);
        }
        cmd.arg(&corpus).arg("--").args([
            format!("-max_total_time={seconds}"),
            "-timeout=10".to_owned(),
            "-max_len=4096".to_owned(),
            "-print_final_stats=1".to_owned(),
            format!("-artifact_prefix={}/", artifacts.display()),
        ]);
        run(&mut cmd)?;
        if !ci {
            run(Command::new("cargo")
                .args(["+nightly", "fuzz", "cmin", target])
                .arg(&corpus)
                .current_dir(&fuzz_dir))?;
        }
    }
    println!(
        "fuzz: {} target(s), {seconds} s each, no crash",
        targets
            .iter()
            .filter(|t| only.is_none_or(|o| o == *t))
            .count()
    );
    Ok(())
}

/// OCI image of the agent from scratch: the stripped release binary and
/// the shared libraries `ldd` lists (glibc, libgcc_s, the loader), built by
/// podman without a registry, then `interceptor --version` run inside it.
fn image(root: &Path, pgo: bool) -> Result<()> {
    let bin = if pgo {
        build_pgo(root)?
    } else {
        build()?;
        root.join("target/release/interceptor")
    };
    let version = env!("CARGO_PKG_VERSION");
    let tag = format!("localhost/interceptor:{version}");
    let dir = root.join("target/image");
    let rootfs = dir.join("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    // Mount points of the DaemonSet's volumes (the root file system is
    // read-only there) and of the kernel's file systems.
    for d in [
        "etc/interceptor",
        "run/interceptor",
        "var/log/interceptor",
        "var/lib/interceptor",
        "sys/fs/bpf",
        "sys/fs/cgroup",
        "proc",
        "dev",
        "tmp",
    ] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&bin)
        .arg(rootfs.join("interceptor")))?;
    let ldd = output(Command::new("ldd").arg(&bin))?;
    for lib in ldd_paths(&ldd) {
        let dest = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::create_dir_all(dest.parent().context("library path")?)?;
        // fs::copy follows the symlink: the image holds the file itself.
        std::fs::copy(&lib, &dest).with_context(|| format!("copy {}", lib.display()))?;
    }
    std::fs::write(
        dir.join("Containerfile"),
        format!(
            "FROM scratch\n\
             COPY rootfs/ /\n\
             LABEL org.opencontainers.image.title=interceptor \
             org.opencontainers.image.version={version}\n\
             ENTRYPOINT [\"/interceptor\"]\n"
        ),
    )?;
    run(Command::new("podman")
        .args(["build", "--quiet", "--tag", &tag, "--file"])
        .arg(dir.join("Containerfile"))
        .arg(&dir))?;
    // crun refuses hybrid cgroup hosts; podman's default rlimits exceed
    // some hosts' hard limits.
    let out = output(Command::new("podman").args([
        "run",
        "--rm",
        "--runtime",
        "runc",
        "--network",
        "none",
        "--ulimit",
        "nofile=1000:1000",
        "--ulimit",
        "nproc=1000:1000",
        &tag,
        "--version",
    ]))?;
    if !out.contains(version) {
        bail!("{tag}: `interceptor --version` printed {out:?}");
    }
    let size =
        output(Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", &tag]))?;
    println!(
        "image: {tag} ({} MB), runs: {}",
        size.trim().parse::<u64>().unwrap_or(0) / 1_000_000,
        out.trim()
    );
    Ok(())
}

/// The library files in `ldd` output: `name => /path (addr)` and the
/// loader's `/path (addr)`; the vDSO has no file.
fn ldd_paths(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l.split_once(" => ").map_or(l, |(_, p)| p);
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn bench(which: &str) -> Result<()> {
    let known = ["policy", "postgres", "mysql", "idle", "all"];
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
    let protos: Vec<&str> = ["postgres", "mysql", "idle"]
        .into_iter()
        .filter(|p| which == *p || which == "all")
        .collect();
    if protos.is_empty() {
        return Ok(());
    }
    // What the README's install steps build: the profile-guided agent, with
    // the plain release build measured beside it (`BENCH_COMPARE_BIN`,
    // unless already set).
    let root = workspace_root();
    build()?;
    let plain = root.join("target/release/interceptor");
    let bin = build_pgo(&root)?;
    // The drivers start helper binaries of the same package (`idle-conns`).
    run(Command::new("cargo").args([
        "build",
        "--locked",
        "--release",
        "-p",
        "interceptor-tests",
        "--bins",
    ]))?;
    for proto in protos {
        let mut cmd = Command::new("cargo");
        cmd.args([
            "run",
            "--locked",
            "--release",
            "-p",
            "interceptor-tests",
            "--bin",
        ])
        .arg(format!("bench-{proto}"))
        .env("INTERCEPTOR_BIN", &bin);
        if std::env::var_os("BENCH_COMPARE_BIN").is_none() {
            cmd.env("BENCH_COMPARE_BIN", &plain)
                .env("BENCH_COMPARE_NAME", "plain build (no PGO)");
        }
        run(&mut cmd)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_library_files() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f3f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3e)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f3f)\n";
        assert_eq!(
            ldd_paths(ldd),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn per_target_flags_variable() {
        assert_eq!(
            target_rustflags_var("x86_64-unknown-linux-gnu"),
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS"
        );
        assert_eq!(
            target_rustflags_var("thumbv7em-none-eabihf.custom"),
            "CARGO_TARGET_THUMBV7EM_NONE_EABIHF_CUSTOM_RUSTFLAGS"
        );
    }

    #[test]
    fn fuzz_targets_come_from_the_manifest() {
        let targets = fuzz_targets(&workspace_root()).unwrap_or_else(|e| panic!("{e}"));
        for t in ["sql_facts", "policy_decide", "pg_frames", "mysql_frames"] {
            assert!(
                targets.iter().any(|x| x == t),
                "{t} missing from {targets:?}"
            );
        }
    }
}
