//! `interceptor policy check | test | suggest`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
};

use clap::Subcommand;
use serde::Serialize;
use serde_json::Value;

use crate::{
    control::tail::Connections,
    identity::Identity,
    policy::{DecisionRequest, Engine, SessionState, StatementDetails, Verdict},
    sql::{self, Dialect, Flag, Kind, LexMode, Limits, Scratch},
};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file; exits 1 with located errors.
    Check {
        /// Policy file to check.
        file: PathBuf,
    },
    /// Decide SQL text as the agent would, and show why.
    Test {
        /// Policy file.
        #[arg(long)]
        policy: PathBuf,
        /// Target name from the policy's `targets`.
        #[arg(long)]
        target: String,
        /// Identity of the workload, as key=value (uid, gid, user, comm,
        /// exe, exe_sha256, cgroup, unit, container, pod_uid, pid);
        /// repeatable.
        #[arg(long = "identity", value_name = "KEY=VALUE")]
        identity: Vec<String>,
        /// Database user of the session.
        #[arg(long, default_value = "")]
        db_user: String,
        /// Database of the session.
        #[arg(long, default_value = "")]
        database: String,
        /// SQL text (one query message; may hold several statements).
        /// Several --sql run in order in one session.
        #[arg(long, required_unless_present = "messages")]
        sql: Vec<String>,
        /// File of query messages, one JSON string per line (as a driver
        /// would send each), decided in order in one session after any
        /// --sql; `-` reads standard input.
        #[arg(long, value_name = "FILE")]
        messages: Option<PathBuf>,
        /// One JSON object per message instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Derive a least-privilege rule set for one identity from audit logs,
    /// for review. Never suggests DDL, DCL, role changes, dangerous flags or
    /// procedural code: those are listed as comments for a human to decide.
    Suggest {
        /// Audit log files (JSON Lines).
        #[arg(long = "from", required = true, num_args = 1..)]
        from: Vec<PathBuf>,
        /// Policy defining the identity (and the targets).
        #[arg(long)]
        policy: PathBuf,
        /// Name of an `identities` entry of the policy.
        #[arg(long)]
        identity: String,
        /// `tables`: kinds and tables per target; `fingerprints`: exactly the
        /// query shapes seen.
        #[arg(long, default_value = "tables", value_parser = ["tables", "fingerprints"])]
        by: String,
    },
}

/// Loopback targets that leave other loopback addresses of the same port
/// unguarded: a server bound to `0.0.0.0` or `::` answers on all of them
/// (and on the host's own addresses), so a workload could pick one the
/// policy does not redirect.
#[must_use]
pub fn loopback_gaps(p: &crate::policy::PolicyFile) -> Vec<String> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let probes: [IpAddr; 4] = [
        Ipv4Addr::new(127, 0, 0, 1).into(),
        Ipv4Addr::new(127, 0, 0, 2).into(),
        Ipv4Addr::new(127, 255, 255, 254).into(),
        Ipv6Addr::LOCALHOST.into(),
    ];
    let mut ports: Vec<u16> = p
        .targets
        .iter()
        .filter(|t| t.address.name().is_none() && t.address.service().is_none())
        .map(|t| t.address.port())
        .filter(|port| *port != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let mut out = Vec::new();
    for port in ports {
        let covered = |ip: IpAddr| {
            p.targets
                .iter()
                .any(|t| t.address.contains(SocketAddr::new(ip, port)))
        };
        let (hit, missed): (Vec<IpAddr>, Vec<IpAddr>) =
            probes.iter().copied().partition(|ip| covered(*ip));
        if hit.is_empty() || missed.is_empty() {
            continue;
        }
        let missed: Vec<String> = missed
            .iter()
            .map(|ip| SocketAddr::new(*ip, port).to_string())
            .collect();
        out.push(format!(
            "port {port}: loopback is only partly a target ({} not redirected). A server listening on 0.0.0.0 or :: answers on every loopback address and on this host's own addresses: target 127.0.0.0/8:{port} and [::1]:{port}, and add the host's addresses (and the server's unix socket, unix:/path) to close the gap",
            missed.join(", ")
        ));
    }
    out
}

