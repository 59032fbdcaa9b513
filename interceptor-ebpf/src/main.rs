//! Interceptor's kernel programs. They classify, record and rewrite; every
//! judgement about SQL lives in user space.
//!
//! - `cgroup/connect4`, `cgroup/connect6` (kernel >= 4.17; the netns cookie
//!   needs >= 5.7, the ancestor cgroup ids >= 5.7 too): a TCP connect to a
//!   configured target is recorded with who made it and rewritten to the
//!   agent's listener, unless its tgid, uid or cgroup (or an ancestor
//!   cgroup) is blocked: then the program returns 0 and connect fails with
//!   EPERM. Only connects to targets are ever refused.
//! - `sockops` (kernel >= 4.13, state callbacks >= 4.16): once the client's
//!   local port is chosen (TCP_CONNECT_CB), the record is re-keyed by the
//!   client's local address, which is what the agent sees as its peer; on
//!   close the cookie entry goes (the agent deletes the other on accept).
//! - `--local-bypass on` (experimental): at establishment, sock_ops also
//!   puts a redirected workload socket in the `BYPASS` sockhash, and the
//!   agent adds its own end when it accepts. The `sk_msg` program, attached
//!   to that map, hands each `sendmsg` of either end straight to the other
//!   end's receive queue (`bpf_msg_redirect_hash`, `BPF_F_INGRESS`), past
//!   the TCP stack. A direction whose bytes in flight since the other end
//!   last sent pass `BYPASS_CAP_BYTES` goes back to TCP for good.
//! - `cgroup/getpeername4`, `cgroup/getpeername6` (kernel >= 5.8): the client
//!   sees the original peer, so the redirect is invisible.
//! - Network namespaces (containers, pods): the agent listens on loopback
//!   inside every namespace it serves. connect4/6 rewrite to that loopback
//!   only where the namespace is ready; from a namespace it has never seen,
//!   the connect is still redirected, the namespace is marked pending and
//!   announced on a ring buffer (kernel >= 5.8), and `cgroup_skb/egress`
//!   (kernel >= 5.1 for `skb->sk`) holds that socket's SYN while the agent
//!   opens its listener there; `sock_ops`' TIMEOUT_INIT shortens the SYN's
//!   first retransmission so the held connect completes a few ms later.
//! - `cgroup/connect_unix` (kernel >= 6.7): a connect to a unix socket path
//!   that is a target is recorded and rewritten to the agent's own unix
//!   listener for it (only in the agent's network namespace; elsewhere
//!   refused). `cgroup/getpeername_unix` shows the path asked for. aya can
//!   neither load these attach types nor call kfuncs, so they sit in a
//!   section aya parses and never loads (`cgroup/connect6`) and call
//!   stand-in helper numbers that the agent's own loader turns into
//!   kfunc calls (`bpf_cast_to_kern_ctx`, `bpf_sock_addr_set_sun_path`).
#![no_std]
#![no_main]

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TIMEOUT_INIT,
        BPF_TCP_CLOSE, BPF_TCP_SYN_SENT, sk_action::SK_PASS,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie, bpf_probe_read_kernel_str,
        },
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, RingBuf, SockHash, lpm_trie::Key},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use interceptor_common::{
    AgentConfig, BLOCK_CGROUP, BLOCK_CGROUP_LEVELS, BLOCK_CGROUP_TREE, BLOCK_COMM, BLOCK_TGID,
    BLOCK_UID, BYPASS_CAP_BYTES, BlockKey, BypassFlow, BypassKey, ConnRecord, FAMILY_UNIX,
    FAMILY_V4, FAMILY_V6, HEARTBEAT_STALE_NS, KFUNC_CAST_TO_KERN_CTX, KFUNC_SET_SUN_PATH,
    MAX_BLOCKED, MAX_BYPASS, MAX_CONNS, MAX_EXEMPT, MAX_NETNS, MAX_TARGETS, MAX_UNIX_TARGETS,
    NETNS_EVENTS_BYTES, NETNS_FAILED, NETNS_HAS_V4, NETNS_HAS_V6, NETNS_PENDING, NETNS_PENDING_NS,
    NETNS_READY, NETNS_SYN_RTO_JIFFIES, NetnsEvent, NetnsState, SOCK_ADDR_KERN_UADDR,
    SOCK_ADDR_KERN_UADDRLEN, SUN_PATH_MAX, SockKey, TARGET_KEY_PORT_BITS, TargetKey, TargetValue,
    UnixKey, UnixPath, UnixTarget, comm_words, is_v4_mapped, v4_mapped, v6_bytes, v6_words,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Return value of a cgroup sock_addr program that lets the call proceed.
const PROCEED: i32 = 1;
/// Return value that makes the call fail with EPERM.
const REFUSE: i32 = 0;

// Map names are the statics' names; they must equal the MAP_* constants in
// interceptor-common, which the agent uses.
#[map]
static TARGETS: LpmTrie<TargetKey, TargetValue> = LpmTrie::with_max_entries(MAX_TARGETS, 0);
#[map]
static CONFIG: Array<AgentConfig> = Array::with_max_entries(1, 0);
#[map]
static CONN_BY_COOKIE: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNS, 0);
#[map]
static CONN_BY_ADDR: LruHashMap<SockKey, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNS, 0);
#[map]
static EXEMPT_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_EXEMPT, 0);
#[map]
static BLOCKED: HashMap<BlockKey, u32> = HashMap::with_max_entries(MAX_BLOCKED, 0);
#[map]
static NETNS: HashMap<u64, NetnsState> = HashMap::with_max_entries(MAX_NETNS, 0);
#[map]
static NETNS_EVENTS: RingBuf = RingBuf::with_byte_size(NETNS_EVENTS_BYTES, 0);
#[map]
static UNIX_TARGETS: HashMap<[u8; SUN_PATH_MAX], UnixTarget> =
    HashMap::with_max_entries(MAX_UNIX_TARGETS, 0);
