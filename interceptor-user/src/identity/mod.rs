//! Who opened a connection: the kernel's record (pid, tgid, uid, gid, comm,
//! cgroup id) completed from `/proc` and the cgroup path (executable, its
//! sha256, command line, systemd unit, container, pod).

mod cgroup;

use std::{
    collections::HashMap,
    fs::File,
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

pub use cgroup::{CgroupFacts, cgroup2_mount, parse_cgroup_path};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// What the kernel attested at connect time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelFacts {
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: [u8; 16],
    pub cgroup_id: u64,
    pub netns_cookie: u64,
}

/// A workload's identity as recorded in the audit log and matched by policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub user: Option<String>,
    pub comm: String,
    pub exe: Option<String>,
    pub exe_sha256: Option<String>,
    pub cmdline: Option<String>,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    pub container: Option<String>,
    pub pod_uid: Option<String>,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// The network namespace's inode (`ls -l /proc/PID/ns/net`), from the
    /// agent's listener there; 0 when unknown.
    pub netns_inode: u64,
}

/// Longest command line kept, in bytes.
const MAX_CMDLINE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileVersion {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    size: u64,
}

/// Resolves identities; caches executable hashes by file version so each
/// binary is read once.
pub struct IdentityResolver {
    proc_root: PathBuf,
    cgroup_root: Option<PathBuf>,
    /// Executables larger than this are not hashed (`exe_sha256` is null):
    /// hashing must have a bounded cost.
    max_hash_bytes: u64,
    hashes: Mutex<HashMap<FileVersion, Option<String>>>,
    cgroup_paths: Mutex<HashMap<u64, String>>,
}

impl IdentityResolver {
    #[must_use]
    pub fn new(cgroup_root: Option<PathBuf>, max_hash_bytes: u64) -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            cgroup_root,
            max_hash_bytes,
            hashes: Mutex::new(HashMap::new()),
            cgroup_paths: Mutex::new(HashMap::new()),
        }
    }

    /// Completes the kernel's facts. Blocking (reads `/proc`, may hash a
    /// binary): call from a blocking context. A process that already exited
    /// still yields the kernel-side fields.
    pub fn resolve(&self, k: &KernelFacts) -> Identity {
        let proc_dir = self.proc_root.join(k.tgid.to_string());
        let comm_len = k.comm.iter().position(|b| *b == 0).unwrap_or(k.comm.len());
        let comm = String::from_utf8_lossy(&k.comm[..comm_len]).into_owned();
        let exe = std::fs::read_link(proc_dir.join("exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        let exe_sha256 = self.exe_hash(&proc_dir.join("exe"));
        let cmdline = read_cmdline(&proc_dir.join("cmdline"));
        let cgroup =
            read_proc_cgroup(&proc_dir.join("cgroup")).or_else(|| self.cgroup_by_id(k.cgroup_id));
        let facts = cgroup.as_deref().map(parse_cgroup_path).unwrap_or_default();
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(k.uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        Identity {
            pid: k.pid,
            tgid: k.tgid,
            uid: k.uid,
            gid: k.gid,
            user,
            comm,
            exe,
            exe_sha256,
            cmdline,
            cgroup,
            unit: facts.unit,
            container: facts.container,
            pod_uid: facts.pod_uid,
            cgroup_id: k.cgroup_id,
            netns_cookie: k.netns_cookie,
            netns_inode: 0,
        }
    }

    /// sha256 of the executable process `tgid` runs (cached by file
    /// version, bounded like [`IdentityResolver::resolve`]). Blocking.
    #[must_use]
    pub fn exe_sha256_of(&self, tgid: u32) -> Option<String> {
        self.exe_hash(&self.proc_root.join(tgid.to_string()).join("exe"))
    }

    /// Hash of the file `/proc/PID/exe` opens: the very binary the process
    /// runs, even if its path was replaced since.
    fn exe_hash(&self, exe_link: &Path) -> Option<String> {
        let mut file = File::open(exe_link).ok()?;
        let meta = file.metadata().ok()?;
        let version = FileVersion {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            size: meta.size(),
        };
        if let Some(hit) = self.hashes.lock().ok()?.get(&version) {
            return hit.clone();
        }
        let digest = if meta.size() > self.max_hash_bytes {
            None
        } else {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break Some(hex(&hasher.finalize())),
                    Ok(n) => hasher.update(&buf[..n]),
                    Err(_) => break None,
                }
            }
        };
        let mut cache = self.hashes.lock().ok()?;
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(version, digest.clone());
        digest
    }

    /// For a process gone before we looked: find the cgroup directory whose
    /// inode is the kernel's cgroup id (cgroup v2 ids are inode numbers).
    fn cgroup_by_id(&self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(p) = self.cgroup_paths.lock().ok()?.get(&id) {
            return Some(p.clone());
        }
        let root = self.cgroup_root.as_ref()?;
        let found = find_inode(root, root, id, 0, &mut 0)?;
        self.cgroup_paths.lock().ok()?.insert(id, found.clone());
        Some(found)
    }
}

