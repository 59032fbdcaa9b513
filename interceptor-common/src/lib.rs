//! Types shared by the kernel programs (`interceptor-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]` with fixed-width fields and explicit
//! padding, so both sides agree on the byte layout; `const` asserts pin the
//! sizes. Addresses are always 16 bytes: IPv4 is stored IPv4-mapped
//! (`::ffff:a.b.c.d`) so one key type serves both families.
#![no_std]

/// LPM trie: [`TargetKey`] -> [`TargetValue`]; which destinations are redirected.
pub const MAP_TARGETS: &str = "TARGETS";
/// Array of one [`AgentConfig`]: where to redirect, which mark to skip.
pub const MAP_CONFIG: &str = "CONFIG";
/// LRU hash: socket cookie (`u64`) -> [`ConnRecord`], written at connect time,
/// read by getpeername, removed when the socket closes.
pub const MAP_CONN_BY_COOKIE: &str = "CONN_BY_COOKIE";
/// LRU hash: [`SockKey`] (client's network namespace and local address) ->
/// [`ConnRecord`], written by sock_ops once the local port is known; the
/// agent looks up its accepted socket's namespace and peer here and deletes
/// the entry.
pub const MAP_CONN_BY_ADDR: &str = "CONN_BY_ADDR";
/// Hash: netns cookie (`u64`) -> [`NetnsState`]; the network namespaces
/// where the agent listens (`NETNS_READY`), is being asked to
/// (`NETNS_PENDING`, inserted by connect4/6), or could not (`NETNS_FAILED`).
pub const MAP_NETNS: &str = "NETNS";
/// Ring buffer of [`NetnsEvent`]: a connect from a namespace the agent does
/// not serve yet.
pub const MAP_NETNS_EVENTS: &str = "NETNS_EVENTS";
/// Hash: tgid (`u32`) -> `u32` (1); processes whose connections are never redirected.
pub const MAP_EXEMPT_TGIDS: &str = "EXEMPT_TGIDS";
/// Hash: [`BlockKey`] -> `u32` (1); the kill switch. A connect to a target
/// from a blocked tgid, uid or cgroup (the current one or an ancestor) is
/// refused with EPERM instead of being redirected.
pub const MAP_BLOCKED: &str = "BLOCKED";

/// Hash: [`UnixPath`] `path` (zero-padded) -> [`UnixTarget`]; the unix
/// socket paths that are targets, and the agent's listener for each.
pub const MAP_UNIX_TARGETS: &str = "UNIX_TARGETS";
/// LRU hash: [`UnixKey`] -> [`ConnRecord`], written by connect_unix; the
/// agent looks up its accepted unix connection by the peer's tgid
/// (`SO_PEERCRED`) and the listener it came in on.
pub const MAP_UNIX_CONNS: &str = "UNIX_CONNS";
/// Hash: the agent's listener's bound path ([`UnixPath`] `path`,
/// zero-padded) -> the target path ([`UnixPath`]) it stands in for; what
/// getpeername_unix shows instead.
pub const MAP_UNIX_LISTENERS: &str = "UNIX_LISTENERS";
/// Sockhash: [`BypassKey`] -> socket; with `--local-bypass on`, both ends
/// of each redirected workload-agent connection (the workload's by
/// sock_ops at establishment, the agent's by the agent itself). The
/// `sk_msg` program attached to it hands each `sendmsg` of one end to the
/// other end's receive queue, past the TCP stack.
pub const MAP_BYPASS: &str = "BYPASS";
/// Hash: the workload end's [`BypassKey`] -> [`BypassFlow`]; the bytes in
/// flight each way, and whether the connection has gone back to TCP.
/// Written by sock_ops at establishment, removed when the workload's
/// socket closes.
pub const MAP_BYPASS_FLOWS: &str = "BYPASS_FLOWS";