pub fn policy(cmd: PolicyCommand) -> i32 {
    match cmd {
        PolicyCommand::Check { file } => match Engine::load(&file).and_then(|e| {
            // A Service target can only be watched from inside a cluster.
            crate::kube::check_policy(e.file())
                .map(|()| e)
                .map_err(|message| crate::policy::PolicyError::Invalid {
                    path: file.clone(),
                    message,
                })
        }) {
            Ok(e) => {
                let p = e.file();
                println!(
                    "{}: ok ({} targets, {} identities, {} rules)",
                    file.display(),
                    p.targets.len(),
                    p.identities.len(),
                    p.rules.len()
                );
                for warning in loopback_gaps(p) {
                    eprintln!("warning: {warning}");
                }
                // A name that does not resolve now is not an error (it may
                // resolve where the agent runs), but it redirects nothing.
                for (_, t, name) in p.named_targets() {
                    match name.lookup() {
                        Ok(addrs) => {
                            let addrs: Vec<std::net::SocketAddr> = addrs
                                .into_iter()
                                .map(|ip| std::net::SocketAddr::new(ip, name.port))
                                .collect();
                            let (addrs, _) = crate::policy::names_diff(&[], &addrs);
                            let list: Vec<String> =
                                addrs.iter().map(|a| a.ip().to_string()).collect();
                            println!(
                                "target {:?}: {} resolves to {}",
                                t.name,
                                t.address,
                                list.join(", ")
                            );
                        }
                        Err(e) => eprintln!(
                            "warning: target {:?}: {} does not resolve here ({e}): nothing is redirected for it until it does",
                            t.name, t.address
                        ),
                    }
                }
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
        PolicyCommand::Test {
            policy,
            target,
            identity,
            db_user,
            database,
            mut sql,
            messages,
            json,
        } => match read_messages(messages.as_deref(), &mut sql)
            .and_then(|()| test(&policy, &target, &identity, &db_user, &database, &sql, json))
        {
            Ok(out) => {
                print!("{out}");
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
        PolicyCommand::Suggest {
            from,
            policy,
            identity,
            by,
        } => match suggest(&from, &policy, &identity, by == "fingerprints") {
            Ok(out) => {
                print!("{out}");
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
    }
}

/// Builds an identity from `key=value` pairs.
///
/// # Errors
/// On an unknown key or a bad number.
pub fn identity_from_pairs(pairs: &[String]) -> Result<Identity, String> {
    let mut id = Identity::default();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("--identity {p:?}: expected key=value"))?;
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("--identity {k}: {v:?} is not a number"))
        };
        let s = Some(v.to_owned());
        match k {
            "uid" => id.uid = num(v)?,
            "gid" => id.gid = num(v)?,
            "pid" => {
                id.pid = num(v)?;
                id.tgid = id.pid;
            }
            "user" => id.user = s,
            "comm" => id.comm = v.to_owned(),
            "exe" => id.exe = s,
            "exe_sha256" => id.exe_sha256 = s,
            "cmdline" => id.cmdline = s,
            "cgroup" => id.cgroup = s,
            "unit" => id.unit = s,
            "container" => id.container = s,
            "pod_uid" => id.pod_uid = s,
            _ => {
                return Err(format!(
                    "--identity {k}: unknown key (uid, gid, pid, user, comm, exe, exe_sha256, cmdline, cgroup, unit, container, pod_uid)"
                ));
            }
        }
    }
    Ok(id)
}

#[derive(Serialize)]
struct TestStatement<'a> {
    text: &'a str,
    fingerprint: &'a str,
    decision: crate::policy::Decision,
    rule: Option<&'a str>,
    reason: &'a str,
    #[serde(flatten)]
    details: &'a StatementDetails,
}

#[derive(Serialize)]
struct TestOutput<'a> {
    decision: crate::policy::Decision,
    enforced: bool,
    mode: crate::policy::EffectiveMode,
    rule: Option<&'a str>,
    reason: &'a str,
    identities: &'a [String],
    statements: Vec<TestStatement<'a>>,
}