#[map]
static UNIX_CONNS: LruHashMap<UnixKey, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNS, 0);
#[map]
static UNIX_LISTENERS: HashMap<[u8; SUN_PATH_MAX], UnixPath> =
    HashMap::with_max_entries(MAX_UNIX_TARGETS, 0);

#[map]
static BYPASS: SockHash<BypassKey> = SockHash::with_max_entries(MAX_BYPASS * 2, 0);
#[map]
static BYPASS_FLOWS: HashMap<BypassKey, BypassFlow> = HashMap::with_max_entries(MAX_BYPASS, 0);

/// `BPF_NOEXIST`: insert only if absent.
const NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

#[cgroup_sock_addr(connect4)]
pub fn interceptor_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Err(Skip::Blocked | Skip::Unserved) => REFUSE,
        _ => PROCEED,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn interceptor_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Err(Skip::Blocked | Skip::Unserved) => REFUSE,
        _ => PROCEED,
    }
}

/// Loaded by the agent as `cgroup/connect_unix` (see the module header).
#[cgroup_sock_addr(connect6)]
pub fn interceptor_connect_unix(ctx: SockAddrContext) -> i32 {
    match try_connect_unix(&ctx) {
        Err(Skip::Blocked | Skip::Unserved | Skip::MapFull) => REFUSE,
        _ => PROCEED,
    }
}

/// Loaded by the agent as `cgroup/getpeername_unix`. The kernel runs it on
/// the peer's socket: the agent's end of a redirected connection, which
/// the workload's connect created (so in the workload's cgroup), bound to
/// the agent's listener. That address is shown as the target's path the
/// workload asked for, so the redirect stays invisible.
#[cgroup_sock_addr(connect6)]
pub fn interceptor_getpeername_unix(ctx: SockAddrContext) -> i32 {
    let kern = kern_ctx(&ctx);
    if let Some(bound) = sun_path(kern)
        && let Some(orig) = UNIX_LISTENERS.get_ptr(&bound.path)
    {
        // SAFETY: a map value pointer, valid for the program's run.
        let len = bounded_len(unsafe { (*orig).len });
        if len != 0 {
            // SAFETY: the path lies in the map value; `len` is bounded by it.
            let _ = unsafe { set_sun_path(kern, (*orig).path.as_ptr(), len) };
        }
    }
    PROCEED
}