/// Program names, as the agent looks them up in the object file.
pub const PROG_CONNECT4: &str = "interceptor_connect4";
pub const PROG_CONNECT6: &str = "interceptor_connect6";
pub const PROG_GETPEERNAME4: &str = "interceptor_getpeername4";
pub const PROG_GETPEERNAME6: &str = "interceptor_getpeername6";
pub const PROG_SOCK_OPS: &str = "interceptor_sock_ops";
pub const PROG_EGRESS: &str = "interceptor_egress";
/// `sk_msg`, attached to [`MAP_BYPASS`] (not to a cgroup).
pub const PROG_SK_MSG: &str = "interceptor_sk_msg";
/// `cgroup/connect_unix` (kernel >= 6.7). aya cannot load or attach this
/// attach type, so the agent loads it itself (`ebpf::unix`); in the object
/// it sits in a section aya parses.
pub const PROG_CONNECT_UNIX: &str = "interceptor_connect_unix";
/// `cgroup/getpeername_unix` (kernel >= 6.7), loaded the same way.
pub const PROG_GETPEERNAME_UNIX: &str = "interceptor_getpeername_unix";
/// Stand-in helper numbers for the two kfuncs the unix programs call; the
/// agent rewrites each such call into a kfunc call by BTF id before loading.
pub const KFUNC_CAST_TO_KERN_CTX: u32 = 0x7e5c_0001;
pub const KFUNC_SET_SUN_PATH: u32 = 0x7e5c_0002;
/// Offsets in the kernel's `struct bpf_sock_addr_kern` (checked against
/// the running kernel's BTF before loading).
pub const SOCK_ADDR_KERN_UADDR: usize = 8;
pub const SOCK_ADDR_KERN_UADDRLEN: usize = 32;
/// `sun_path`'s size in `struct sockaddr_un`.
pub const SUN_PATH_MAX: usize = 108;
pub const MAX_UNIX_TARGETS: u32 = 256;

/// Bounds of the maps (LRU maps evict the oldest entry beyond this).
/// Targets: one entry per CIDR or address and one per address a DNS name
/// resolves to, so 1,000 names of several addresses each fit.
pub const MAX_TARGETS: u32 = 8192;
pub const MAX_CONNS: u32 = 65_536;
pub const MAX_EXEMPT: u32 = 64;
pub const MAX_BLOCKED: u32 = 16_384;
pub const MAX_NETNS: u32 = 8192;
/// Connections at once with the local bypass (two sockets each); beyond
/// it, connections use TCP.
pub const MAX_BYPASS: u32 = 65_536;
/// Bytes one end may hand past TCP since the other end last sent. The
/// receive queue a bypassed message lands in is not bounded by the
/// receiver's buffer, so a peer that stops reading would otherwise let the
/// sender queue without limit; past this cap the direction goes back to
/// TCP (and its backpressure) for the rest of the connection.
pub const BYPASS_CAP_BYTES: u32 = 1 << 20;
/// Bytes of the netns event ring buffer (a power of two, page multiple).
pub const NETNS_EVENTS_BYTES: u32 = 64 * 1024;

/// [`NetnsState::state`]: a connect from this namespace was redirected
/// before the agent listened there; its SYN is held (dropped on egress and
/// retransmitted soon, see [`NETNS_SYN_RTO_JIFFIES`]) until the agent is
/// ready or [`NETNS_PENDING_NS`] passes.
pub const NETNS_PENDING: u32 = 1;
/// The agent listens in this namespace.
pub const NETNS_READY: u32 = 2;
/// The agent could not listen in this namespace; connects to targets from
/// it are refused (EPERM) until the agent retries.
pub const NETNS_FAILED: u32 = 3;
/// [`NetnsState::families`] bits: the agent's IPv4 / IPv6 loopback listener
/// exists in the namespace.
pub const NETNS_HAS_V4: u32 = 1;
pub const NETNS_HAS_V6: u32 = 2;
/// How long a pending namespace holds connects before the kernel gives up
/// on the agent (the SYN then goes out and finds no listener: refused).
pub const NETNS_PENDING_NS: u64 = 2_000_000_000;
/// Initial SYN retransmission timeout, in jiffies, of a connect held for a
/// pending namespace (instead of 1 s): the agent is usually ready in a
/// millisecond or two.
pub const NETNS_SYN_RTO_JIFFIES: u32 = 1;