fn render(v: &Verdict, identities: &[String], json: bool) -> String {
    if json {
        let out = TestOutput {
            decision: v.decision,
            enforced: v.enforced,
            mode: v.mode,
            rule: v.rule.as_deref(),
            reason: &v.reason,
            identities,
            statements: v
                .statements
                .iter()
                .zip(&v.details)
                .map(|(s, d)| TestStatement {
                    text: &s.text,
                    fingerprint: &s.fingerprint,
                    decision: s.decision,
                    rule: s.rule.as_deref(),
                    reason: &s.reason,
                    details: d,
                })
                .collect(),
        };
        return serde_json::to_string(&out)
            .map_or_else(|e| format!("{{\"error\":\"{e}\"}}\n"), |s| s + "\n");
    }
    let mut o = String::new();
    let how = match v.mode {
        crate::policy::EffectiveMode::Enforce => "enforced",
        crate::policy::EffectiveMode::Shadow => "shadow mode: recorded, not enforced",
        crate::policy::EffectiveMode::Learn => "learn mode: allowed and recorded",
    };
    let _ = writeln!(o, "decision: {} ({how})", v.decision);
    let _ = writeln!(
        o,
        "rule:     {}",
        v.rule.as_deref().unwrap_or("(none: default)")
    );
    let _ = writeln!(o, "reason:   {}", v.reason);
    let _ = writeln!(
        o,
        "identity: {}",
        if identities.is_empty() {
            "(no named identity)".to_owned()
        } else {
            identities.join(", ")
        }
    );
    for (i, (s, d)) in v.statements.iter().zip(&v.details).enumerate() {
        let f = &d.facts;
        let _ = writeln!(o, "statement {}: {}", i + 1, one_line(&s.text, 200));
        let _ = writeln!(
            o,
            "  decision:    {} ({})",
            s.decision,
            s.rule.as_deref().unwrap_or("default")
        );
        let _ = writeln!(o, "  reason:      {}", s.reason);
        let _ = writeln!(o, "  kind:        {}", f.kind);
        let _ = writeln!(
            o,
            "  tables:      {}{}",
            list(&f.tables),
            if f.tables_unknown {
                " + unknown (dynamic_sql)"
            } else {
                ""
            }
        );
        let _ = writeln!(o, "  written:     {}", list(&f.tables_written));
        let _ = writeln!(o, "  functions:   {}", list(&f.functions));
        let flags: Vec<String> = f.flags.iter().map(|x| x.to_string()).collect();
        let _ = writeln!(o, "  flags:       {}", list(&flags));
        // SQL the statement runs without naming it, and what that reads.
        for (j, h) in f.hidden.iter().enumerate() {
            let head = if j == 0 {
                "  hidden:     "
            } else {
                "             "
            };
            let what = match (&h.text, &h.dynamic) {
                (_, Some(why)) => format!("unknown: {why}"),
                (Some(t), None) => {
                    let mut s = format!("'{}'", one_line(t, 120));
                    if let Some(k) = h.kind {
                        s.push_str(&format!(" -> {k}"));
                    }
                    if !h.tables.is_empty() {
                        s.push_str(&format!(" on {}", h.tables.join(", ")));
                    }
                    let hf: Vec<&str> = h.flags.iter().map(crate::sql::Flag::as_str).collect();
                    if !hf.is_empty() {
                        s.push_str(&format!(" ({})", hf.join(", ")));
                    }
                    s
                }
                (None, None) => String::new(),
            };
            let _ = writeln!(o, "{head} {}({}): {what}", h.function, h.argument.as_str());
        }
        let _ = writeln!(
            o,
            "  where:       {}",
            match f.has_where {
                Some(true) => "present",
                Some(false) => "absent",
                None => "-",
            }
        );
        let _ = writeln!(
            o,
            "  limit:       {}",
            d.limit.map_or_else(|| "-".to_owned(), |l| l.to_string())
        );
        let _ = writeln!(o, "  fingerprint: {}", s.fingerprint);
        if let Some(e) = &f.parse_error {
            let _ = writeln!(o, "  unparsed:    {e}");
        }
    }
    o
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.join(", ")
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max).collect();
        format!("{cut}...")
    } else {
        flat
    }
}

