//! Target destinations given by DNS name (`db.internal:5432`) or by
//! Kubernetes Service (`service: NAMESPACE/NAME`, `port:`): the name, its
//! addresses as last resolved or watched, and the diff between two
//! resolutions.
//!
//! The system resolver (`getaddrinfo`, so `/etc/hosts`, search domains and
//! nsswitch apply as for the workloads) reports no TTL, so a name is
//! resolved again every `resolve_every` and at once on each policy load. A
//! Service is watched through the Kubernetes API (`crate::kube`).
//!
//! Both keep socket addresses: a DNS name's all carry its port, while a
//! Service's ClusterIPs carry the Service port and its endpoints the
//! endpoint (target) port, which may differ per EndpointSlice.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs as _},
    str::FromStr,
    sync::{Arc, PoisonError, RwLock},
    time::SystemTime,
};

use serde::{Deserialize, Deserializer, Serialize};

use super::TargetAddress;

/// Where a target is: an address or CIDR block, a DNS name kept resolved,
/// or a Kubernetes Service kept watched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetDest {
    Net(TargetAddress),
    Name(NamedAddress),
    Service(ServiceAddress),
    /// A unix-domain socket path (`unix:/var/run/postgresql/.s.PGSQL.5432`).
    Unix(std::path::PathBuf),
}

/// Longest unix socket path (`sun_path` holds 108 bytes with its NUL).
pub const MAX_UNIX_PATH: usize = 107;

/// A DNS name and port, with its addresses as last resolved (shared by all
/// clones of the policy that carries it).
#[derive(Clone, Debug)]
pub struct NamedAddress {
    pub host: String,
    pub port: u16,
    state: Arc<RwLock<NameState>>,
}

impl PartialEq for NamedAddress {
    fn eq(&self, other: &Self) -> bool {
        self.host.eq_ignore_ascii_case(&other.host) && self.port == other.port
    }
}

impl Eq for NamedAddress {}

/// A Kubernetes Service and its Service port: the ClusterIPs at that port
/// and its ready endpoints at the matching endpoint port are redirected.
/// The addresses are shared by all clones of the policy that carries it,
/// and by the next policy naming the same Service and port (so a reload
/// neither forgets nor re-learns them).
#[derive(Clone, Debug)]
pub struct ServiceAddress {
    pub namespace: String,
    pub name: String,
    /// The Service port (`spec.ports[].port`), not the endpoint port.
    pub port: u16,
    state: Arc<RwLock<NameState>>,
}

impl PartialEq for ServiceAddress {
    fn eq(&self, other: &Self) -> bool {
        self.namespace == other.namespace && self.name == other.name && self.port == other.port
    }
}

impl Eq for ServiceAddress {}

/// What the agent knows of a name or Service now.
#[derive(Clone, Debug, Default)]
pub struct NameState {
    /// The addresses redirected now (sorted).
    pub current: Vec<SocketAddr>,
    /// Every address the name has had since this policy loaded (a
    /// Service's: since the agent began watching it): live connections to
    /// an address that left keep their target.
    pub known: Vec<SocketAddr>,
    /// When `current` was last confirmed by a successful resolution.
    pub resolved_at: Option<SystemTime>,
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
}

/// The difference one resolution made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameChange {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

impl NameChange {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// Plain IPv4 for IPv4-mapped IPv6, so both spellings compare equal.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(a.ip()), a.port())
}

/// Sorted, deduplicated addresses and the diff against `old` (sorted).
#[must_use]
pub fn diff(old: &[SocketAddr], new: &[SocketAddr]) -> (Vec<SocketAddr>, NameChange) {
    let mut new: Vec<SocketAddr> = new.iter().copied().map(canonical).collect();
    new.sort_unstable();
    new.dedup();
    let change = NameChange {
        added: new.iter().filter(|a| !old.contains(a)).copied().collect(),
        removed: old.iter().filter(|a| !new.contains(a)).copied().collect(),
    };
    (new, change)
}

/// The shared addresses of a name or Service, and how they change.
type Shared = Arc<RwLock<NameState>>;

