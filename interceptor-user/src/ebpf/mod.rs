//! Loads the embedded kernel programs, fills their maps from the policy's
//! targets and attaches them to one cgroup v2 directory. Dropping the
//! [`Redirector`] detaches everything: no redirect outlives the agent.

use std::{
    fs::File,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use interceptor_common::{
    AgentConfig, BlockKey, ConnRecord, MAP_BLOCKED, MAP_CONFIG, MAP_CONN_BY_ADDR,
    MAP_CONN_BY_COOKIE, MAP_EXEMPT_TGIDS, MAP_TARGETS, PROG_CONNECT4, PROG_CONNECT6,
    PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_SOCK_OPS, SockKey, TARGET_KEY_PORT_BITS, TargetKey,
    TargetValue, v6_words,
};

use crate::{policy::TargetSpec, proxy::OrigDstLookup};

/// The kernel object built by build.rs (aya-build) from `interceptor-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("cannot load the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("kernel object has no {0}")]
    Missing(&'static str),
    #[error("map {name}: {}", chain(source))]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("program {name}: {}", chain(source))]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
}

/// An error with its causes, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Where the agent listens and how it marks its own sockets.
#[derive(Clone, Copy, Debug)]
pub struct ListenerConfig {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
    pub port: u16,
    pub mark: u32,
}

/// Attached kernel programs and the map the agent reads identities from.
pub struct Redirector {
    // Holds the programs' links: dropping it detaches them.
    ebpf: Mutex<Option<Ebpf>>,
    by_addr: Mutex<HashMap<MapData, SockKey, ConnRecord>>,
    targets: Mutex<LpmTrie<MapData, TargetKey, TargetValue>>,
    blocked: Mutex<HashMap<MapData, BlockKey, u32>>,
    cgroup: PathBuf,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

/// The LPM key for a target: port, then the (IPv4-mapped) address prefix.
#[must_use]
pub fn target_key(spec: &TargetSpec) -> Key<TargetKey> {
    let (net, bits) = spec.address.mapped();
    Key::new(
        TARGET_KEY_PORT_BITS + u32::from(bits),
        TargetKey {
            port_be: spec.address.port.to_be(),
            _pad: 0,
            addr: net.octets(),
        },
    )
}

/// The kernel's view of the agent: listener addresses in `bpf_sock_addr` layout.
#[must_use]
pub fn agent_config(l: &ListenerConfig) -> AgentConfig {
    let ip4 = match l.v4.map(|a| a.ip()) {
        Some(IpAddr::V4(v4)) => u32::from_ne_bytes(v4.octets()),
        _ => 0,
    };
    let ip6 = match l.v6.map(|a| a.ip()) {
        Some(IpAddr::V6(v6)) => v6_words(v6.octets()),
        _ => [0; 4],
    };
    AgentConfig {
        listen_ip4: ip4,
        listen_ip6: ip6,
        listen_port_be: l.port.to_be(),
        _pad: 0,
        has_v4: u32::from(l.v4.is_some()),
        has_v6: u32::from(l.v6.is_some()),
        mark: l.mark,
        enabled: 1,
    }
}

impl Redirector {
    /// Loads the programs, fills the maps and attaches to `cgroup`.
    ///
    /// # Errors
    /// When the kernel refuses a program or map, or `cgroup` is not a cgroup
    /// v2 directory.
    pub fn attach(
        cgroup: &Path,
        targets: &[TargetSpec],
        listener: &ListenerConfig,
    ) -> Result<Self, EbpfError> {
        check_cgroup2(cgroup)?;
        raise_memlock();
        let mut ebpf = Ebpf::load(OBJECT)?;

        {
            let map = ebpf
                .map_mut(MAP_EXEMPT_TGIDS)
                .ok_or(EbpfError::Missing(MAP_EXEMPT_TGIDS))?;
            let mut exempt: HashMap<_, u32, u32> =
                HashMap::try_from(map).map_err(map_err(MAP_EXEMPT_TGIDS))?;
            exempt
                .insert(std::process::id(), 1, 0)
                .map_err(map_err(MAP_EXEMPT_TGIDS))?;
        }
        {
            let map = ebpf
                .map_mut(MAP_CONFIG)
                .ok_or(EbpfError::Missing(MAP_CONFIG))?;
            let mut cfg: Array<_, AgentConfig> =
                Array::try_from(map).map_err(map_err(MAP_CONFIG))?;
            cfg.set(0, agent_config(listener), 0)
                .map_err(map_err(MAP_CONFIG))?;
        }

        // Targets are filled after the programs attach (set_targets): until
        // then the programs match nothing, so nothing is redirected early.
        let fd = File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        // Attached as bpf_links (kernel >= 5.7), which always coexist with
        // other programs on the cgroup; the kernel refuses attach flags on
        // links, so the mode must be the flagless `Single`.
        let mode = CgroupAttachMode::Single;
        // sock_ops first, so a connect redirected a moment later is already re-keyed.
        {
            let prog: &mut SockOps = ebpf
                .program_mut(PROG_SOCK_OPS)
                .ok_or(EbpfError::Missing(PROG_SOCK_OPS))?
                .try_into()
                .map_err(prog_err(PROG_SOCK_OPS))?;
            prog.load().map_err(prog_err(PROG_SOCK_OPS))?;
            prog.attach(&fd, mode).map_err(prog_err(PROG_SOCK_OPS))?;
        }
        for name in [
            PROG_GETPEERNAME4,
            PROG_GETPEERNAME6,
            PROG_CONNECT4,
            PROG_CONNECT6,
        ] {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(EbpfError::Missing(name))?
                .try_into()
                .map_err(prog_err(name))?;
            prog.load().map_err(prog_err(name))?;
            prog.attach(&fd, mode).map_err(prog_err(name))?;
        }

        let by_addr_map = ebpf
            .take_map(MAP_CONN_BY_ADDR)
            .ok_or(EbpfError::Missing(MAP_CONN_BY_ADDR))?;
        let by_addr = HashMap::try_from(by_addr_map).map_err(map_err(MAP_CONN_BY_ADDR))?;
        let targets_map = ebpf
            .take_map(MAP_TARGETS)
            .ok_or(EbpfError::Missing(MAP_TARGETS))?;
        let trie = LpmTrie::try_from(targets_map).map_err(map_err(MAP_TARGETS))?;
        let blocked_map = ebpf
            .take_map(MAP_BLOCKED)
            .ok_or(EbpfError::Missing(MAP_BLOCKED))?;
        let blocked = HashMap::try_from(blocked_map).map_err(map_err(MAP_BLOCKED))?;
        let me = Self {
            ebpf: Mutex::new(Some(ebpf)),
            by_addr: Mutex::new(by_addr),
            targets: Mutex::new(trie),
            blocked: Mutex::new(blocked),
            cgroup: cgroup.to_owned(),
        };
        me.set_targets(targets)?;
        Ok(me)
    }

    /// Makes the kernel redirect exactly these targets (on start and on
    /// policy reload). Target ids are positions in `targets`.
    ///
    /// # Errors
    /// When the kernel refuses a map update.
    pub fn set_targets(&self, targets: &[TargetSpec]) -> Result<(), EbpfError> {
        let mut trie = self
            .targets
            .lock()
            .map_err(|_| EbpfError::Missing("targets lock"))?;
        let wanted: Vec<_> = targets.iter().map(target_key).collect();
        let stale: Vec<_> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !wanted
                    .iter()
                    .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            })
            .collect();
        for k in stale {
            trie.remove(&k).map_err(map_err(MAP_TARGETS))?;
        }
        for (i, (t, key)) in targets.iter().zip(&wanted).enumerate() {
            let value = TargetValue {
                target_id: u32::try_from(i).unwrap_or(u32::MAX),
                protocol: t.protocol.wire_id(),
            };
            trie.insert(key, value, 0).map_err(map_err(MAP_TARGETS))?;
        }
        Ok(())
    }

    /// Makes the kernel refuse connects to targets from exactly these
    /// blocked tgids, uids, comms and cgroups (the kill switch). Entries
    /// already present stay untouched, so a connect racing the update is
    /// never let through by a remove-then-insert.
    ///
    /// # Errors
    /// When the kernel refuses a map update (e.g. the map is full).
    pub fn set_blocked(&self, keys: &std::collections::HashSet<BlockKey>) -> Result<(), EbpfError> {
        let mut map = self
            .blocked
            .lock()
            .map_err(|_| EbpfError::Missing("blocked lock"))?;
        let present: Vec<BlockKey> = map.keys().filter_map(Result::ok).collect();
        for k in keys {
            if !present.contains(k) {
                map.insert(k, 1, 0).map_err(map_err(MAP_BLOCKED))?;
            }
        }
        for k in present.iter().filter(|k| !keys.contains(k)) {
            map.remove(k).map_err(map_err(MAP_BLOCKED))?;
        }
        Ok(())
    }

    /// Detaches every program; connections from then on go direct.
    pub fn detach(&self) {
        let ebpf = match self.ebpf.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(ebpf);
    }

    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Entries in the kernel maps worth watching, with their capacity:
    /// redirected sockets still open (by cookie) and configured targets.
    /// The by-address map is left out: counting it would hold the lock the
    /// accept path takes.
    #[must_use]
    pub fn occupancy(&self) -> Vec<(&'static str, usize, u32)> {
        let mut out = Vec::new();
        if let Ok(guard) = self.ebpf.lock()
            && let Some(ebpf) = guard.as_ref()
            && let Some(map) = ebpf.map(MAP_CONN_BY_COOKIE)
            && let Ok(by_cookie) = HashMap::<_, u64, ConnRecord>::try_from(map)
        {
            out.push((
                MAP_CONN_BY_COOKIE,
                by_cookie.keys().filter(Result::is_ok).count(),
                interceptor_common::MAX_CONNS,
            ));
        }
        if let Ok(trie) = self.targets.lock() {
            out.push((
                MAP_TARGETS,
                trie.keys().filter(Result::is_ok).count(),
                interceptor_common::MAX_TARGETS,
            ));
        }
        if let Ok(blocked) = self.blocked.lock() {
            out.push((
                MAP_BLOCKED,
                blocked.keys().filter(Result::is_ok).count(),
                interceptor_common::MAX_BLOCKED,
            ));
        }
        out
    }
}