/// Appends the messages of a `--messages` file (one JSON string per line;
/// blank lines skipped) to `sql`.
fn read_messages(file: Option<&Path>, sql: &mut Vec<String>) -> Result<(), String> {
    let Some(file) = file else {
        return Ok(());
    };
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("standard input: {e}"))?
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?
    };
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m: String = serde_json::from_str(line).map_err(|e| {
            format!(
                "{}:{}: expected one JSON string per line: {e}",
                file.display(),
                n + 1
            )
        })?;
        sql.push(m);
    }
    if sql.is_empty() {
        return Err(format!("{}: no messages", file.display()));
    }
    Ok(())
}

fn test(
    policy: &Path,
    target: &str,
    identity: &[String],
    db_user: &str,
    database: &str,
    sql: &[String],
    json: bool,
) -> Result<String, String> {
    let engine = Engine::load(policy).map_err(|e| e.to_string())?;
    if !engine.file().targets.iter().any(|t| t.name == target) {
        let names: Vec<&str> = engine
            .file()
            .targets
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        return Err(format!(
            "unknown target {target:?} (the policy has: {})",
            names.join(", ")
        ));
    }
    let id = identity_from_pairs(identity)?;
    let binding = engine.bind_identity(&id);
    let mut session = SessionState::default();
    let mut out = String::new();
    for (i, text) in sql.iter().enumerate() {
        let req = DecisionRequest {
            identity: &id,
            binding: &binding,
            target,
            db_user,
            database,
            sql: text,
        };
        let v = engine.decide(&req, &mut session);
        if i > 0 && !json {
            out.push('\n');
        }
        out.push_str(&render(&v, &binding.names, json));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// suggest

/// An audit event's identity object, as far as selectors look at it.
fn identity_from_json(v: &Value) -> Identity {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(ToOwned::to_owned);
    let n = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .and_then(|x| u32::try_from(x).ok())
            .unwrap_or(0)
    };
    Identity {
        pid: n("pid"),
        tgid: n("tgid"),
        uid: n("uid"),
        gid: n("gid"),
        user: s("user"),
        comm: s("comm").unwrap_or_default(),
        exe: s("exe"),
        exe_sha256: s("exe_sha256"),
        cmdline: s("cmdline"),
        cgroup: s("cgroup"),
        unit: s("unit"),
        container: s("container"),
        pod_uid: s("pod_uid"),
        cgroup_id: 0,
        netns_cookie: 0,
        netns_inode: 0,
    }
}

/// Kinds a suggestion may allow; the rest (DDL, DCL, TRUNCATE, CALL,
/// other) need a human.
fn suggestable(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Select
            | Kind::Insert
            | Kind::Update
            | Kind::Delete
            | Kind::Merge
            | Kind::Copy
            | Kind::Explain
            | Kind::Tcl
            | Kind::Session
    )
}

/// Flags that keep a statement out of any suggestion.
fn never_suggested(f: Flag) -> bool {
    !matches!(f, Flag::Lock | Flag::SessionChange)
}

#[derive(Default)]
struct Group {
    tables: BTreeSet<String>,
    functions: BTreeSet<String>,
    fingerprints: BTreeSet<String>,
    count: usize,
}

struct Held {
    why: String,
    fingerprint: String,
    query: String,
    count: usize,
}

