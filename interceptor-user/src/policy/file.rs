//! The policy file (YAML), parsed strictly: unknown fields are errors that
//! carry file, line and column.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize};

use super::AuditSettings;
use crate::sql::{Dialect, Fingerprint, Flag, Kind, Limits};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityMode {
    Learn,
    Shadow,
    Enforce,
}

/// What happens to a statement. Ordered by strictness: deny beats approve
/// beats allow.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Approve,
    #[default]
    Deny,
}

impl Decision {
    /// The name used in policies, audit records and metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Approve => "approve",
            Self::Deny => "deny",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WherePresence {
    Absent,
    Present,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Postgres,
    Mysql,
}

impl Protocol {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        }
    }

    #[must_use]
    pub fn dialect(self) -> Dialect {
        match self {
            Self::Postgres => Dialect::Postgres,
            Self::Mysql => Dialect::Mysql,
        }
    }

    /// The protocol number the kernel programs carry in their records.
    #[must_use]
    pub fn wire_id(self) -> u32 {
        match self {
            Self::Postgres => interceptor_common::PROTOCOL_POSTGRES,
            Self::Mysql => interceptor_common::PROTOCOL_MYSQL,
        }
    }
}

/// A target's destination: one address or a CIDR block, and a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetAddress {
    pub ip: IpAddr,
    /// Prefix length in the address's own family (32 for one IPv4 address).
    pub prefix: u8,
    pub port: u16,
}

impl TargetAddress {
    /// The address as IPv6 (IPv4 mapped) and the prefix length over 128 bits.
    #[must_use]
    pub fn mapped(&self) -> (Ipv6Addr, u8) {
        match self.ip {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped(), self.prefix + 96),
            IpAddr::V6(v6) => (v6, self.prefix),
        }
    }

    /// Whether a concrete destination falls inside this target.
    #[must_use]
    pub fn contains(&self, dst: SocketAddr) -> bool {
        if dst.port() != self.port {
            return false;
        }
        let (net, bits) = self.mapped();
        let ip = match dst.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let mask = if bits == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(bits))
        };
        (u128::from(ip) & mask) == (u128::from(net) & mask)
    }
}

impl fmt::Display for TargetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.ip.is_ipv4() { 32 } else { 128 };
        match (self.ip, self.prefix == full) {
            (IpAddr::V4(ip), true) => write!(f, "{ip}:{}", self.port),
            (IpAddr::V4(ip), false) => write!(f, "{ip}/{}:{}", self.prefix, self.port),
            (IpAddr::V6(ip), true) => write!(f, "[{ip}]:{}", self.port),
            (IpAddr::V6(ip), false) => write!(f, "[{ip}/{}]:{}", self.prefix, self.port),
        }
    }
}

impl FromStr for TargetAddress {
    type Err = String;

    /// `ip:port`, `[ipv6]:port`, `cidr:port` (`10.0.0.0/8:5432`) or
    /// `[ipv6/len]:port`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "invalid target address {s:?}: expected ip:port, [ipv6]:port or cidr:port such as 10.0.0.0/8:5432"
            )
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
            (host, port)
        } else {
            s.rsplit_once(':').ok_or_else(bad)?
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(format!("invalid target address {s:?}: port 0"));
        }
        let (ip, prefix) = match host.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (host, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        let full: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= full)
                .ok_or_else(|| format!("invalid prefix length in {s:?} (0..={full})"))?,
            None => full,
        };
        Ok(Self { ip, prefix, port })
    }
}

impl<'de> Deserialize<'de> for TargetAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for TargetAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Deserialises a glob, rejecting bad patterns where they stand (so the
/// error carries line and column).
fn glob<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    if let Some(p) = &s {
        globset::Glob::new(p)
            .map_err(|e| serde::de::Error::custom(format!("bad glob {p:?}: {e}")))?;
    }
    Ok(s)
}