/// [`BlockKey::kind`]: `value` is a tgid.
pub const BLOCK_TGID: u32 = 1;
/// [`BlockKey::kind`]: `value` is a uid.
pub const BLOCK_UID: u32 = 2;
/// [`BlockKey::kind`]: `value` is a cgroup v2 id (the directory's inode);
/// only tasks directly in that cgroup.
pub const BLOCK_CGROUP: u32 = 3;
/// [`BlockKey::kind`]: `value` is a cgroup v2 id; tasks in that cgroup or
/// any cgroup below it (up to `BLOCK_CGROUP_LEVELS` levels from the root).
pub const BLOCK_CGROUP_TREE: u32 = 4;
/// [`BlockKey::kind`]: `value` is the task's comm, see [`comm_words`].
pub const BLOCK_COMM: u32 = 5;
/// Cgroup levels below the root whose ancestor ids connect checks against
/// the blocked cgroups (deeper ones are caught by the agent's rescans).
pub const BLOCK_CGROUP_LEVELS: u32 = 12;

/// Bits of a [`TargetKey`] before the address: port (16) and padding (16).
pub const TARGET_KEY_PORT_BITS: u32 = 32;
/// Prefix length of an IPv4-mapped address before the IPv4 part.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

pub const PROTOCOL_POSTGRES: u32 = 1;
pub const PROTOCOL_MYSQL: u32 = 2;

pub const FAMILY_V4: u16 = 4;
pub const FAMILY_V6: u16 = 6;
/// A unix-domain socket ([`ConnRecord`]'s address fields unused).
pub const FAMILY_UNIX: u16 = 1;

/// A unix socket path as in `sun_path`, zero-padded; `len` bytes used
/// (without a terminating NUL).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPath {
    pub len: u32,
    pub path: [u8; SUN_PATH_MAX],
}

impl UnixPath {
    pub const ZERO: Self = Self {
        len: 0,
        path: [0; SUN_PATH_MAX],
    };
}

/// What a unix target redirects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixTarget {
    pub target: TargetValue,
    /// Stable id of the agent's listener for this path (the agent's own
    /// numbering; part of [`UnixKey`]).
    pub listen_id: u32,
    pub _pad: u32,
    /// The only network namespace the agent serves unix targets in (its
    /// own): connects from any other are refused.
    pub home_netns: u64,
    /// The agent's listener: a pathname socket.
    pub listen: UnixPath,
}

/// Key of a redirected unix connection's record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixKey {
    pub netns_cookie: u64,
    pub tgid: u32,
    pub listen_id: u32,
}

/// Data part of the targets LPM trie key. The prefix length always covers
/// the port and padding (`TARGET_KEY_PORT_BITS`) plus the address prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetKey {
    /// Destination port, network byte order, as found in `bpf_sock_addr`.
    pub port_be: u16,
    pub _pad: u16,
    /// IPv6 address, or IPv4-mapped IPv6 address, network byte order.
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetValue {
    /// Index of the target in the policy's `targets` list.
    pub target_id: u32,
    /// `PROTOCOL_POSTGRES` or `PROTOCOL_MYSQL`.
    pub protocol: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Agent's IPv4 listener address, network byte order (`user_ip4` layout).
    pub listen_ip4: u32,
    /// Agent's IPv6 listener address as four network-order words (`user_ip6` layout).
    pub listen_ip6: [u32; 4],
    /// Listener port, network byte order.
    pub listen_port_be: u16,
    pub _pad: u16,
    /// 1 when an IPv4 listener exists; a connect4 is only redirected then.
    pub has_v4: u32,
    /// 1 when an IPv6 listener exists; native IPv6 destinations are only redirected then.
    pub has_v6: u32,
    /// SO_MARK the agent puts on its own upstream sockets, for operators'
    /// firewall rules; the kernel programs do not trust it (any process
    /// with CAP_NET_ADMIN can set a mark): the agent is exempt by tgid.
    pub mark: u32,
    /// 1 once the agent filled the maps; nothing is redirected before.
    pub enabled: u32,
    /// 1 in fail-open mode: while `heartbeat_ns` is older than
    /// [`HEARTBEAT_STALE_NS`] (no agent serves), connects go direct. 0 in
    /// fail-closed mode: they are redirected all the same and refused by
    /// the absent listener.
    pub fail_open: u32,
    /// 1 with `--local-bypass on`: sock_ops puts redirected workload
    /// sockets in [`MAP_BYPASS`].
    pub local_bypass: u32,
    /// `bpf_ktime_get_ns` clock (CLOCK_MONOTONIC) of the agent's last
    /// heartbeat.
    pub heartbeat_ns: u64,
    /// Inode of the cgroup the programs are attached to, so an agent that
    /// adopts a pin dir can tell it serves the same cgroup.
    pub cgroup_ino: u64,
}