/// Depth-first search bounded in depth and in directories visited.
fn find_inode(root: &Path, dir: &Path, ino: u64, depth: u32, visited: &mut u32) -> Option<String> {
    const MAX_DEPTH: u32 = 16;
    const MAX_VISITED: u32 = 20_000;
    *visited += 1;
    if depth > MAX_DEPTH || *visited > MAX_VISITED {
        return None;
    }
    let meta = std::fs::metadata(dir).ok()?;
    if meta.ino() == ino {
        let rel = dir.strip_prefix(root).ok()?;
        return Some(format!("/{}", rel.to_string_lossy()));
    }
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        if entry.file_type().ok()?.is_dir()
            && let Some(p) = find_inode(root, &entry.path(), ino, depth + 1, visited)
        {
            return Some(p);
        }
    }
    None
}

fn read_cmdline(path: &Path) -> Option<String> {
    let mut raw = Vec::new();
    File::open(path)
        .ok()?
        .take(MAX_CMDLINE as u64)
        .read_to_end(&mut raw)
        .ok()?;
    while raw.last() == Some(&0) {
        raw.pop();
    }
    if raw.is_empty() {
        return None;
    }
    for b in &mut raw {
        if *b == 0 {
            *b = b' ';
        }
    }
    Some(String::from_utf8_lossy(&raw).into_owned())
}

/// The cgroup v2 path from `/proc/PID/cgroup` (the `0::` line).
fn read_proc_cgroup(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_own_process() {
        let r = IdentityResolver::new(cgroup2_mount(), 1 << 30);
        let me = std::process::id();
        let id = r.resolve(&KernelFacts {
            pid: me,
            tgid: me,
            comm: *b"test\0\0\0\0\0\0\0\0\0\0\0\0",
            ..KernelFacts::default()
        });
        assert_eq!(id.comm, "test");
        assert_eq!(
            id.user.as_deref(),
            Some("root").filter(|_| id.uid == 0).or(id.user.as_deref())
        );
        let exe = std::env::current_exe().unwrap();
        assert_eq!(id.exe.as_deref(), Some(exe.to_str().unwrap()));
        let sha = id.exe_sha256.unwrap();
        assert_eq!(sha.len(), 64);
        let expected = hex(&Sha256::digest(std::fs::read(&exe).unwrap()));
        assert_eq!(sha, expected);
        assert!(id.cmdline.is_some());
    }

    #[test]
    fn gone_process_keeps_kernel_fields() {
        let r = IdentityResolver::new(None, 1 << 20);
        let id = r.resolve(&KernelFacts {
            pid: u32::MAX - 1,
            tgid: u32::MAX - 1,
            uid: 4242,
            gid: 4343,
            comm: *b"ghost\0\0\0\0\0\0\0\0\0\0\0",
            cgroup_id: 1,
            netns_cookie: 0,
        });
        assert_eq!((id.uid, id.gid, id.comm.as_str()), (4242, 4343, "ghost"));
        assert!(id.exe.is_none() && id.exe_sha256.is_none());
    }

    #[test]
    fn huge_binaries_are_not_hashed() {
        let r = IdentityResolver::new(None, 16);
        let me = std::process::id();
        let id = r.resolve(&KernelFacts {
            pid: me,
            tgid: me,
            ..KernelFacts::default()
        });
        assert!(id.exe.is_some());
        assert!(id.exe_sha256.is_none());
    }
}