fn globs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v = Option::<Vec<String>>::deserialize(d)?;
    for p in v.iter().flatten() {
        globset::Glob::new(p)
            .map_err(|e| serde::de::Error::custom(format!("bad glob {p:?}: {e}")))?;
    }
    Ok(v)
}

fn fingerprints<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v = Option::<Vec<String>>::deserialize(d)?;
    for f in v.iter().flatten() {
        if Fingerprint::parse_id(f).is_none() {
            return Err(serde::de::Error::custom(format!(
                "bad fingerprint {f:?}: expected v1: and 16 hex digits"
            )));
        }
    }
    Ok(v)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(try_from = "TargetSpecText", into = "TargetSpecText")]
pub struct TargetSpec {
    pub name: String,
    pub protocol: Protocol,
    /// An address, CIDR block or DNS name, with the port; or a Kubernetes
    /// Service with its Service port (`service:` and `port:` in the file).
    pub address: super::TargetDest,
    /// Schema unqualified PostgreSQL names resolve to (default `public`).
    #[serde(default)]
    pub default_schema: Option<String>,
    /// Credentials the agent uses only to cancel a blocked connection's
    /// statement on a MySQL/MariaDB server (`KILL QUERY` over a side
    /// connection). PostgreSQL needs none: its CancelRequest carries the
    /// session's own key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminSpec>,
    /// TLS towards workloads and towards the server.
    #[serde(default)]
    pub tls: super::TlsSpec,
    /// Database users the agent logs in as itself, for the workloads each
    /// entry names (they then hold no password).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logins: Vec<super::LoginSpec>,
}

/// A target as written: `address:`, or `service:` with `port:`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TargetSpecText {
    name: String,
    protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<super::TargetDest>,
    /// `NAMESPACE/NAME` of a Kubernetes Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    /// The Service port of `service:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(default)]
    default_schema: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    admin: Option<AdminSpec>,
    #[serde(default)]
    tls: super::TlsSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    logins: Vec<super::LoginSpec>,
}

impl TryFrom<TargetSpecText> for TargetSpec {
    type Error = String;

    fn try_from(t: TargetSpecText) -> Result<Self, String> {
        let name = &t.name;
        let address = match (t.address, t.service, t.port) {
            (Some(_), Some(_), _) => {
                return Err(format!(
                    "target {name:?}: give either address or service, not both"
                ));
            }
            (Some(_), None, Some(_)) => {
                return Err(format!(
                    "target {name:?}: port goes with service; an address carries its own port (ip:port)"
                ));
            }
            (Some(a), None, None) => a,
            (None, Some(svc), port) => {
                let (ns, svc_name) = super::names::parse_service(&svc)
                    .map_err(|e| format!("target {name:?}: {e}"))?;
                let port = match port {
                    Some(0) => return Err(format!("target {name:?}: port 0")),
                    Some(p) => p,
                    None => {
                        return Err(format!(
                            "target {name:?}: service {svc} needs port: (the Service port, as in the Service's spec.ports)"
                        ));
                    }
                };
                super::TargetDest::Service(super::ServiceAddress::new(ns, svc_name, port))
            }
            (None, None, _) => {
                return Err(format!(
                    "target {name:?}: missing address (ip:port, cidr:port or name:port) or service (NAMESPACE/NAME with port)"
                ));
            }
        };
        let mut tls = t.tls;
        if address.unix().is_some() {
            // A local socket: nothing to encrypt, and no client asks.
            if !matches!(
                tls.server,
                super::ServerTls::Prefer | super::ServerTls::Disable
            ) || tls.server_ca.is_some()
                || tls.server_name.is_some()
                || tls.cert.is_some()
                || tls.key.is_some()
            {
                return Err(format!(
                    "target {name:?}: a unix socket target takes no tls: settings (neither leg of a local socket uses TLS)"
                ));
            }
            tls.server = super::ServerTls::Disable;
        }
        Ok(Self {
            name: t.name,
            protocol: t.protocol,
            address,
            default_schema: t.default_schema,
            admin: t.admin,
            tls,
            logins: t.logins,
        })
    }
}