/// A fail-open agent whose heartbeat is older than this is taken for dead.
pub const HEARTBEAT_STALE_NS: u64 = 1_000_000_000;
/// How often the agent beats.
pub const HEARTBEAT_EVERY_MS: u64 = 200;

/// Key of the blocked map: one fact about the connecting task.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// `BLOCK_TGID`, `BLOCK_UID`, `BLOCK_CGROUP`, `BLOCK_CGROUP_TREE` or `BLOCK_COMM`.
    pub kind: u32,
    pub _pad: u32,
    /// The number in `value[0]` (`value[1]` is 0), or the comm's 16 bytes.
    pub value: [u64; 2],
}

impl BlockKey {
    #[inline(always)]
    #[must_use]
    pub fn number(kind: u32, n: u64) -> Self {
        Self {
            kind,
            _pad: 0,
            value: [n, 0],
        }
    }
}

/// A task comm (NUL-padded, as `bpf_get_current_comm` fills it) as the two
/// words of a `BLOCK_COMM` key.
#[inline(always)]
#[must_use]
pub fn comm_words(c: [u8; 16]) -> [u64; 2] {
    [
        u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
        u64::from_ne_bytes([c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]]),
    ]
}

/// Client's network namespace, local address and port: the agent sees the
/// address and port as the peer of the socket it accepted on its listener
/// in that namespace. Addresses repeat across namespaces (every namespace's
/// clients are `127.0.0.1` to the agent), so the cookie is part of the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}

/// Key of [`MAP_BYPASS`] and [`MAP_BYPASS_FLOWS`]: a TCP socket by its
/// network namespace and its own view of the connection, so the peer's key
/// is the same with the two ends swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BypassKey {
    pub netns_cookie: u64,
    /// IPv4-mapped for IPv4.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    pub _pad: u32,
}

impl BypassKey {
    /// The key of the socket at the other end.
    #[inline(always)]
    #[must_use]
    pub fn peer(&self) -> Self {
        Self {
            netns_cookie: self.netns_cookie,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Value of [`MAP_BYPASS_FLOWS`]. Index 0 is the workload's direction
/// (workload to agent), 1 the agent's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BypassFlow {
    /// Bytes handed past TCP in each direction since the other last sent.
    pub in_flight: [u32; 2],
    /// Non-zero once the direction went back to TCP, for good: a message
    /// bypassing TCP after one sent over it could be read before it.
    pub tcp: [u32; 2],
}

/// Value of the netns map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsState {
    /// `NETNS_PENDING`, `NETNS_READY` or `NETNS_FAILED`.
    pub state: u32,
    /// `NETNS_HAS_V4` | `NETNS_HAS_V6`, when ready.
    pub families: u32,
    /// `bpf_ktime_get_ns` when it turned pending (or failed).
    pub since_ns: u64,
    /// The task whose connect made it pending: where the agent finds the
    /// namespace (`/proc/TGID/task/PID/ns/net`).
    pub tgid: u32,
    pub pid: u32,
}

/// A connect from a namespace the agent does not serve yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsEvent {
    pub netns_cookie: u64,
    pub tgid: u32,
    pub pid: u32,
}