/// A path length clamped to `sun_path`'s size on the register the kfunc
/// gets (a range check folded into one comparison on a copy would leave
/// the verifier without a bound).
#[inline(always)]
fn bounded_len(len: u32) -> u32 {
    len.min(SUN_PATH_MAX as u32)
}

/// `bpf_cast_to_kern_ctx`: the `struct bpf_sock_addr_kern` behind the
/// context (a stand-in helper number; the agent's loader makes it the kfunc).
fn kern_ctx(ctx: &SockAddrContext) -> *mut u8 {
    // SAFETY: the call is rewritten into the kfunc, which takes the
    // program's context and returns the kernel's view of it.
    unsafe {
        let f: unsafe extern "C" fn(*mut c_void) -> *mut u8 =
            core::mem::transmute(KFUNC_CAST_TO_KERN_CTX as usize);
        f(ctx.as_ptr())
    }
}

/// `bpf_sock_addr_set_sun_path`: rewrites the address of a unix sock_addr
/// hook to `len` bytes at `path` (the kfunc checks `len` <= 108).
///
/// # Safety
/// `kern` from [`kern_ctx`]; `path` readable for `len` bytes.
unsafe fn set_sun_path(kern: *mut u8, path: *const u8, len: u32) -> i32 {
    // SAFETY: as the caller promises; rewritten into the kfunc.
    unsafe {
        let f: unsafe extern "C" fn(*mut u8, *const u8, u32) -> i32 =
            core::mem::transmute(KFUNC_SET_SUN_PATH as usize);
        f(kern, path, len)
    }
}

/// The pathname of a unix sock_addr hook's address (`kern` from
/// [`kern_ctx`]); `None` for an unnamed or abstract one.
#[inline(always)]
fn sun_path(kern: *mut u8) -> Option<UnixPath> {
    // SAFETY: verifier-checked reads of `struct bpf_sock_addr_kern` fields
    // at their offsets (checked against the kernel's BTF by the loader).
    let (uaddr, uaddrlen) = unsafe {
        (
            read_volatile(kern.add(SOCK_ADDR_KERN_UADDR).cast::<*const u8>()),
            read_volatile(kern.add(SOCK_ADDR_KERN_UADDRLEN).cast::<u32>()),
        )
    };
    // sun_family (2 bytes), then the path; the kernel ends a pathname at
    // the given length or its first NUL, and so does the read.
    if uaddrlen <= 2 {
        return None;
    }
    // At most sun_path's size, NUL included.
    let room = bounded_len(uaddrlen - 2);
    let mut path = UnixPath::ZERO;
    // SAFETY: reads at most `room` bytes of the kernel's copy of the
    // address into the zeroed buffer, NUL-terminated within its size.
    let n = unsafe {
        bpf_probe_read_kernel_str(
            path.path.as_mut_ptr().cast(),
            bounded_len(room + 1),
            uaddr.add(2).cast(),
        )
    };
    // n counts the NUL: an empty read is an abstract socket (first byte 0).
    if n <= 1 {
        return None;
    }
    path.len = (n - 1) as u32;
    Some(path)
}

fn try_connect_unix(ctx: &SockAddrContext) -> Result<(), Skip> {
    config()?;
    let kern = kern_ctx(ctx);
    let Some(asked) = sun_path(kern) else {
        return Ok(());
    };
    let target = UNIX_TARGETS.get_ptr(&asked.path).ok_or(Skip::NotTarget)?;
    // SAFETY: a map value pointer, valid for the program's run; fields are
    // copied out.
    let (value, listen_id, home, listen_len) = unsafe {
        (
            (*target).target,
            (*target).listen_id,
            (*target).home_netns,
            (*target).listen.len,
        )
    };
    check_exempt()?;
    check_blocked()?;
    let rec = conn_record(ctx, [0; 16], 0, FAMILY_UNIX, value);
    let listen_len = bounded_len(listen_len);
    if rec.netns_cookie != home || listen_len == 0 {
        return Err(Skip::Unserved);
    }
    let key = UnixKey {
        netns_cookie: rec.netns_cookie,
        tgid: rec.tgid,
        listen_id,
    };
    UNIX_CONNS
        .insert(&key, &rec, 0)
        .map_err(|_| Skip::MapFull)?;
    // SAFETY: the listener path lies in the map value; its length is
    // bounded above.
    if unsafe { set_sun_path(kern, (*target).listen.path.as_ptr(), listen_len) } != 0 {
        return Err(Skip::Unserved);
    }
    Ok(())
}

