//! Facts read off a cgroup path, and finding the cgroup v2 mount.

use std::path::PathBuf;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupFacts {
    /// systemd unit: the innermost `.service`, `.scope`, `.socket`, `.mount`
    /// or `.swap` component.
    pub unit: Option<String>,
    /// Container id (docker, containerd, CRI-O, podman), 64 hex digits.
    pub container: Option<String>,
    /// Kubernetes pod UID, dashed form.
    pub pod_uid: Option<String>,
}

/// Parses the systemd unit, container id and pod UID out of a cgroup path
/// such as `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/cri-containerd-<id>.scope`.
#[must_use]
pub fn parse_cgroup_path(path: &str) -> CgroupFacts {
    let mut facts = CgroupFacts::default();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if let Some(id) = container_id(part) {
            facts.container = Some(id);
            continue;
        }
        if let Some(uid) = pod_uid(part) {
            facts.pod_uid = Some(uid);
            continue;
        }
        const UNIT_SUFFIXES: [&str; 5] = [".service", ".scope", ".socket", ".mount", ".swap"];
        if UNIT_SUFFIXES.iter().any(|s| part.ends_with(s)) {
            facts.unit = Some(part.to_owned());
        }
    }
    facts
}

fn is_container_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn container_id(part: &str) -> Option<String> {
    // systemd-driver scopes: docker-<id>.scope, cri-containerd-<id>.scope,
    // crio-<id>.scope, libpod-<id>.scope; cgroupfs driver: a bare <id>.
    let stem = part.strip_suffix(".scope").unwrap_or(part);
    let id = [
        "docker-",
        "cri-containerd-",
        "crio-",
        "libpod-",
        "containerd-",
    ]
    .iter()
    .find_map(|p| stem.strip_prefix(p))
    .unwrap_or(stem);
    is_container_hex(id).then(|| id.to_ascii_lowercase())
}

fn pod_uid(part: &str) -> Option<String> {
    // systemd driver: kubepods-burstable-pod<uid with _>.slice;
    // cgroupfs driver: pod<uid>.
    let stem = part.strip_suffix(".slice").unwrap_or(part);
    let idx = stem.rfind("pod")?;
    if idx > 0 && !stem[..idx].ends_with('-') {
        return None;
    }
    let uid = stem[idx + 3..].replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    ok.then_some(uid)
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`
/// (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
#[must_use]
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mount_in(&text)
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint opts [optional...] - fstype source superopts
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mountpoint = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(mountpoint.replace("\\040", " ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn systemd_units() {
        assert_eq!(
            parse_cgroup_path("/system.slice/nginx.service")
                .unit
                .as_deref(),
            Some("nginx.service")
        );
        let f = parse_cgroup_path("/user.slice/user-1000.slice/session-3.scope");
        assert_eq!(f.unit.as_deref(), Some("session-3.scope"));
        assert_eq!(f.container, None);
        assert_eq!(parse_cgroup_path("/").unit, None);
    }

    #[test]
    fn containers() {
        for p in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!("/machine.slice/libpod-{ID}.scope"),
        ] {
            assert_eq!(parse_cgroup_path(&p).container.as_deref(), Some(ID), "{p}");
        }
        // A docker scope is a container, not a unit worth naming.
        assert_eq!(
            parse_cgroup_path(&format!("/system.slice/docker-{ID}.scope")).unit,
            None
        );
    }

    #[test]
    fn kubernetes_pods() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_0000_1111_2222_333344445555.slice/cri-containerd-{ID}.scope"
        );
        let f = parse_cgroup_path(&p);
        assert_eq!(
            f.pod_uid.as_deref(),
            Some("1b2c3d4e-0000-1111-2222-333344445555")
        );
        assert_eq!(f.container.as_deref(), Some(ID));
        let g = parse_cgroup_path(&format!(
            "/kubepods/besteffort/pod1b2c3d4e-0000-1111-2222-333344445555/{ID}"
        ));
        assert_eq!(
            g.pod_uid.as_deref(),
            Some("1b2c3d4e-0000-1111-2222-333344445555")
        );
        assert_eq!(parse_cgroup_path("/ipod/foo").pod_uid, None);
    }

    #[test]
    fn finds_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        // The mount found in this fixture, not a path the code assumes.
        let hybrid_mount = PathBuf::from("/sys/fs/cgroup").join("unified");
        assert_eq!(cgroup2_mount_in(hybrid), Some(hybrid_mount));
        let unified =
            "25 20 0:22 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_in("1 2 3:4 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