fn read(state: &Shared) -> NameState {
    state.read().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Records a success: `addrs` become current (and known); returns what
/// changed.
fn apply(state: &Shared, addrs: &[SocketAddr], at: SystemTime) -> NameChange {
    let mut s = state.write().unwrap_or_else(PoisonError::into_inner);
    let (current, change) = diff(&s.current, addrs);
    for a in &current {
        if !s.known.contains(a) {
            s.known.push(*a);
        }
    }
    s.current = current;
    s.resolved_at = Some(at);
    s.last_error = None;
    change
}

/// Records a failure: the last good addresses stay.
fn fail(state: &Shared, error: String) {
    state
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .last_error = Some(error);
}

fn has(state: &Shared, dst: SocketAddr, known: bool) -> bool {
    let dst = canonical(dst);
    let s = state.read().unwrap_or_else(PoisonError::into_inner);
    if known { &s.known } else { &s.current }.contains(&dst)
}

impl NamedAddress {
    #[must_use]
    pub fn new(host: String, port: u16) -> Self {
        Self {
            host,
            port,
            state: Arc::default(),
        }
    }

    /// A copy of what is known now.
    #[must_use]
    pub fn state(&self) -> NameState {
        read(&self.state)
    }

    /// Asks the system resolver for every A and AAAA record (blocking).
    ///
    /// # Errors
    /// When the name does not resolve or has no address.
    pub fn lookup(&self) -> Result<Vec<IpAddr>, String> {
        let addrs: Vec<IpAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .map(|a| a.ip())
            .collect();
        if addrs.is_empty() {
            return Err("no addresses".to_owned());
        }
        Ok(addrs)
    }

    /// Records a successful resolution; returns what changed.
    pub fn apply(&self, addrs: &[IpAddr], at: SystemTime) -> NameChange {
        let addrs: Vec<SocketAddr> = addrs
            .iter()
            .map(|ip| SocketAddr::new(*ip, self.port))
            .collect();
        apply(&self.state, &addrs, at)
    }

    /// Records a failed resolution: the last good addresses stay.
    pub fn fail(&self, error: String) {
        fail(&self.state, error);
    }

    /// Resolves now and records the outcome.
    ///
    /// # Errors
    /// The resolver's error (the last good addresses stay in force).
    pub fn refresh(&self) -> Result<NameChange, String> {
        match self.lookup() {
            Ok(addrs) => Ok(self.apply(&addrs, SystemTime::now())),
            Err(e) => {
                self.fail(e.clone());
                Err(e)
            }
        }
    }
}

impl ServiceAddress {
    #[must_use]
    pub fn new(namespace: String, name: String, port: u16) -> Self {
        Self {
            namespace,
            name,
            port,
            state: Arc::default(),
        }
    }

    /// `NAMESPACE/NAME`.
    #[must_use]
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// A copy of what is known now.
    #[must_use]
    pub fn state(&self) -> NameState {
        read(&self.state)
    }

    /// Records what the API says now (ClusterIPs at the Service port,
    /// endpoints at theirs); returns what changed.
    pub fn apply(&self, addrs: &[SocketAddr], at: SystemTime) -> NameChange {
        apply(&self.state, addrs, at)
    }

    /// Records a failure to learn the Service's addresses: the last good
    /// ones stay.
    pub fn fail(&self, error: String) {
        fail(&self.state, error);
    }

    /// Shares `other`'s addresses (the same Service and port in the policy
    /// in force) instead of starting empty.
    pub fn adopt(&mut self, other: &Self) {
        if self == other {
            self.state = Arc::clone(&other.state);
        }
    }

    /// Whether `other` holds the very same addresses (not just an equal
    /// Service).
    #[must_use]
    pub fn shares(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }
}

fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

impl TargetDest {
    /// The port of an address or name, or a Service's Service port.
    #[must_use]
    pub fn port(&self) -> u16 {
        match self {
            Self::Net(n) => n.port,
            Self::Name(n) => n.port,
            Self::Service(s) => s.port,
            Self::Unix(_) => 0,
        }
    }

    /// The socket path of a unix target.
    #[must_use]
    pub fn unix(&self) -> Option<&std::path::Path> {
        match self {
            Self::Unix(p) => Some(p),
            _ => None,
        }
    }

    /// Whether a destination belongs to this target: inside the block, or
    /// any address the name or Service has had (so connections made before
    /// it moved keep their target).
    #[must_use]
    pub fn contains(&self, dst: SocketAddr) -> bool {
        match self {
            Self::Net(n) => n.contains(dst),
            Self::Name(n) => has(&n.state, dst, true),
            Self::Service(s) => has(&s.state, dst, true),
            Self::Unix(_) => false,
        }
    }

    /// Whether a destination is redirected to this target now.
    #[must_use]
    pub fn routes(&self, dst: SocketAddr) -> bool {
        match self {
            Self::Net(n) => n.contains(dst),
            Self::Name(n) => has(&n.state, dst, false),
            Self::Service(s) => has(&s.state, dst, false),
            Self::Unix(_) => false,
        }
    }

    /// Prefix length over 128 bits (a name's addresses are exact).
    #[must_use]
    pub fn specificity(&self) -> u8 {
        match self {
            Self::Net(n) => n.mapped().1,
            Self::Name(_) | Self::Service(_) | Self::Unix(_) => 128,
        }
    }

    /// The (IPv4-mapped) prefixes the kernel redirects now, each with its
    /// port.
    #[must_use]
    pub fn prefixes(&self) -> Vec<(Ipv6Addr, u8, u16)> {
        let exact = |s: NameState| {
            s.current
                .into_iter()
                .map(|a| (mapped(a.ip()), 128, a.port()))
                .collect()
        };
        match self {
            Self::Net(n) => {
                let (net, bits) = n.mapped();
                vec![(net, bits, n.port)]
            }
            Self::Name(n) => exact(n.state()),
            Self::Service(s) => exact(s.state()),
            Self::Unix(_) => Vec::new(),
        }
    }

    #[must_use]
    pub fn name(&self) -> Option<&NamedAddress> {
        match self {
            Self::Name(n) => Some(n),
            Self::Net(_) | Self::Service(_) | Self::Unix(_) => None,
        }
    }

    #[must_use]
    pub fn service(&self) -> Option<&ServiceAddress> {
        match self {
            Self::Service(s) => Some(s),
            Self::Net(_) | Self::Name(_) | Self::Unix(_) => None,
        }
    }

    /// The shared addresses of a name or Service, if this is one.
    #[must_use]
    pub fn watched(&self) -> Option<NameState> {
        match self {
            Self::Net(_) | Self::Unix(_) => None,
            Self::Name(n) => Some(n.state()),
            Self::Service(s) => Some(s.state()),
        }
    }
}

impl fmt::Display for TargetDest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Net(n) => n.fmt(f),
            Self::Name(n) => write!(f, "{}:{}", n.host, n.port),
            Self::Service(s) => write!(f, "service {}/{} port {}", s.namespace, s.name, s.port),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The path of a `unix:` target: absolute, without NUL or `..`, short
/// enough for `sun_path`.
fn parse_unix(path: &str) -> Result<std::path::PathBuf, String> {
    let bad = |why: &str| format!("invalid unix target {path:?}: {why}");
    if !path.starts_with('/') {
        return Err(bad(
            "the socket path must be absolute, such as unix:/var/run/postgresql/.s.PGSQL.5432",
        ));
    }
    if path.contains('\0') {
        return Err(bad("NUL in the path"));
    }
    if path.len() > MAX_UNIX_PATH {
        return Err(bad(&format!(
            "{} bytes, longer than a unix socket path can be ({MAX_UNIX_PATH})",
            path.len()
        )));
    }
    let p = std::path::Path::new(path);
    if p.components().any(|c| {
        matches!(
            c,
            std::path::Component::ParentDir | std::path::Component::CurDir
        )
    }) || path.contains("//")
        || path.ends_with('/')
    {
        return Err(bad(
            "write the path as the server creates it: no '.', '..', '//' or trailing '/' (the kernel compares the text a workload connects to)",
        ));
    }
    Ok(p.to_owned())
}

/// A DNS name as RFC 1123 allows it (plus `_`, which internal zones use).
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // All-numeric dotted text is a (bad) IPv4 address, not a name.
        && !s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// A DNS-1123 label (a namespace); with `letter_first`, a DNS-1035 label
/// (a Service name), as the API server validates them.
fn is_label(s: &str, letter_first: bool) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first()
            .is_some_and(|c| c.is_ascii_lowercase() || (!letter_first && c.is_ascii_digit()))
        && b.last().is_some_and(|c| *c != b'-')
}