/// Return value of a cgroup_skb program that lets the packet go.
const PASS: i32 = 1;
/// Return value that drops it.
const DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn interceptor_egress(ctx: SkBuffContext) -> i32 {
    if held(&ctx) { DROP } else { PASS }
}

#[cgroup_sock_addr(getpeername4)]
pub fn interceptor_getpeername4(ctx: SockAddrContext) -> i32 {
    let _ = try_getpeername4(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn interceptor_getpeername6(ctx: SockAddrContext) -> i32 {
    let _ = try_getpeername6(&ctx);
    PROCEED
}

#[sock_ops]
pub fn interceptor_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = try_sock_ops(&ctx);
    1
}

/// Every message is let through: either handed to the peer's receive
/// queue (the redirect succeeded) or sent over TCP (it did not, or the
/// connection is not bypassed).
#[sk_msg]
pub fn interceptor_sk_msg(ctx: SkMsgContext) -> u32 {
    let _ = try_sk_msg(&ctx);
    SK_PASS
}

/// Why a program did nothing; never surfaces beyond the wrapper.
enum Skip {
    NotEnabled,
    NotTarget,
    Exempt,
    MapFull,
    /// The kill switch: the connect is refused.
    Blocked,
    /// The agent cannot serve the task's network namespace (it failed to
    /// listen there, or not in this address family): refused, never direct.
    Unserved,
}

fn config() -> Result<&'static AgentConfig, Skip> {
    match CONFIG.get(0) {
        Some(cfg) if cfg.enabled != 0 => {
            // SAFETY: helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            if cfg.fail_open != 0 && now.wrapping_sub(cfg.heartbeat_ns) > HEARTBEAT_STALE_NS {
                // Fail open and no agent beats: go direct.
                return Err(Skip::NotEnabled);
            }
            Ok(cfg)
        }
        _ => Err(Skip::NotEnabled),
    }
}

fn target_for(port_be: u16, addr: [u8; 16]) -> Result<TargetValue, Skip> {
    let key = Key::new(
        TARGET_KEY_PORT_BITS + 128,
        TargetKey {
            port_be,
            _pad: 0,
            addr,
        },
    );
    TARGETS.get(&key).copied().ok_or(Skip::NotTarget)
}

/// The agent's own sockets go direct. The agent is recognised by what a
/// workload cannot set: the calling process's tgid (in the root PID
/// namespace, from the kernel), which the agent registers at start. A socket
/// mark is never trusted for this: any process with CAP_NET_ADMIN can set
/// one.
fn check_exempt() -> Result<(), Skip> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the value is a plain u32 copied out immediately.
    if unsafe { EXEMPT_TGIDS.get(&tgid) }.is_some() {
        return Err(Skip::Exempt);
    }
    Ok(())
}

fn blocked(key: &BlockKey) -> bool {
    // SAFETY: only the presence of the entry is used.
    unsafe { BLOCKED.get(key) }.is_some()
}

/// The kill switch: the task's tgid, uid, comm or cgroup is blocked, or one
/// of its ancestor cgroups (levels 1..=BLOCK_CGROUP_LEVELS) is blocked with
/// its subtree.
fn check_blocked() -> Result<(), Skip> {
    let tgid = bpf_get_current_pid_tgid() >> 32;
    let uid = bpf_get_current_uid_gid() & 0xffff_ffff;
    // SAFETY: helper without arguments, allowed for cgroup sock_addr programs.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    if blocked(&BlockKey::number(BLOCK_TGID, tgid))
        || blocked(&BlockKey::number(BLOCK_UID, uid))
        || blocked(&BlockKey::number(BLOCK_CGROUP, cgroup_id))
        || blocked(&BlockKey::number(BLOCK_CGROUP_TREE, cgroup_id))
        || blocked(&BlockKey {
            kind: BLOCK_COMM,
            _pad: 0,
            value: comm_words(comm),
        })
    {
        return Err(Skip::Blocked);
    }
    let mut level = 1;
    while level <= BLOCK_CGROUP_LEVELS {
        // SAFETY: helper taking a plain level, allowed for cgroup sock_addr
        // programs (kernel >= 5.7); 0 past the task's own depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 || id == cgroup_id {
            break;
        }
        if blocked(&BlockKey::number(BLOCK_CGROUP_TREE, id)) {
            return Err(Skip::Blocked);
        }
        level += 1;
    }
    Ok(())
}