/// What the kernel attests about one redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRecord {
    /// Original destination, IPv6 or IPv4-mapped, network byte order.
    pub orig_addr: [u8; 16],
    /// Original destination port, network byte order.
    pub orig_port_be: u16,
    /// `FAMILY_V4` or `FAMILY_V6`: the family of the socket that connected.
    pub family: u16,
    pub target_id: u32,
    pub protocol: u32,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub socket_cookie: u64,
    pub comm: [u8; 16],
}

impl ConnRecord {
    pub const ZERO: Self = Self {
        orig_addr: [0; 16],
        orig_port_be: 0,
        family: 0,
        target_id: 0,
        protocol: 0,
        pid: 0,
        tgid: 0,
        uid: 0,
        gid: 0,
        _pad: 0,
        cgroup_id: 0,
        netns_cookie: 0,
        socket_cookie: 0,
        comm: [0; 16],
    };
}

/// IPv4 address (network-order `u32` as in `user_ip4`) to IPv4-mapped IPv6 bytes.
#[inline(always)]
#[must_use]
pub fn v4_mapped(ip4_be: u32) -> [u8; 16] {
    let b = ip4_be.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

/// Four network-order words (`user_ip6` layout) to address bytes.
#[inline(always)]
#[must_use]
pub fn v6_bytes(words: [u32; 4]) -> [u8; 16] {
    let a = words[0].to_ne_bytes();
    let b = words[1].to_ne_bytes();
    let c = words[2].to_ne_bytes();
    let d = words[3].to_ne_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// Address bytes to four network-order words (`user_ip6` layout).
#[inline(always)]
#[must_use]
pub fn v6_words(addr: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

/// Whether `addr` is IPv4-mapped (`::ffff:0:0/96`).
#[inline(always)]
#[must_use]
pub fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
}

const _: () = assert!(core::mem::size_of::<TargetKey>() == 20);
const _: () = assert!(core::mem::size_of::<TargetValue>() == 8);
const _: () = assert!(core::mem::size_of::<AgentConfig>() == 64);
const _: () = assert!(core::mem::size_of::<SockKey>() == 32);
const _: () = assert!(core::mem::size_of::<NetnsState>() == 24);
const _: () = assert!(core::mem::size_of::<NetnsEvent>() == 16);
const _: () = assert!(core::mem::size_of::<BlockKey>() == 24);
const _: () = assert!(core::mem::size_of::<ConnRecord>() == 88);
const _: () = assert!(core::mem::size_of::<UnixPath>() == 112);
const _: () = assert!(core::mem::size_of::<UnixTarget>() == 136);
const _: () = assert!(core::mem::size_of::<UnixKey>() == 16);
const _: () = assert!(core::mem::size_of::<BypassKey>() == 48);
const _: () = assert!(core::mem::size_of::<BypassFlow>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these types are #[repr(C)], made only of integers and
    // integer arrays with explicit padding fields, so every bit pattern is
    // a valid value and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::TargetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TargetValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AgentConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetnsState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetnsEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnixPath {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnixTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnixKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BypassKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BypassFlow {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapping_round_trips() {
        let ip = u32::from_ne_bytes([127, 0, 0, 1]);
        let m = v4_mapped(ip);
        assert!(is_v4_mapped(&m));
        assert_eq!(&m[12..], &[127, 0, 0, 1]);
        assert_eq!(v6_bytes(v6_words(m)), m);
    }

    #[test]
    fn native_v6_is_not_mapped() {
        let mut lo = [0u8; 16];
        lo[15] = 1;
        assert!(!is_v4_mapped(&lo));
    }

    #[test]
    fn record_field_offsets_are_stable() {
        // The kernel writes these at fixed offsets; a reorder would silently
        // corrupt identities, so pin the ones user space reads.
        assert_eq!(core::mem::offset_of!(ConnRecord, orig_port_be), 16);
        assert_eq!(core::mem::offset_of!(ConnRecord, cgroup_id), 48);
        assert_eq!(core::mem::offset_of!(ConnRecord, comm), 72);
        assert_eq!(core::mem::offset_of!(TargetKey, addr), 4);
    }
}
