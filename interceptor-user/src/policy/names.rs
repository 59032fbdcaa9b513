//! Target destinations given by DNS name (`db.internal:5432`): the name, its
//! addresses as last resolved, and the diff between two resolutions.
//!
//! The system resolver (`getaddrinfo`, so `/etc/hosts`, search domains and
//! nsswitch apply as for the workloads) reports no TTL, so a name is
//! resolved again every `resolve_every` and at once on each policy load.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs as _},
    str::FromStr,
    sync::{Arc, PoisonError, RwLock},
    time::SystemTime,
};

use serde::{Deserialize, Deserializer, Serialize};

use super::TargetAddress;

/// Where a target is: an address or CIDR block, or a DNS name kept resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetDest {
    Net(TargetAddress),
    Name(NamedAddress),
}

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

/// What the agent knows of a name now.
#[derive(Clone, Debug, Default)]
pub struct NameState {
    /// The addresses redirected now (sorted).
    pub current: Vec<IpAddr>,
    /// Every address the name has had since this policy loaded: live
    /// connections to an address that left the name keep their target.
    pub known: Vec<IpAddr>,
    /// When `current` was last confirmed by a successful resolution.
    pub resolved_at: Option<SystemTime>,
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
}

/// The difference one resolution made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameChange {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
}

impl NameChange {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// Plain IPv4 for IPv4-mapped IPv6, so both spellings compare equal.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Sorted, deduplicated addresses and the diff against `old` (sorted).
#[must_use]
pub fn diff(old: &[IpAddr], new: &[IpAddr]) -> (Vec<IpAddr>, NameChange) {
    let mut new: Vec<IpAddr> = new.iter().copied().map(canonical).collect();
    new.sort_unstable();
    new.dedup();
    let change = NameChange {
        added: new.iter().filter(|a| !old.contains(a)).copied().collect(),
        removed: old.iter().filter(|a| !new.contains(a)).copied().collect(),
    };
    (new, change)
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
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
        let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
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

    /// Records a failed resolution: the last good addresses stay.
    pub fn fail(&self, error: String) {
        self.state
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .last_error = Some(error);
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

    fn has(&self, ip: IpAddr, known: bool) -> bool {
        let ip = canonical(ip);
        let s = self.state.read().unwrap_or_else(PoisonError::into_inner);
        if known { &s.known } else { &s.current }.contains(&ip)
    }
}

fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

impl TargetDest {
    #[must_use]
    pub fn port(&self) -> u16 {
        match self {
            Self::Net(n) => n.port,
            Self::Name(n) => n.port,
        }
    }

    /// Whether a destination belongs to this target: inside the block, or
    /// any address the name has had (so connections made before the name
    /// moved keep their target).
    #[must_use]
    pub fn contains(&self, dst: SocketAddr) -> bool {
        match self {
            Self::Net(n) => n.contains(dst),
            Self::Name(n) => dst.port() == n.port && n.has(dst.ip(), true),
        }
    }

    /// Whether a destination is redirected to this target now.
    #[must_use]
    pub fn routes(&self, dst: SocketAddr) -> bool {
        match self {
            Self::Net(n) => n.contains(dst),
            Self::Name(n) => dst.port() == n.port && n.has(dst.ip(), false),
        }
    }

    /// Prefix length over 128 bits (a name's addresses are exact).
    #[must_use]
    pub fn specificity(&self) -> u8 {
        match self {
            Self::Net(n) => n.mapped().1,
            Self::Name(_) => 128,
        }
    }

    /// The (IPv4-mapped) prefixes the kernel redirects now.
    #[must_use]
    pub fn prefixes(&self) -> Vec<(Ipv6Addr, u8)> {
        match self {
            Self::Net(n) => vec![n.mapped()],
            Self::Name(n) => n
                .state()
                .current
                .into_iter()
                .map(|ip| (mapped(ip), 128))
                .collect(),
        }
    }

    #[must_use]
    pub fn name(&self) -> Option<&NamedAddress> {
        match self {
            Self::Name(n) => Some(n),
            Self::Net(_) => None,
        }
    }
}

impl fmt::Display for TargetDest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Net(n) => n.fmt(f),
            Self::Name(n) => write!(f, "{}:{}", n.host, n.port),
        }
    }
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

impl FromStr for TargetDest {
    type Err = String;

    /// What [`TargetAddress`] takes, or `name:port`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
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
        let (cur, ch) = diff(&[], &ips(&["10.0.0.2", "10.0.0.1", "10.0.0.1"]));
        assert_eq!(cur, ips(&["10.0.0.1", "10.0.0.2"]));
        assert_eq!(ch.added, cur);
        assert!(ch.removed.is_empty());
        let (cur2, ch) = diff(&cur, &ips(&["10.0.0.2", "::ffff:10.0.0.3", "fd00::1"]));
        assert_eq!(cur2, ips(&["10.0.0.2", "10.0.0.3", "fd00::1"]));
        assert_eq!(ch.added, ips(&["10.0.0.3", "fd00::1"]));
        assert_eq!(ch.removed, ips(&["10.0.0.1"]));
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
        assert_eq!(ch.removed, ips(&["10.0.0.1"]));
        assert!(!dest.routes(old) && dest.contains(old));
        assert!(dest.routes(new));
        assert!(!dest.contains("10.0.0.2:5433".parse().unwrap()));
        n.fail("gone".into());
        assert_eq!(n.state().current, ips(&["10.0.0.2"]));
        assert_eq!(
            dest.prefixes(),
            vec![("::ffff:10.0.0.2".parse().unwrap(), 128)]
        );
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