/// What the kernel attests about the connect being made now: the calling
/// task and its socket.
#[inline(always)]
fn conn_record(
    ctx: &SockAddrContext,
    orig_addr: [u8; 16],
    orig_port_be: u16,
    family: u16,
    target: TargetValue,
) -> ConnRecord {
    // SAFETY: these helpers take the program's own context pointer and are
    // allowed for cgroup sock_addr programs.
    let (socket_cookie, netns_cookie, cgroup_id) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_current_cgroup_id(),
        )
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    ConnRecord {
        orig_addr,
        orig_port_be,
        family,
        target_id: target.target_id,
        protocol: target.protocol,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        _pad: 0,
        cgroup_id,
        netns_cookie,
        socket_cookie,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

fn record(
    ctx: &SockAddrContext,
    orig_addr: [u8; 16],
    orig_port_be: u16,
    family: u16,
    target: TargetValue,
) -> Result<(), Skip> {
    let rec = conn_record(ctx, orig_addr, orig_port_be, family, target);
    CONN_BY_COOKIE
        .insert(&rec.socket_cookie, &rec, 0)
        .map_err(|_| Skip::MapFull)
}

/// Whether the agent serves the task's network namespace for `family`
/// (`NETNS_HAS_V4` or `NETNS_HAS_V6`). A namespace never seen (or pending
/// for too long: the agent missed the event) is marked pending and
/// announced; the connect goes ahead and its SYN is held on egress until
/// the agent listens there.
fn netns_gate(ctx: &SockAddrContext, family: u32) -> Result<(), Skip> {
    // SAFETY: helpers allowed for cgroup sock_addr programs, on our own context.
    let (cookie, now) = unsafe { (bpf_get_netns_cookie(ctx.as_ptr()), bpf_ktime_get_ns()) };
    // SAFETY: the value is copied out at once.
    let known = unsafe { NETNS.get(&cookie) }.copied();
    let refresh = match known {
        Some(s) if s.state == NETNS_READY => {
            return if s.families & family != 0 {
                Ok(())
            } else {
                Err(Skip::Unserved)
            };
        }
        Some(s) if s.state == NETNS_FAILED => return Err(Skip::Unserved),
        Some(s) if now.wrapping_sub(s.since_ns) < NETNS_PENDING_NS => return Ok(()),
        Some(_) => true,
        None => false,
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let state = NetnsState {
        state: NETNS_PENDING,
        families: 0,
        since_ns: now,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
    };
    let flags = if refresh { 0 } else { NOEXIST };
    if let Err(e) = NETNS.insert(&cookie, &state, flags) {
        // Another CPU announced it first: pending all the same. Anything
        // else (a full map) leaves no way to serve it: refuse.
        if e != -EEXIST {
            return Err(Skip::Unserved);
        }
        return Ok(());
    }
    // A lost event (full ring) is found by the agent's sweep of the map.
    let _ = NETNS_EVENTS.output::<NetnsEvent>(
        &NetnsEvent {
            netns_cookie: cookie,
            tgid: state.tgid,
            pid: state.pid,
        },
        0,
    );
    Ok(())
}

/// The namespace a redirected socket connected from is still pending: its
/// handshake waits.
fn pending(rec: &ConnRecord) -> bool {
    // SAFETY: the value is copied out at once.
    match unsafe { NETNS.get(&rec.netns_cookie) }.copied() {
        // SAFETY: helper without arguments.
        Some(s) => {
            s.state == NETNS_PENDING
                && unsafe { bpf_ktime_get_ns() }.wrapping_sub(s.since_ns) < NETNS_PENDING_NS
        }
        None => false,
    }
}

/// A SYN of a redirected socket whose namespace is pending: dropped, so
/// TCP retransmits it once the agent listens (instead of a reset now).
fn held(ctx: &SkBuffContext) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: the verifier guarantees `skb` points at the context; `sk` is
    // checked for null before its `state` is read.
    let sk = unsafe { read_volatile(&raw const (*skb).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: non-null socket pointer from the context, field read at its
    // constant offset.
    if unsafe { read_volatile(&raw const (*sk).state) } != BPF_TCP_SYN_SENT {
        return false;
    }
    // SAFETY: helper allowed for cgroup_skb programs, on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    // SAFETY: the record is copied out at once.
    match unsafe { CONN_BY_COOKIE.get(&cookie) }.copied() {
        Some(rec) => pending(&rec),
        None => false,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), Skip> {
    let cfg = config()?;
    // SAFETY: the verifier guarantees `sock_addr` points at the context.
    let (ip4, port_be) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port as u16) };
    if cfg.has_v4 == 0 || (ip4 == cfg.listen_ip4 && port_be == cfg.listen_port_be) {
        // Not redirectable, or already aimed at the agent (another program
        // rewrote it): nothing to do.
        return Ok(());
    }
    let addr = v4_mapped(ip4);
    let target = target_for(port_be, addr)?;
    check_exempt()?;
    check_blocked()?;
    netns_gate(ctx, NETNS_HAS_V4)?;
    record(ctx, addr, port_be, FAMILY_V4, target)?;
    // SAFETY: user_ip4 and user_port are writable in connect4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = cfg.listen_ip4;
        (*ctx.sock_addr).user_port = u32::from(cfg.listen_port_be);
    }
    Ok(())
}

fn try_connect6(ctx: &SockAddrContext) -> Result<(), Skip> {
    let cfg = config()?;
    // SAFETY: the verifier guarantees `sock_addr` points at the context;
    // user_ip6 is read word by word as the verifier requires.
    let (words, port_be) = unsafe {
        let sa = ctx.sock_addr;
        (
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            (*sa).user_port as u16,
        )
    };
    let addr = v6_bytes(words);
    let mapped = is_v4_mapped(&addr);
    let listener = if mapped {
        if cfg.has_v4 == 0 {
            return Ok(());
        }
        v6_words(v4_mapped(cfg.listen_ip4))
    } else {
        if cfg.has_v6 == 0 {
            return Ok(());
        }
        cfg.listen_ip6
    };
    if words == listener && port_be == cfg.listen_port_be {
        return Ok(());
    }
    let target = target_for(port_be, addr)?;
    check_exempt()?;
    check_blocked()?;
    netns_gate(ctx, if mapped { NETNS_HAS_V4 } else { NETNS_HAS_V6 })?;
    record(ctx, addr, port_be, FAMILY_V6, target)?;
    // SAFETY: user_ip6 (word by word) and user_port are writable in connect6.
    unsafe {
        let sa = ctx.sock_addr;
        (*sa).user_ip6[0] = listener[0];
        (*sa).user_ip6[1] = listener[1];
        (*sa).user_ip6[2] = listener[2];
        (*sa).user_ip6[3] = listener[3];
        (*sa).user_port = u32::from(cfg.listen_port_be);
    }
    Ok(())
}

fn redirected(ctx: &SockAddrContext) -> Result<ConnRecord, Skip> {
    // SAFETY: helper allowed for sock_addr programs, on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is copied out at once.
    unsafe { CONN_BY_COOKIE.get(&cookie) }
        .copied()
        .ok_or(Skip::NotTarget)
}

fn try_getpeername4(ctx: &SockAddrContext) -> Result<(), Skip> {
    let rec = redirected(ctx)?;
    let a = rec.orig_addr;
    // SAFETY: user_ip4 and user_port are writable in getpeername4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        (*ctx.sock_addr).user_port = u32::from(rec.orig_port_be);
    }
    Ok(())
}