impl From<TargetSpec> for TargetSpecText {
    fn from(t: TargetSpec) -> Self {
        let (address, service, port) = match t.address {
            super::TargetDest::Service(s) => (None, Some(s.key()), Some(s.port)),
            a => (Some(a), None, None),
        };
        Self {
            name: t.name,
            protocol: t.protocol,
            address,
            service,
            port,
            default_schema: t.default_schema,
            admin: t.admin,
            tls: t.tls,
            logins: t.logins,
        }
    }
}

/// A database account for the agent's own side connections.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSpec {
    pub user: String,
    /// Environment variable of the agent holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// File holding the password (trailing newline ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl AdminSpec {
    /// The password, read now (so a rotated secret is picked up).
    ///
    /// # Errors
    /// When the variable is unset or the file unreadable.
    pub fn password(&self) -> Result<super::Secret, String> {
        self.source().read()
    }

    fn source(&self) -> super::logins::SecretSource<'_> {
        super::logins::SecretSource {
            env: self.password_env.as_deref(),
            file: self.password_file.as_deref(),
        }
    }
}

/// A named set of conditions on a workload's identity; every field given
/// must match.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySelectorSpec {
    /// Glob over the cgroup path.
    #[serde(default, deserialize_with = "glob")]
    pub cgroup: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub comm: Option<String>,
    /// Glob over the executable path.
    #[serde(default, deserialize_with = "glob")]
    pub exe: Option<String>,
    #[serde(default)]
    pub exe_sha256: Option<String>,
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub container: Option<String>,
    #[serde(default)]
    pub pod_uid: Option<String>,
    #[serde(default)]
    pub mode: Option<IdentityMode>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    pub url: String,
    /// `json` (default) or `slack`.
    #[serde(default)]
    pub format: Option<String>,
    /// Extra request headers (such as an authorization token).
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSpec {
    /// Unix groups whose members may approve.
    #[serde(default)]
    pub approvers: Vec<String>,
    /// How many distinct approvers are needed (default 1).
    #[serde(default)]
    pub required: Option<u32>,
    /// How long a statement waits, such as `5m` (default 5m).
    #[serde(default)]
    pub timeout: Option<String>,
    /// `deny` (default) or `escalate`.
    #[serde(default)]
    pub on_timeout: Option<String>,
    #[serde(default)]
    pub escalate_to: Option<Vec<String>>,
    #[serde(default)]
    pub escalation_timeout: Option<String>,
    #[serde(default)]
    pub notify: Option<Vec<NotifySpec>>,
}

/// What happens when nobody answered an approval in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTimeout {
    Deny,
    Escalate,
}

impl ApprovalSpec {
    /// Default wait for an answer.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

    /// Distinct approvers needed (at least 1).
    #[must_use]
    pub fn required(&self) -> u32 {
        self.required.unwrap_or(1).max(1)
    }