/// `NAMESPACE/NAME` of a `service:` target.
///
/// # Errors
/// When either half is not a name the API server would accept.
pub fn parse_service(s: &str) -> Result<(String, String), String> {
    let (ns, name) = s.split_once('/').ok_or_else(|| {
        format!("invalid service {s:?}: expected NAMESPACE/NAME, such as prod/postgres")
    })?;
    if !is_label(ns, false) {
        return Err(format!(
            "invalid service {s:?}: namespace {ns:?} is not a DNS label (a-z, 0-9 and '-', at most 63, starting and ending alphanumeric)"
        ));
    }
    if !is_label(name, true) {
        return Err(format!(
            "invalid service {s:?}: name {name:?} is not a Service name (a-z, 0-9 and '-', at most 63, starting with a letter, not ending with '-')"
        ));
    }
    Ok((ns.to_owned(), name.to_owned()))
}

impl FromStr for TargetDest {
    type Err = String;

    /// What [`TargetAddress`] takes, `name:port`, or `unix:/path`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return parse_unix(path).map(Self::Unix);
        }
        let net_err = match s.parse::<TargetAddress>() {
            Ok(n) => return Ok(Self::Net(n)),
            Err(e) => e,
        };
        let bad = || {
            format!(
                "invalid target address {s:?}: expected ip:port, [ipv6]:port, cidr:port such as 10.0.0.0/8:5432, or name:port such as db.internal:5432"
            )
        };
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(bad());
        };
        if host.contains(['[', ']', '/', ':']) || !is_dns_name(host) {
            // An address-looking value keeps the address parser's message.
            return Err(
                if host.contains(['[', '/'])
                    || host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                {
                    net_err
                } else {
                    bad()
                },
            );
        }
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(format!("invalid target address {s:?}: port 0"));
        }
        Ok(Self::Name(NamedAddress::new(host.to_owned(), port)))
    }
}