fn try_getpeername6(ctx: &SockAddrContext) -> Result<(), Skip> {
    let rec = redirected(ctx)?;
    let w = v6_words(rec.orig_addr);
    // SAFETY: user_ip6 (word by word) and user_port are writable in getpeername6.
    unsafe {
        let sa = ctx.sock_addr;
        (*sa).user_ip6[0] = w[0];
        (*sa).user_ip6[1] = w[1];
        (*sa).user_ip6[2] = w[2];
        (*sa).user_ip6[3] = w[3];
        (*sa).user_port = u32::from(rec.orig_port_be);
    }
    Ok(())
}

/// The client's local address as the agent will see it on accept. For an
/// IPv6 socket talking to an IPv4-mapped destination the kernel may not have
/// set the mapped source yet at TCP_CONNECT_CB, so the IPv4 source is used.
///
/// Every field is read unconditionally with a volatile load: the verifier
/// rejects a context access through a pointer the compiler picked between
/// two fields.
fn local_key(ctx: &SockOpsContext, rec: &ConnRecord) -> SockKey {
    let ops = ctx.ops;
    // SAFETY: the verifier guarantees `ops` points at the sock_ops context;
    // each field is read with its own constant offset.
    let (family, ip4, ip6, port) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_ip4),
            [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            read_volatile(&raw const (*ops).local_port),
        )
    };
    let addr = if family == AF_INET || is_v4_mapped(&rec.orig_addr) {
        v4_mapped(ip4)
    } else {
        v6_bytes(ip6)
    };
    SockKey {
        netns_cookie: rec.netns_cookie,
        addr,
        port: port as u16,
        _pad: 0,
        _pad2: 0,
    }
}

