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
//! - `cgroup/getpeername4`, `cgroup/getpeername6` (kernel >= 5.8): the client
//!   sees the original peer, so the redirect is invisible.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie,
        },
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::{SockAddrContext, SockOpsContext},
};
use interceptor_common::{
    AgentConfig, BLOCK_CGROUP, BLOCK_CGROUP_LEVELS, BLOCK_CGROUP_TREE, BLOCK_COMM, BLOCK_TGID,
    BLOCK_UID, BlockKey, ConnRecord, FAMILY_V4, FAMILY_V6, MAX_BLOCKED, MAX_CONNS, MAX_EXEMPT,
    MAX_TARGETS, SockKey, TARGET_KEY_PORT_BITS, TargetKey, TargetValue, comm_words, is_v4_mapped,
    v4_mapped, v6_bytes, v6_words,
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

#[cgroup_sock_addr(connect4)]
pub fn interceptor_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Err(Skip::Blocked) => REFUSE,
        _ => PROCEED,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn interceptor_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Err(Skip::Blocked) => REFUSE,
        _ => PROCEED,
    }
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

/// Why a program did nothing; never surfaces beyond the wrapper.
enum Skip {
    NotEnabled,
    NotTarget,
    Exempt,
    MapFull,
    /// The kill switch: the connect is refused.
    Blocked,
}

fn config() -> Result<&'static AgentConfig, Skip> {
    match CONFIG.get(0) {
        Some(cfg) if cfg.enabled != 0 => Ok(cfg),
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

/// The agent's own sockets (marked, or from an exempt process) go direct.
fn check_exempt(ctx: &SockAddrContext, cfg: &AgentConfig) -> Result<(), Skip> {
    // SAFETY: the verifier guarantees `sock_addr` points at the context and
    // that `sk` is a valid, non-null socket for cgroup sock_addr programs.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    if cfg.mark != 0 && mark == cfg.mark {
        return Err(Skip::Exempt);
    }
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

fn record(
    ctx: &SockAddrContext,
    orig_addr: [u8; 16],
    orig_port_be: u16,
    family: u16,
    target: TargetValue,
) -> Result<(), Skip> {
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
    let rec = ConnRecord {
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
    };
    CONN_BY_COOKIE
        .insert(&socket_cookie, &rec, 0)
        .map_err(|_| Skip::MapFull)
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
    check_exempt(ctx, cfg)?;
    check_blocked()?;
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
    check_exempt(ctx, cfg)?;
    check_blocked()?;
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
        addr,
        port: port as u16,
        _pad: 0,
    }
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), Skip> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
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
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        let key = local_key(ctx, &rec);
        CONN_BY_ADDR
            .insert(&key, &rec, 0)
            .map_err(|_| Skip::MapFull)?;
        // Ask for state callbacks so the entries go when the socket closes.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    } else if ctx.arg(1) == BPF_TCP_CLOSE {
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
