//! The unix-socket programs (`cgroup/connect_unix`, `cgroup/getpeername_unix`,
//! kernel >= 6.7), loaded by hand: aya 0.14 has neither these attach types
//! nor kfunc calls.
//!
//! The programs are in the same object as the others, in a section aya
//! parses but the agent never loads through it. Here the object is parsed
//! again with aya-obj, its map references pointed at the maps aya created
//! and pinned, its stand-in helper calls ([`KFUNC_CAST_TO_KERN_CTX`],
//! [`KFUNC_SET_SUN_PATH`]) turned into kfunc calls by the kernel's BTF ids,
//! and the result loaded with `BPF_PROG_LOAD` under its real attach type.
//! Attachment is a pinned `bpf_link`, adopted with `BPF_LINK_UPDATE` like
//! the others.

use std::{
    collections::HashSet,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use aya_obj::{
    Object,
    btf::{Btf, BtfKind},
    generated::bpf_insn,
};
use interceptor_common::{
    KFUNC_CAST_TO_KERN_CTX, KFUNC_SET_SUN_PATH, PROG_CONNECT_UNIX, PROG_GETPEERNAME_UNIX,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
pub const BPF_CGROUP_UNIX_CONNECT: u32 = 49;
pub const BPF_CGROUP_UNIX_GETPEERNAME: u32 = 52;
/// `BPF_JMP | BPF_CALL`, and the source register marking a kfunc call.
const CALL: u8 = 0x85;
const PSEUDO_KFUNC_CALL: u8 = 2;

/// The programs and their attach types, in attach order.
pub const PROGRAMS: [(&str, u32); 2] = [
    (PROG_GETPEERNAME_UNIX, BPF_CGROUP_UNIX_GETPEERNAME),
    (PROG_CONNECT_UNIX, BPF_CGROUP_UNIX_CONNECT),
];

/// BTF ids of the kfuncs the programs call.
#[derive(Clone, Copy, Debug)]
pub struct Kfuncs {
    cast_to_kern_ctx: u32,
    set_sun_path: u32,
}

/// The kfuncs, when this kernel has the unix hooks (both appeared in 6.7).
///
/// # Errors
/// Why not: no kernel BTF, or a kernel older than 6.7.
pub fn kfuncs() -> Result<Kfuncs, String> {
    let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF ({e})"))?;
    let id = |name: &str| {
        btf.id_by_type_name_kind(name, BtfKind::Func).map_err(|_| {
            format!(
                "this kernel has no {name}: unix socket targets need Linux 6.7 or later (cgroup/connect_unix)"
            )
        })
    };
    Ok(Kfuncs {
        cast_to_kern_ctx: id("bpf_cast_to_kern_ctx")?,
        set_sun_path: id("bpf_sock_addr_set_sun_path")?,
    })
}

/// A loaded program, not attached yet.
pub struct Loaded {
    pub name: &'static str,
    pub attach_type: u32,
    pub fd: OwnedFd,
}

/// Loads [`PROGRAMS`] from `object`, their maps the ones pinned in `dir`
/// under their names.
///
/// # Errors
/// The object does not parse or relocate, a map pin is missing, or the
/// kernel refuses a program (with the verifier's last words).
pub fn load(object: &[u8], dir: &Path, kfuncs: Kfuncs) -> Result<Vec<Loaded>, String> {
    let mut obj = Object::parse(object).map_err(|e| format!("parsing the object: {e}"))?;
    let maps = std::mem::take(&mut obj.maps);
    let mut fds = Vec::new();
    for name in maps.keys() {
        let fd = super::bpf_obj_get(&dir.join(name))
            .map_err(|e| format!("map {name} pinned in {}: {e}", dir.display()))?;
        fds.push((name.as_str(), fd));
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    let relocations = fds
        .iter()
        .filter_map(|(name, fd)| maps.get(*name).map(|m| (*name, fd.as_raw_fd() as RawFd, m)));
    obj.relocate_maps(relocations, &text_sections)
        .map_err(|e| format!("relocating maps: {e}"))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| format!("relocating calls: {e}"))?;
    let license = obj.license.clone();
    let mut out = Vec::new();
    for (name, attach_type) in PROGRAMS {
        let prog = obj
            .programs
            .get(name)
            .ok_or_else(|| format!("the object has no program {name}"))?;
        let func = obj
            .functions
            .get(&prog.function_key())
            .ok_or_else(|| format!("the object has no code for {name}"))?;
        let mut insns = func.instructions.clone();
        let patched = patch_kfuncs(&mut insns, kfuncs);
        if patched == 0 {
            return Err(format!("{name}: no kfunc call to patch"));
        }
        let fd = prog_load(name, &insns, attach_type, &license)?;
        out.push(Loaded {
            name,
            attach_type,
            fd,
        });
    }
    Ok(out)
}

/// Turns the stand-in helper calls into kfunc calls; how many it turned.
fn patch_kfuncs(insns: &mut [bpf_insn], k: Kfuncs) -> usize {
    let mut n = 0;
    for insn in insns.iter_mut() {
        if insn.code != CALL || insn.src_reg() != 0 {
            continue;
        }
        #[allow(clippy::cast_sign_loss)]
        let id = match insn.imm as u32 {
            KFUNC_CAST_TO_KERN_CTX => k.cast_to_kern_ctx,
            KFUNC_SET_SUN_PATH => k.set_sun_path,
            _ => continue,
        };
        insn.set_src_reg(PSEUDO_KFUNC_CALL);
        insn.imm = i32::try_from(id).unwrap_or(0);
        insn.off = 0;
        n += 1;
    }
    n
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a fully initialised, #[repr(C)] bpf_attr prefix for
    // `cmd`; the pointers it holds are live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

fn owned(fd: libc::c_long) -> std::io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

fn prog_load(
    name: &str,
    insns: &[bpf_insn],
    attach_type: u32,
    license: &std::ffi::CStr,
) -> Result<OwnedFd, String> {
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: u32::try_from(insns.len()).map_err(|e| e.to_string())?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: attach_type,
    };
    match sys_bpf(BPF_PROG_LOAD, &attr) {
        Ok(fd) => owned(fd).map_err(|e| e.to_string()),
        Err(first) => {
            // Again with the verifier's log, for the message.
            let mut log = vec![0u8; 1 << 20];
            attr.log_level = 1;
            attr.log_size = u32::try_from(log.len()).unwrap_or(u32::MAX);
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = sys_bpf(BPF_PROG_LOAD, &attr);
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!(
                "the kernel refused {name}: {first}; verifier: {}",
                tail.join(" | ")
            ))
        }
    }
}

/// Attaches `prog` to the cgroup behind `cgroup_fd` as a link pinned at
/// `pin`, or, where a link is pinned there already, gives that link the
/// program (`BPF_LINK_UPDATE`: the cgroup is never without one).
///
/// # Errors
/// When the kernel refuses the link, update or pin.
pub fn attach(prog: &Loaded, cgroup_fd: RawFd, pin: &Path) -> Result<(), String> {
    let err =
        |what: &str, e: std::io::Error| format!("{} {what} {}: {e}", prog.name, pin.display());
    if pin.exists() {
        let link = super::bpf_obj_get(pin).map_err(|e| err("opening link", e))?;
        return super::bpf_link_update(link.as_raw_fd(), prog.fd.as_raw_fd())
            .map_err(|e| err("updating link", e));
    }
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let attr = LinkCreate {
        prog_fd: u32::try_from(prog.fd.as_raw_fd()).unwrap_or(0),
        target_fd: u32::try_from(cgroup_fd).unwrap_or(0),
        attach_type: prog.attach_type,
        flags: 0,
    };
    let link = sys_bpf(BPF_LINK_CREATE, &attr)
        .and_then(owned)
        .map_err(|e| err("creating link", e))?;
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(pin.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: u32::try_from(link.as_raw_fd()).unwrap_or(0),
        file_flags: 0,
    };
    sys_bpf(BPF_OBJ_PIN, &attr).map_err(|e| err("pinning link", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stand_in_calls_become_kfunc_calls() {
        let call = |imm: u32| {
            // SAFETY: bpf_insn is plain integers; all zeroes is a valid value.
            let mut i: bpf_insn = unsafe { std::mem::zeroed() };
            i.code = CALL;
            i.imm = i32::try_from(imm).unwrap();
            i
        };
        let mut insns = vec![
            call(KFUNC_CAST_TO_KERN_CTX),
            call(14),
            call(KFUNC_SET_SUN_PATH),
        ];
        let k = Kfuncs {
            cast_to_kern_ctx: 100,
            set_sun_path: 200,
        };
        assert_eq!(patch_kfuncs(&mut insns, k), 2);
        assert_eq!((insns[0].src_reg(), insns[0].imm), (PSEUDO_KFUNC_CALL, 100));
        assert_eq!((insns[1].src_reg(), insns[1].imm), (0, 14));
        assert_eq!((insns[2].src_reg(), insns[2].imm), (PSEUDO_KFUNC_CALL, 200));
    }
}