/// sock_ops and sk_msg keep `remote_port` as the network-order port,
/// shifted left by 16 on little-endian kernels (and not on big-endian
/// ones); the port in host order.
#[inline(always)]
fn remote_port_host(raw: u32) -> u16 {
    let be = if raw & 0xffff == 0 { raw >> 16 } else { raw };
    u16::from_be(be as u16)
}

/// The connection as a socket context (`bpf_sock_ops`, `sk_msg_md`: the
/// same field names) shows it to its socket, as a [`BypassKey`]. Each field
/// is read with its own volatile load, see [`local_key`].
macro_rules! ctx_bypass_key {
    ($netns_cookie:expr, $ctx:expr) => {{
        let c = $ctx;
        // SAFETY: the verifier guarantees `c` points at the program's
        // context; each field is read with its own constant offset.
        unsafe {
            bypass_key(
                $netns_cookie,
                read_volatile(&raw const (*c).family),
                (
                    read_volatile(&raw const (*c).local_ip4),
                    read_volatile(&raw const (*c).remote_ip4),
                ),
                (
                    [
                        read_volatile(&raw const (*c).local_ip6[0]),
                        read_volatile(&raw const (*c).local_ip6[1]),
                        read_volatile(&raw const (*c).local_ip6[2]),
                        read_volatile(&raw const (*c).local_ip6[3]),
                    ],
                    [
                        read_volatile(&raw const (*c).remote_ip6[0]),
                        read_volatile(&raw const (*c).remote_ip6[1]),
                        read_volatile(&raw const (*c).remote_ip6[2]),
                        read_volatile(&raw const (*c).remote_ip6[3]),
                    ],
                ),
                (
                    read_volatile(&raw const (*c).local_port),
                    read_volatile(&raw const (*c).remote_port),
                ),
            )
        }
    }};
}

/// A socket's own view of its connection, from the context fields every
/// socket program shares (each read with its own volatile load, see
/// [`local_key`]).
#[inline(always)]
fn bypass_key(
    netns_cookie: u64,
    family: u32,
    ip4: (u32, u32),
    ip6: ([u32; 4], [u32; 4]),
    ports: (u32, u32),
) -> BypassKey {
    let (local_addr, remote_addr) = if family == AF_INET {
        (v4_mapped(ip4.0), v4_mapped(ip4.1))
    } else {
        (v6_bytes(ip6.0), v6_bytes(ip6.1))
    };
    BypassKey {
        netns_cookie,
        local_addr,
        remote_addr,
        local_port: ports.0 as u16,
        remote_port: remote_port_host(ports.1),
        _pad: 0,
    }
}