    /// How long a statement waits for its approvers.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
            .unwrap_or(Self::DEFAULT_TIMEOUT)
    }

    /// Escalate when `on_timeout: escalate`, or when `escalate_to` is set
    /// without `on_timeout`.
    #[must_use]
    pub fn on_timeout(&self) -> OnTimeout {
        match self.on_timeout.as_deref() {
            Some("escalate") => OnTimeout::Escalate,
            None if self.escalate_to.as_ref().is_some_and(|g| !g.is_empty()) => OnTimeout::Escalate,
            _ => OnTimeout::Deny,
        }
    }

    /// How long an escalated statement waits (default: `timeout` again).
    #[must_use]
    pub fn escalation_timeout(&self) -> Duration {
        self.escalation_timeout
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
            .unwrap_or_else(|| self.timeout())
    }

    fn validate(&self) -> Result<(), String> {
        if self.approvers.is_empty() {
            return Err("approvers must name at least one unix group".into());
        }
        if self.required == Some(0) {
            return Err("required must be at least 1".into());
        }
        for (name, d) in [
            ("timeout", &self.timeout),
            ("escalation_timeout", &self.escalation_timeout),
        ] {
            if let Some(d) = d {
                let v = parse_duration(d).map_err(|e| format!("{name}: {e}"))?;
                if v.is_zero() {
                    return Err(format!("{name} must be longer than zero"));
                }
            }
        }
        match self.on_timeout.as_deref() {
            None | Some("deny") | Some("escalate") => {}
            Some(other) => {
                return Err(format!(
                    "on_timeout must be deny or escalate, not {other:?}"
                ));
            }
        }
        let escalate_to = self.escalate_to.as_deref().unwrap_or_default();
        if self.on_timeout.as_deref() == Some("escalate") && escalate_to.is_empty() {
            return Err("on_timeout: escalate needs escalate_to groups".into());
        }
        if self.on_timeout.as_deref() == Some("deny") && !escalate_to.is_empty() {
            return Err("escalate_to is given but on_timeout is deny".into());
        }
        if self.escalation_timeout.is_some() && escalate_to.is_empty() {
            return Err("escalation_timeout needs escalate_to".into());
        }
        for n in self.notify.iter().flatten() {
            super::HttpUrl::parse(&n.url).map_err(|e| format!("notify url {:?}: {e}", n.url))?;
            match n.format.as_deref() {
                None | Some("json" | "slack") => {}
                Some(other) => {
                    return Err(format!(
                        "notify format must be json or slack, not {other:?}"
                    ));
                }
            }
            for (k, v) in n.headers.iter().flatten() {
                let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
                if k.is_empty() || !k.chars().all(token) {
                    return Err(format!("notify header name {k:?} is not a valid token"));
                }
                if v.chars().any(|c| c.is_control() && c != '\t') {
                    return Err(format!("notify header {k:?} has a control character"));
                }
            }
        }
        Ok(())
    }
}

/// Parses a duration such as `500ms`, `30s`, `5m`, `1h`, `1h30m`, `1h 30m`,
/// `2d` (humantime's syntax; a bare number is seconds).
///
/// # Errors
/// When the text is not such a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{text:?} is no duration (use e.g. 30s, 5m, 1h, 1h30m): {e}"))
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default)]
    pub identities: Option<Vec<String>>,
    #[serde(default)]
    pub targets: Option<Vec<String>>,
    #[serde(default, deserialize_with = "globs")]
    pub databases: Option<Vec<String>>,
    #[serde(default, deserialize_with = "globs")]
    pub db_users: Option<Vec<String>>,
    #[serde(default)]
    pub kinds: Option<Vec<Kind>>,
    /// Every table touched matches one of these globs.
    #[serde(default, deserialize_with = "globs")]
    pub tables: Option<Vec<String>>,
    /// At least one table touched matches one of these globs.
    #[serde(default, deserialize_with = "globs")]
    pub any_tables: Option<Vec<String>>,
    #[serde(default, deserialize_with = "globs")]
    pub functions: Option<Vec<String>>,
    #[serde(default, deserialize_with = "globs")]
    pub any_functions: Option<Vec<String>>,
    #[serde(default, rename = "where")]
    pub where_clause: Option<WherePresence>,
    #[serde(default)]
    pub max_limit: Option<u64>,
    /// Any of these flags.
    #[serde(default)]
    pub flags: Option<Vec<Flag>>,
    #[serde(default, deserialize_with = "fingerprints")]
    pub fingerprints: Option<Vec<String>>,
    pub decision: Decision,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub approval: Option<ApprovalSpec>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub version: u32,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub default: Decision,
    #[serde(default)]
    pub on_parse_error: Decision,
    #[serde(default)]
    pub targets: Vec<TargetSpec>,
    #[serde(default)]
    pub identities: BTreeMap<String, IdentitySelectorSpec>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// Bounds on SQL analysis (statement size, nesting, tokens).
    #[serde(default)]
    pub limits: Limits,
    /// The audit log's queue, flushing, rotation and redaction.
    #[serde(default)]
    pub audit: AuditSettings,
    /// How often targets given by DNS name are resolved again (default
    /// 30s; the system resolver reports no TTL). Each policy load also
    /// resolves them at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve_every: Option<String>,
}