impl<'de> Deserialize<'de> for TargetDest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for TargetDest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// The addresses at port 5432.
    fn at(v: &[&str]) -> Vec<SocketAddr> {
        ips(v)
            .into_iter()
            .map(|ip| SocketAddr::new(ip, 5432))
            .collect()
    }

    #[test]
    fn parses_names_and_addresses() {
        assert!(matches!("127.0.0.1:5432".parse(), Ok(TargetDest::Net(_))));
        assert!(matches!("[fd00::/64]:5432".parse(), Ok(TargetDest::Net(_))));
        let TargetDest::Name(n) = "db.internal:5432".parse().unwrap() else {
            panic!("not a name");
        };
        assert_eq!((n.host.as_str(), n.port), ("db.internal", 5432));
        assert!("db:5432".parse::<TargetDest>().is_ok());
        assert!("_pg._tcp.example.com.:5432".parse::<TargetDest>().is_ok());
        for bad in [
            "db.internal",
            "db.internal:0",
            "db.internal:x",
            "-db:5432",
            "db..x:5432",
            "10.0.0.0/33:1",
            "300.1.1.1:5432",
            "a b:5432",
            ":5432",
            "",
        ] {
            assert!(bad.parse::<TargetDest>().is_err(), "{bad}");
        }
        assert!(
            "10.0.0.0/33:1"
                .parse::<TargetDest>()
                .unwrap_err()
                .contains("prefix")
        );
        assert_eq!(
            "DB.internal:5432".parse::<TargetDest>().unwrap(),
            "db.internal:5432".parse::<TargetDest>().unwrap()
        );
    }

    #[test]
    fn diff_reports_added_and_removed() {
        let (cur, ch) = diff(&[], &at(&["10.0.0.2", "10.0.0.1", "10.0.0.1"]));
        assert_eq!(cur, at(&["10.0.0.1", "10.0.0.2"]));
        assert_eq!(ch.added, cur);
        assert!(ch.removed.is_empty());
        let (cur2, ch) = diff(&cur, &at(&["10.0.0.2", "::ffff:10.0.0.3", "fd00::1"]));
        assert_eq!(cur2, at(&["10.0.0.2", "10.0.0.3", "fd00::1"]));
        assert_eq!(ch.added, at(&["10.0.0.3", "fd00::1"]));
        assert_eq!(ch.removed, at(&["10.0.0.1"]));
        assert!(diff(&cur2, &cur2).1.is_empty());
    }

    #[test]
    fn moved_name_keeps_old_address_for_live_connections_only() {
        let TargetDest::Name(n) = "db:5432".parse().unwrap() else {
            panic!()
        };
        let dest = TargetDest::Name(n.clone());
        let old: SocketAddr = "10.0.0.1:5432".parse().unwrap();
        let new: SocketAddr = "10.0.0.2:5432".parse().unwrap();
        assert!(!dest.contains(old));
        n.apply(&ips(&["10.0.0.1"]), SystemTime::now());
        assert!(dest.routes(old) && dest.contains(old));
        let ch = n.apply(&ips(&["10.0.0.2"]), SystemTime::now());
        assert_eq!(ch.removed, at(&["10.0.0.1"]));
        assert!(!dest.routes(old) && dest.contains(old));
        assert!(dest.routes(new));
        assert!(!dest.contains("10.0.0.2:5433".parse().unwrap()));
        n.fail("gone".into());
        assert_eq!(n.state().current, at(&["10.0.0.2"]));
        assert_eq!(
            dest.prefixes(),
            vec![("::ffff:10.0.0.2".parse().unwrap(), 128, 5432)]
        );
    }

    #[test]
    fn service_keeps_endpoint_ports_and_shares_state_across_loads() {
        let svc = ServiceAddress::new("prod".into(), "pg".into(), 5432);
        let dest = TargetDest::Service(svc.clone());
        let cluster: SocketAddr = "10.96.0.10:5432".parse().unwrap();
        let ep: SocketAddr = "10.244.1.5:5433".parse().unwrap();
        let ch = svc.apply(&[ep, cluster], SystemTime::now());
        assert_eq!(ch.added, vec![cluster, ep]);
        assert!(dest.routes(cluster) && dest.routes(ep));
        // The endpoint's address at the Service port is not the endpoint.
        assert!(!dest.routes("10.244.1.5:5432".parse().unwrap()));
        assert_eq!(
            dest.prefixes(),
            vec![
                ("::ffff:10.96.0.10".parse().unwrap(), 128, 5432),
                ("::ffff:10.244.1.5".parse().unwrap(), 128, 5433)
            ]
        );
        // A reloaded policy naming the same Service shares the addresses.
        let mut again = ServiceAddress::new("prod".into(), "pg".into(), 5432);
        assert!(again.state().current.is_empty() && !again.shares(&svc));
        again.adopt(&svc);
        assert!(again.shares(&svc));
        let moved: SocketAddr = "10.244.2.7:5433".parse().unwrap();
        let ch = again.apply(&[cluster, moved], SystemTime::now());
        assert_eq!((ch.added, ch.removed), (vec![moved], vec![ep]));
        assert!(!dest.routes(ep) && dest.contains(ep) && dest.routes(moved));
        let mut other = ServiceAddress::new("prod".into(), "pg".into(), 5433);
        other.adopt(&svc);
        assert!(!other.shares(&svc));
        assert_eq!(dest.to_string(), "service prod/pg port 5432");
    }

    #[test]
    fn service_names() {
        assert_eq!(
            parse_service("prod/pg-main").unwrap(),
            ("prod".to_owned(), "pg-main".to_owned())
        );
        assert!(parse_service("0ns/a1").is_ok());
        let long = "a".repeat(64);
        for bad in [
            "pg",
            "/pg",
            "prod/",
            "prod/Pg",
            "prod/1pg",
            "-prod/pg",
            "prod/pg_x",
            "prod/pg.x",
            &format!("prod/{long}"),
        ] {
            assert!(parse_service(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolves_localhost() {
        let TargetDest::Name(n) = "localhost:5432".parse().unwrap() else {
            panic!()
        };
        let ch = n.refresh().unwrap();
        assert!(!ch.added.is_empty());
    }
}