fn ops_bypass_key(ctx: &SockOpsContext, rec: &ConnRecord) -> BypassKey {
    ctx_bypass_key!(rec.netns_cookie, ctx.ops)
}

fn try_sk_msg(ctx: &SkMsgContext) -> Result<(), Skip> {
    // SAFETY: helper allowed for sk_msg programs (kernel >= 5.15), on our
    // own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let own = ctx_bypass_key!(netns_cookie, ctx.msg);
    let mut peer = own.peer();
    // The flow is keyed by the workload's end: found under the sender's
    // own key, the workload sends; under the peer's, the agent does.
    let (flow, dir) = match BYPASS_FLOWS.get_ptr_mut(&own) {
        Some(f) => (f, 0),
        None => (BYPASS_FLOWS.get_ptr_mut(&peer).ok_or(Skip::NotTarget)?, 1),
    };
    let size = ctx.size();
    // SAFETY: a pointer into the map's value, valid for this run; two CPUs
    // updating one flow at once (two threads writing one socket) can only
    // lose a count, never go past the cap by more than a message.
    unsafe {
        // This end sends, so it has read what it answers.
        (*flow).in_flight[1 - dir] = 0;
        if (*flow).tcp[dir] != 0 {
            return Err(Skip::NotEnabled);
        }
        let total = (*flow).in_flight[dir].saturating_add(size);
        if total > BYPASS_CAP_BYTES {
            (*flow).tcp[dir] = 1;
            return Err(Skip::NotEnabled);
        }
        (*flow).in_flight[dir] = total;
    }
    // A peer not (or no longer) in the map, or not established (closing):
    // the helper refuses and the message goes over TCP, after what this
    // socket already handed over, so nothing is overtaken.
    let _ = BYPASS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS));
    Ok(())
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), Skip> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_STATE_CB
        && op != BPF_SOCK_OPS_TIMEOUT_INIT
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
    {
        return Ok(());
    }
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    // SAFETY: helper allowed for sock_ops programs, on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is copied out at once.
    let Some(rec) = (unsafe { CONN_BY_COOKIE.get(&cookie) }).copied() else {
        return Ok(());
    };
    if op == BPF_SOCK_OPS_TIMEOUT_INIT {
        // A connect held for a pending namespace retries its SYN soon
        // rather than after the default second. Any other socket keeps the
        // default (-1).
        ctx.set_reply(if pending(&rec) {
            NETNS_SYN_RTO_JIFFIES
        } else {
            u32::MAX
        });
    } else if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        let key = local_key(ctx, &rec);
        CONN_BY_ADDR
            .insert(&key, &rec, 0)
            .map_err(|_| Skip::MapFull)?;
        // Ask for state callbacks so the entries go when the socket closes.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        if config().is_ok_and(|c| c.local_bypass != 0) {
            let mut key = ops_bypass_key(ctx, &rec);
            // The flow first: a socket in the sockhash without one is
            // never bypassed, so a full flow map leaves it on TCP.
            if BYPASS_FLOWS.insert(&key, &BypassFlow::default(), 0).is_ok() {
                // SAFETY: the verifier checked `ops` is this program's context.
                let ops = unsafe { &mut *ctx.ops };
                if BYPASS.update(&mut key, ops, u64::from(BPF_ANY)).is_err() {
                    let _ = BYPASS_FLOWS.remove(&key);
                }
            }
        }
    } else if ctx.arg(1) == BPF_TCP_CLOSE {
        // The kernel drops a closed socket from the sockhash itself; its
        // flow goes here, even if an agent without the bypass runs now.
        let _ = BYPASS_FLOWS.remove(&ops_bypass_key(ctx, &rec));
        // Only the cookie entry goes: the by-address one is the agent's to
        // take (a client may close before the agent accepted), and a later
        // socket on the same local port overwrites it; the LRU bounds both.
        let _ = CONN_BY_COOKIE.remove(&cookie);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