/// Peer address of an accepted socket as the kernel keyed it.
#[must_use]
pub fn sock_key(peer: SocketAddr) -> SockKey {
    let ip: Ipv6Addr = match peer.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    SockKey {
        addr: ip.octets(),
        port: peer.port(),
        _pad: 0,
    }
}

impl OrigDstLookup for Redirector {
    fn take(&self, peer: SocketAddr) -> Option<ConnRecord> {
        let key = sock_key(peer);
        let mut map = self.by_addr.lock().ok()?;
        let rec = map.get(&key, 0).ok()?;
        // The entry has served its purpose; the kernel drops its cookie twin
        // when the socket closes.
        let _ = map.remove(&key);
        Some(rec)
    }
}

fn check_cgroup2(path: &Path) -> Result<(), EbpfError> {
    // cgroup2's magic number, as statfs reports it.
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let st = nix::sys::statfs::statfs(path).map_err(|e| EbpfError::Cgroup {
        path: path.to_owned(),
        source: e.into(),
    })?;
    #[allow(clippy::cast_lossless, clippy::useless_conversion)]
    let magic = i64::from(st.filesystem_type().0);
    if magic == CGROUP2_SUPER_MAGIC {
        Ok(())
    } else {
        Err(EbpfError::NotCgroup2 {
            path: path.to_owned(),
        })
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock() {
    use nix::sys::resource::{Resource, setrlimit};
    let _ = setrlimit(
        Resource::RLIMIT_MEMLOCK,
        libc::RLIM_INFINITY,
        libc::RLIM_INFINITY,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyFile;

    #[test]
    fn target_keys_cover_port_and_prefix() {
        let p = PolicyFile::parse(
            "version: 1\ntargets:\n  - {name: a, protocol: postgres, address: 10.0.0.0/8:5432}\n  - {name: b, protocol: mysql, address: '[::1]:3306'}\n",
            Path::new("t"),
        )
        .unwrap();
        let a = target_key(&p.targets[0]);
        let (plen, data) = (a.prefix_len(), a.data());
        assert_eq!(plen, 32 + 96 + 8);
        assert_eq!(data.port_be, 5432u16.to_be());
        assert_eq!(&data.addr[10..13], &[0xff, 0xff, 10]);
        let b = target_key(&p.targets[1]);
        assert_eq!(b.prefix_len(), 32 + 128);
        assert_eq!(b.data().addr[15], 1);
    }

    #[test]
    fn agent_config_layout() {
        let c = agent_config(&ListenerConfig {
            v4: Some("127.0.0.1:15432".parse().unwrap()),
            v6: None,
            port: 15432,
            mark: 7,
        });
        assert_eq!(c.listen_ip4.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(u16::from_be(c.listen_port_be), 15432);
        assert_eq!((c.has_v4, c.has_v6, c.mark, c.enabled), (1, 0, 7, 1));
    }

    #[test]
    fn sock_keys_map_v4() {
        let k = sock_key("127.0.0.1:40000".parse().unwrap());
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!(k.port, 40000);
    }
}