fn suggest(
    from: &[PathBuf],
    policy: &Path,
    identity: &str,
    by_fingerprint: bool,
) -> Result<String, String> {
    let engine = Engine::load(policy).map_err(|e| e.to_string())?;
    if !engine.file().identities.contains_key(identity) {
        return Err(format!(
            "{}: no identity named {identity:?}",
            policy.display()
        ));
    }
    // (target, kind) → what was seen; session/transaction statements are
    // pinned by fingerprint whatever `by` says.
    let mut groups: BTreeMap<(String, Kind), Group> = BTreeMap::new();
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    // (target, db_user) → whether the agent already logs in for it.
    let mut logins: BTreeMap<(String, String), bool> = BTreeMap::new();
    let (mut events, mut matched) = (0usize, 0usize);
    let mut scratch = Scratch::default();
    for path in from {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // `query` records carry a brief identity: the whole one is in the
        // connection's record earlier in the same file.
        let mut conns = Connections::default();
        for (lineno, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let Ok(ev) = serde_json::from_str::<Value>(&line) else {
                eprintln!("{}:{}: not JSON, skipped", path.display(), lineno + 1);
                continue;
            };
            conns.learn(&ev);
            let event = ev.get("event").and_then(Value::as_str);
            if event == Some("session") {
                let id = identity_from_json(ev.get("identity").unwrap_or(&Value::Null));
                let field = |k: &str| ev.get(k).and_then(Value::as_str).map(ToOwned::to_owned);
                if engine.identity_matches(identity, &id) == Some(true)
                    && let (Some(target), Some(db_user)) = (field("target"), field("db_user"))
                {
                    let brokered = field("login").as_deref() == Some("brokered");
                    logins.insert((target, db_user), brokered);
                }
                continue;
            }
            if event != Some("query") {
                continue;
            }
            events += 1;
            let id = identity_from_json(&conns.who(&ev)["identity"]);
            if engine.identity_matches(identity, &id) != Some(true) {
                continue;
            }
            matched += 1;
            let target = ev
                .get("target")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let query = ev.get("query").and_then(Value::as_str).unwrap_or("");
            let fingerprint = ev
                .get("fingerprint")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let dialect = match ev.get("protocol").and_then(Value::as_str) {
                Some("mysql") => Dialect::Mysql,
                _ => Dialect::Postgres,
            };
            let kind: Kind = ev
                .get("kind")
                .and_then(|k| serde_json::from_value(k.clone()).ok())
                .unwrap_or(Kind::Other);
            let tables: Vec<String> = ev
                .get("tables")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(ToOwned::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            // Flags, functions and procedural code are not in the event:
            // re-read the query.
            let facts = reanalyse(query, dialect, &mut scratch);
            let bad_flags: Vec<String> = facts
                .flags
                .iter()
                .filter(|f| never_suggested(*f))
                .map(|f| f.to_string())
                .collect();
            let why = if facts.unparsed {
                Some("could not be parsed".to_owned())
            } else if !bad_flags.is_empty() {
                Some(format!("flags {}", bad_flags.join(", ")))
            } else if facts.procedural || kind == Kind::Call {
                Some("procedural code".to_owned())
            } else if !suggestable(kind) {
                Some(format!("{kind}"))
            } else {
                None
            };
            if let Some(why) = why {
                let h = held.entry(fingerprint.clone()).or_insert_with(|| Held {
                    why,
                    fingerprint: fingerprint.clone(),
                    query: one_line(query, 160),
                    count: 0,
                });
                h.count += 1;
                continue;
            }
            let g = groups.entry((target, kind)).or_default();
            g.count += 1;
            g.tables.extend(tables);
            g.functions.extend(facts.functions.iter().cloned());
            if !fingerprint.is_empty() {
                g.fingerprints.insert(fingerprint);
            }
        }
    }
    let mut out = render_suggestion(
        identity,
        from,
        events,
        matched,
        &groups,
        &held,
        by_fingerprint,
    );
    out.push_str(&render_logins(identity, &logins));
    Ok(out)
}

/// The `logins:` entries that would let the agent log in for this
/// identity's database users, so the workload holds no password: as
/// comments, since they belong under each target.
fn render_logins(identity: &str, logins: &BTreeMap<(String, String), bool>) -> String {
    let mut o = String::new();
    let wanted: Vec<_> = logins.iter().filter(|(_, brokered)| !**brokered).collect();
    if wanted.is_empty() {
        return o;
    }
    let _ = writeln!(o, "#");
    let _ = writeln!(
        o,
        "# Logins seen: add under each target so the agent logs in for {identity:?}"
    );
    let _ = writeln!(
        o,
        "# and the workload needs no password (the file: the user's password, mode 0600)."
    );
    let mut last_target = None;
    for ((target, db_user), _) in wanted {
        if last_target != Some(target) {
            let _ = writeln!(o, "#   target {}:", yaml_str(target));
            let _ = writeln!(o, "#     logins:");
            last_target = Some(target);
        }
        let _ = writeln!(o, "#       - db_user: {}", yaml_str(db_user));
        let _ = writeln!(o, "#         identities: [{}]", yaml_str(identity));
        let _ = writeln!(
            o,
            "#         password_file: /etc/interceptor/secrets/{}",
            db_user.replace(['/', ' '], "_")
        );
    }
    o
}

fn reanalyse(query: &str, dialect: Dialect, scratch: &mut Scratch) -> sql::StatementFacts {
    let ctx = sql::Resolution {
        dialect,
        schemas: Vec::new(),
        unknown: false,
    };
    let mut canon = String::new();
    let info = sql::normalize(
        query,
        LexMode::default_for(dialect),
        false,
        &mut canon,
        scratch,
    );
    sql::analyze(&canon, &info, dialect, &Limits::default()).resolve(&ctx)
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

fn yaml_list(items: impl IntoIterator<Item = String>) -> String {
    let v: Vec<String> = items.into_iter().map(|s| yaml_str(&s)).collect();
    format!("[{}]", v.join(", "))
}

fn render_suggestion(
    identity: &str,
    from: &[PathBuf],
    events: usize,
    matched: usize,
    groups: &BTreeMap<(String, Kind), Group>,
    held: &BTreeMap<String, Held>,
    by_fingerprint: bool,
) -> String {
    let mut o = String::new();
    let files: Vec<String> = from.iter().map(|p| p.display().to_string()).collect();
    let _ = writeln!(
        o,
        "# Suggested by `interceptor policy suggest` for identity {identity:?}"
    );
    let _ = writeln!(
        o,
        "# from {} ({events} query events, {matched} from this identity).",
        files.join(", ")
    );
    let _ = writeln!(
        o,
        "# Least privilege from what was observed: review before adding to `rules:`."
    );
    let _ = writeln!(o, "rules:");
    let mut names = BTreeSet::new();
    for ((target, kind), g) in groups {
        // Statements without tables to confine them are pinned by shape.
        let fingerprint_only =
            by_fingerprint || matches!(kind, Kind::Copy | Kind::Tcl | Kind::Session);
        let base = format!(
            "{identity}-{}-{kind}",
            if target.is_empty() { "any" } else { target }
        );
        let mut name = base.clone();
        let mut n = 2;
        while !names.insert(name.clone()) {
            name = format!("{base}-{n}");
            n += 1;
        }
        let _ = writeln!(o, "  - name: {}", yaml_str(&name));
        let _ = writeln!(o, "    # {} statements seen", g.count);
        let _ = writeln!(o, "    identities: [{}]", yaml_str(identity));
        if !target.is_empty() {
            let _ = writeln!(o, "    targets: [{}]", yaml_str(target));
        }
        let _ = writeln!(o, "    kinds: [{kind}]");
        if fingerprint_only {
            let _ = writeln!(
                o,
                "    fingerprints: {}",
                yaml_list(g.fingerprints.iter().cloned())
            );
        } else {
            let _ = writeln!(o, "    tables: {}", yaml_list(g.tables.iter().cloned()));
            let _ = writeln!(
                o,
                "    functions: {}",
                yaml_list(g.functions.iter().cloned())
            );
        }
        let _ = writeln!(o, "    decision: allow");
    }
    if groups.is_empty() {
        let _ = writeln!(o, "  []");
    }
    if !held.is_empty() {
        let _ = writeln!(o, "#");
        let _ = writeln!(
            o,
            "# Not suggested: these need a human decision (DDL, DCL, role changes,"
        );
        let _ = writeln!(
            o,
            "# dangerous flags, procedural code, unparsable statements)."
        );
        for h in held.values() {
            let _ = writeln!(
                o,
                "#   {} x{} ({}): {}",
                h.fingerprint, h.count, h.why, h.query
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyFile;

    const POLICY: &str = r#"
version: 1
default: deny
targets:
  - {name: app-db, protocol: postgres, address: 127.0.0.1:5432}
identities:
  reporting: {cgroup: "/reporting/*", mode: learn}
"#;

    fn event(cgroup: &str, query: &str, kind: &str, tables: &[&str], fp: &str) -> String {
        serde_json::json!({
            "ts": "2024-01-01T00:00:00Z", "seq": 1, "event": "query", "conn": 3, "target": "app-db",
            "protocol": "postgres", "dst": "127.0.0.1:5432",
            "identity": {"pid": 10, "uid": 1000, "user": "rep", "comm": "python3", "exe": "/usr/bin/python3",
                         "exe_sha256": null, "cgroup": cgroup, "unit": null, "container": null, "pod_uid": null},
            "decision": "allow", "rule": null, "reason": "x", "enforced": false, "query": query,
            "fingerprint": fp, "kind": kind, "tables": tables, "db_user": "app", "database": "orders", "eval_us": 3
        })
        .to_string()
    }

    /// `event` as a `query` record of connection `conn` with a brief
    /// identity.
    fn brief(conn: u64, event: String) -> String {
        let mut v: serde_json::Value = serde_json::from_str(&event).unwrap();
        v["conn"] = conn.into();
        v["identity"] = serde_json::json!({"pid": 10, "tgid": 10, "uid": 1000, "comm": "python3"});
        v.to_string()
    }

    #[test]
    fn partial_loopback_targets_are_warned_about() {
        let parse = |targets: &str| {
            PolicyFile::parse(
                &format!("version: 1\ntargets:\n{targets}"),
                std::path::Path::new("p.yaml"),
            )
            .unwrap()
        };
        let one = parse("  - {name: a, protocol: postgres, address: 127.0.0.1:5432}\n");
        let w = loopback_gaps(&one);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("127.0.0.2:5432")
                && w[0].contains("[::1]:5432")
                && w[0].contains("127.0.0.0/8:5432"),
            "{w:?}"
        );
        let whole = parse(
            "  - {name: a, protocol: postgres, address: 127.0.0.0/8:5432}\n  - {name: b, protocol: postgres, address: '[::1]:5432'}\n",
        );
        assert!(loopback_gaps(&whole).is_empty());
        // Not loopback at all: nothing to say.
        let remote = parse("  - {name: a, protocol: postgres, address: 10.0.0.5:5432}\n");
        assert!(loopback_gaps(&remote).is_empty());
    }

    #[test]
    fn suggests_least_privilege_and_holds_dangerous() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("p.yaml");
        std::fs::write(&policy, POLICY).unwrap();
        let log = dir.path().join("audit.jsonl");
        let lines = [
            r#"{"event":"connect","conn":3}"#.to_owned(),
            event(
                "/reporting/a",
                "SELECT count(*) FROM orders",
                "select",
                &["public.orders"],
                "v1:0000000000000001",
            ),
            event(
                "/reporting/a",
                "SELECT * FROM report_daily",
                "select",
                &["public.report_daily"],
                "v1:0000000000000002",
            ),
            event(
                "/reporting/b",
                "CREATE TABLE x (a int)",
                "ddl",
                &["public.x"],
                "v1:0000000000000003",
            ),
            event(
                "/reporting/b",
                "SELECT pg_read_file('/etc/passwd')",
                "select",
                &[],
                "v1:0000000000000004",
            ),
            event(
                "/other",
                "DELETE FROM orders",
                "delete",
                &["public.orders"],
                "v1:0000000000000005",
            ),
            "not json".to_owned(),
            // Records with a brief identity: the whole one is in the
            // connection's record.
            serde_json::json!({"event": "connect", "conn": 5, "identity": {"uid": 1000, "comm": "python3", "cgroup": "/reporting/c", "cgroup_id": 7}}).to_string(),
            serde_json::json!({"event": "connect", "conn": 6, "identity": {"uid": 1000, "comm": "python3", "cgroup": "/other", "cgroup_id": 8}}).to_string(),
            brief(5, event("", "SELECT * FROM customers", "select", &["public.customers"], "v1:0000000000000006")),
            brief(6, event("", "SELECT * FROM secrets", "select", &["public.secrets"], "v1:0000000000000007")),
            serde_json::json!({"event": "session", "conn": 3, "target": "app-db", "db_user": "app",
                "login": "passthrough", "identity": {"uid": 1000, "comm": "python3", "cgroup": "/reporting/a"}})
            .to_string(),
            serde_json::json!({"event": "session", "conn": 4, "target": "app-db", "db_user": "admin",
                "login": "passthrough", "identity": {"uid": 0, "comm": "psql", "cgroup": "/other"}})
            .to_string(),
        ];
        std::fs::write(&log, lines.join("\n")).unwrap();
        let out = suggest(std::slice::from_ref(&log), &policy, "reporting", false).unwrap();
        assert!(out.contains("kinds: [select]"), "{out}");
        assert!(
            out.contains(r#"tables: ["public.customers", "public.orders", "public.report_daily"]"#),
            "{out}"
        );
        assert!(out.contains(r#"functions: ["count"]"#), "{out}");
        assert!(!out.contains("kinds: [ddl]"), "{out}");
        assert!(!out.contains("kinds: [delete]"), "{out}");
        assert!(out.contains("v1:0000000000000003 x1 (ddl)"), "{out}");
        assert!(out.contains("(flags file_access)"), "{out}");
        // The identity's database user, as a logins entry; not another's.
        assert!(out.contains("#       - db_user: \"app\""), "{out}");
        assert!(
            out.contains("#         identities: [\"reporting\"]"),
            "{out}"
        );
        assert!(!out.contains("\"admin\""), "{out}");
        // The suggestion is a valid rule list once put in a policy.
        let rules = out
            .lines()
            .skip_while(|l| !l.starts_with("rules:"))
            .collect::<Vec<_>>()
            .join("\n");
        let full = format!("{POLICY}{rules}\n");
        let file =
            PolicyFile::parse(&full, Path::new("s.yaml")).unwrap_or_else(|e| panic!("{e}\n{full}"));
        assert_eq!(file.rules.len(), 1);
        let by_fp = suggest(&[log], &policy, "reporting", true).unwrap();
        assert!(
            by_fp.contains(r#"fingerprints: ["v1:0000000000000001", "v1:0000000000000002", "v1:0000000000000006"]"#),
            "{by_fp}"
        );
        assert!(suggest(&[], &policy, "ghost", false).is_err());
    }

    #[test]
    fn test_command_prints_facts_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("p.yaml");
        std::fs::write(&policy, POLICY.replace("mode: learn", "mode: enforce")).unwrap();
        let ids = ["cgroup=/reporting/x".to_owned(), "uid=5".to_owned()];
        let text = test(
            &policy,
            "app-db",
            &ids,
            "app",
            "orders",
            &["DELETE FROM orders".to_owned()],
            false,
        )
        .unwrap();
        assert!(text.contains("decision: deny (enforced)"), "{text}");
        assert!(text.contains("kind:        delete"), "{text}");
        assert!(text.contains("public.orders"), "{text}");
        assert!(text.contains("identity: reporting"), "{text}");
        let json = test(
            &policy,
            "app-db",
            &ids,
            "app",
            "orders",
            &["select 1; delete from t".to_owned()],
            true,
        )
        .unwrap();
        let v: Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(v["decision"], "deny");
        assert!(v["rule"].is_null());
        assert!(v["reason"].as_str().unwrap().contains("default is deny"));
        assert_eq!(v["statements"].as_array().unwrap().len(), 2);
        assert_eq!(v["statements"][1]["kind"], "delete");
        assert_eq!(v["statements"][1]["tables"][0], "public.t");
        assert!(
            test(
                &policy,
                "nope",
                &[],
                "",
                "",
                &["select 1".to_owned()],
                false
            )
            .is_err()
        );
        assert!(identity_from_pairs(&["colour=blue".to_owned()]).is_err());
    }
}