impl PolicyFile {
    /// Reads and validates a policy file.
    ///
    /// # Errors
    /// When the file cannot be read, is not valid YAML of this format, or
    /// refers to names it does not define.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates policy text; `path` only labels errors.
    ///
    /// # Errors
    /// As [`PolicyFile::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        let file: Self = serde_yaml_ng::from_str(text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            PolicyError::Syntax {
                path: path.to_owned(),
                line,
                column,
                message: e.to_string(),
            }
        })?;
        file.validate().map_err(|message| PolicyError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(file)
    }

    fn validate(&self) -> Result<(), String> {
        if self.version != 1 {
            return Err(format!("unsupported version {} (expected 1)", self.version));
        }
        self.audit.validate()?;
        if let Some(every) = &self.resolve_every {
            let d = parse_duration(every).map_err(|e| format!("resolve_every: {e}"))?;
            if d < Duration::from_millis(100) {
                return Err(format!("resolve_every {every:?} is below 100ms"));
            }
        }
        let mut names = HashSet::new();
        for t in &self.targets {
            if !names.insert(t.name.as_str()) {
                return Err(format!("target {:?} is defined twice", t.name));
            }
            if let Some(a) = &t.admin {
                a.source()
                    .validate(false)
                    .map_err(|e| format!("target {:?}: admin {e}", t.name))?;
                if t.protocol != Protocol::Mysql {
                    return Err(format!(
                        "target {:?}: admin credentials are only used for mysql targets",
                        t.name
                    ));
                }
            }
        }
        for t in &self.targets {
            self.validate_logins(t)?;
        }
        for (i, a) in self.targets.iter().enumerate() {
            for b in &self.targets[i + 1..] {
                if a.address == b.address {
                    return Err(format!(
                        "targets {:?} and {:?} have the same address {}",
                        a.name, b.name, a.address
                    ));
                }
            }
        }
        let mut rule_names = HashSet::new();
        for r in &self.rules {
            if !rule_names.insert(r.name.as_str()) {
                return Err(format!("rule {:?} is defined twice", r.name));
            }
            for id in r.identities.iter().flatten() {
                if !self.identities.contains_key(id) {
                    return Err(format!("rule {:?} names unknown identity {id:?}", r.name));
                }
            }
            for t in r.targets.iter().flatten() {
                if !names.contains(t.as_str()) {
                    return Err(format!("rule {:?} names unknown target {t:?}", r.name));
                }
            }
            if r.approval.is_some() && r.decision != Decision::Approve {
                return Err(format!(
                    "rule {:?} has approval settings but its decision is {}",
                    r.name, r.decision
                ));
            }
            if let Some(a) = &r.approval {
                a.validate()
                    .map_err(|e| format!("rule {:?}: approval: {e}", r.name))?;
            }
        }
        Ok(())
    }

    /// A target's `logins:`: one entry per user, known identities, and a
    /// secret that can be read now, from a file only the agent can read.
    fn validate_logins(&self, t: &TargetSpec) -> Result<(), String> {
        let mut users = HashSet::new();
        for l in &t.logins {
            let at = || format!("target {:?}: logins entry for {:?}", t.name, l.db_user);
            if !users.insert(l.db_user.as_str()) {
                return Err(format!("{}: the user has two entries", at()));
            }
            if l.identities.is_empty() {
                return Err(format!("{}: names no identities", at()));
            }
            for id in &l.identities {
                if !self.identities.contains_key(id) {
                    return Err(format!("{}: unknown identity {id:?}", at()));
                }
            }
            l.source()
                .validate(true)
                .map_err(|e| format!("{}: {e}", at()))?;
        }
        Ok(())
    }

    /// Default for [`PolicyFile::resolve_every`].
    pub const DEFAULT_RESOLVE_EVERY: Duration = Duration::from_secs(30);

    /// How often DNS-named targets are resolved again.
    #[must_use]
    pub fn resolve_every(&self) -> Duration {
        self.resolve_every
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
            .unwrap_or(Self::DEFAULT_RESOLVE_EVERY)
    }

    /// The targets given by DNS name, with their positions.
    pub fn named_targets(
        &self,
    ) -> impl Iterator<Item = (usize, &TargetSpec, &super::NamedAddress)> {
        self.targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.address.name().map(|n| (i, t, n)))
    }

    /// The targets given by Kubernetes Service, with their positions.
    pub fn service_targets(
        &self,
    ) -> impl Iterator<Item = (usize, &TargetSpec, &super::ServiceAddress)> {
        self.targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.address.service().map(|s| (i, t, s)))
    }

    /// The target a concrete destination belongs to: the most specific
    /// (longest prefix) match, as the kernel's LPM trie picks it.
    #[must_use]
    pub fn target_for(&self, dst: SocketAddr) -> Option<(usize, &TargetSpec)> {
        self.targets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.address.routes(dst))
            .max_by_key(|(_, t)| t.address.specificity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PolicyFile, PolicyError> {
        PolicyFile::parse(text, Path::new("test.yaml"))
    }

    #[test]
    fn parses_addresses() {
        let a: TargetAddress = "127.0.0.1:5432".parse().unwrap();
        assert_eq!((a.prefix, a.port), (32, 5432));
        let b: TargetAddress = "10.0.0.0/8:3306".parse().unwrap();
        assert_eq!(b.mapped().1, 104);
        let c: TargetAddress = "[::1]:5432".parse().unwrap();
        assert_eq!(c.prefix, 128);
        let d: TargetAddress = "[fd00::/64]:5432".parse().unwrap();
        assert_eq!(d.prefix, 64);
        for bad in [
            "127.0.0.1",
            "x:5432",
            "10.0.0.0/33:1",
            "127.0.0.1:0",
            "[::1:5432",
            "",
        ] {
            assert!(bad.parse::<TargetAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn target_matching_prefers_longest_prefix() {
        let p = parse(
            "version: 1\ntargets:\n  - {name: wide, protocol: postgres, address: 10.0.0.0/8:5432}\n  - {name: one, protocol: postgres, address: 10.1.2.3:5432}\n",
        )
        .unwrap();
        let hit = |s: &str| {
            p.target_for(s.parse().unwrap())
                .map(|(_, t)| t.name.clone())
        };
        assert_eq!(hit("10.1.2.3:5432").as_deref(), Some("one"));
        assert_eq!(hit("10.9.9.9:5432").as_deref(), Some("wide"));
        assert_eq!(hit("10.9.9.9:5433"), None);
        assert_eq!(hit("[::ffff:10.9.9.9]:5432").as_deref(), Some("wide"));
    }

    #[test]
    fn unknown_field_is_located() {
        let err = parse(
            "version: 1\ntargets:\n  - name: a\n    protocol: postgres\n    adress: 1.2.3.4:5\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("test.yaml:5:"), "{err}");
        assert!(err.contains("adress"), "{err}");
    }

    #[test]
    fn bad_address_is_located() {
        let err =
            parse("version: 1\ntargets:\n  - name: a\n    protocol: postgres\n    address: nope\n")
                .unwrap_err()
                .to_string();
        // serde_yaml_ng places a value's custom error at its entry.
        assert!(err.starts_with("test.yaml:3:"), "{err}");
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn service_targets() {
        let p = parse(
            "version: 1\ntargets:\n  - {name: a, protocol: postgres, service: prod/pg, port: 5432}\n  - {name: b, protocol: postgres, address: 10.0.0.1:5432}\n",
        )
        .unwrap();
        let svc = p.targets[0].address.service().unwrap();
        assert_eq!((svc.key().as_str(), svc.port), ("prod/pg", 5432));
        assert_eq!(p.service_targets().count(), 1);
        // Nothing is redirected before the Service is watched.
        assert!(p.targets[0].address.prefixes().is_empty());
        let dst: SocketAddr = "10.244.1.5:5433".parse().unwrap();
        svc.apply(
            &[dst, "10.96.0.10:5432".parse().unwrap()],
            std::time::SystemTime::now(),
        );
        assert_eq!(p.target_for(dst).map(|(_, t)| t.name.as_str()), Some("a"));
        assert_eq!(p.targets[0].address.prefixes().len(), 2);
        // Written back the way it was given.
        let text = serde_yaml_ng::to_string(&p.targets[0]).unwrap();
        assert!(
            text.contains("service: prod/pg") && text.contains("port: 5432"),
            "{text}"
        );
        assert!(!text.contains("address"), "{text}");
        for (target, want) in [
            (
                "service: prod/pg, address: 10.0.0.1:5432, port: 1",
                "not both",
            ),
            ("service: prod/pg", "needs port"),
            ("service: prod/pg, port: 0", "port 0"),
            (
                "address: 10.0.0.1:5432, port: 5432",
                "port goes with service",
            ),
            ("service: pg, port: 5432", "NAMESPACE/NAME"),
            ("service: Prod/pg, port: 5432", "namespace \"Prod\""),
            ("service: prod/9pg, port: 5432", "name \"9pg\""),
            ("service: prod/pg-, port: 5432", "name \"pg-\""),
            ("service: prod/pg/x, port: 5432", "name \"pg/x\""),
            ("service: prod/pg, port: 70000", "70000"),
            ("port: 5432", "missing address"),
        ] {
            let err = parse(&format!(
                "version: 1\ntargets:\n  - {{name: a, protocol: postgres, {target}}}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(want), "{target}: {err}");
            assert!(err.starts_with("test.yaml:3:"), "{target}: {err}");
        }
        let err = parse(
            "version: 1\ntargets:\n  - {name: a, protocol: postgres, service: prod/pg, port: 5432}\n  - {name: b, protocol: postgres, service: prod/pg, port: 5432}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("same address"), "{err}");
    }

    #[test]
    fn audit_section() {
        let p = parse(
            "version: 1\naudit:\n  overflow: drop\n  queue: 4\n  flush: every\n  fsync: true\n  rotate_bytes: 1000\n  retain: 2\n  redact_literals: true\n",
        )
        .unwrap();
        assert_eq!(p.audit.overflow, crate::policy::Overflow::Drop);
        assert_eq!(
            (p.audit.queue, p.audit.rotate_bytes, p.audit.retain),
            (4, 1000, 2)
        );
        assert!(p.audit.fsync && p.audit.redact_literals);
        assert_eq!(
            parse("version: 1\n").unwrap().audit,
            AuditSettings::default()
        );
        let err = parse("version: 1\naudit:\n  queue: 4\n  rotate: 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.yaml:4:"), "{err}");
        let err = parse("version: 1\naudit:\n  queue: 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("audit.queue"), "{err}");
        let err = parse("version: 1\naudit:\n  overflow: later\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("later"), "{err}");
        use crate::policy::Executions;
        assert_eq!(
            parse("version: 1\n").unwrap().audit.executions,
            Executions::Summary
        );
        for (text, want) in [
            ("summary", Executions::Summary),
            ("each", Executions::Each),
            ("off", Executions::Off),
        ] {
            let p = parse(&format!("version: 1\naudit:\n  executions: {text}\n")).unwrap();
            assert_eq!(p.audit.executions, want);
            assert_eq!(Executions::from_u8(want.as_u8()), want);
        }
        let err = parse("version: 1\naudit:\n  executions: all\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:3:") && err.contains("all"),
            "{err}"
        );
    }

    #[test]
    fn references_are_checked() {
        let err = parse(
            "version: 1\nrules:\n  - name: r\n    identities: [ghost]\n    decision: allow\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("ghost"), "{err}");
    }
}
