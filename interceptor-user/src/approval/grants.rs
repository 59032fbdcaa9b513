//! Standing grants: an approver's "yes" that also covers later statements
//! of the same workload (of the same shape, or any the rule would hold),
//! until it expires or is revoked. Kept in a JSON state file so they
//! survive a restart.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{conn::Caller, identity::Identity};

/// How far an approval reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantScope {
    /// Only the statement that was held.
    Once,
    /// Statements of the same shape (fingerprint) on the same target.
    Fingerprint,
    /// Every statement the same rule would hold for this workload on
    /// this target.
    Identity,
}

/// The parts of an identity that stay the same across runs of one
/// workload (not pid or command line): what a grant is bound to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadKey {
    pub uid: u32,
    pub exe: Option<String>,
    pub exe_sha256: Option<String>,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    pub container: Option<String>,
    pub pod_uid: Option<String>,
}

impl WorkloadKey {
    #[must_use]
    pub fn of(id: &Identity) -> Self {
        Self {
            uid: id.uid,
            exe: id.exe.clone(),
            exe_sha256: id.exe_sha256.clone(),
            cgroup: id.cgroup.clone(),
            unit: id.unit.clone(),
            container: id.container.clone(),
            pod_uid: id.pod_uid.clone(),
        }
    }
}

/// Who did something through the control socket (from `SO_PEERCRED`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub user: Option<String>,
}

impl From<&Caller> for Actor {
    fn from(c: &Caller) -> Self {
        Self {
            uid: c.uid,
            gid: c.gid,
            pid: c.pid,
            user: c.user.clone(),
        }
    }
}

/// One standing grant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub scope: GrantScope,
    pub workload: WorkloadKey,
    pub target: String,
    pub rule: Option<String>,
    /// The statement shape, for `fingerprint` grants.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// The approval that created it, and its statement (for people).
    pub approval_id: String,
    pub query: String,
    pub granted_by: Vec<Actor>,
    #[serde(default)]
    pub reason: Option<String>,
    pub created_at: String,
    pub expires_at: String,
    /// `expires_at` in milliseconds since the Unix epoch: what matching uses.
    pub expires_unix_ms: i64,
    #[serde(default)]
    pub uses: u64,
}

impl Grant {
    /// Whether this grant lets a statement through now.
    #[must_use]
    pub fn covers(
        &self,
        workload: &WorkloadKey,
        target: &str,
        rule: Option<&str>,
        fingerprint: &str,
        now_ms: i64,
    ) -> bool {
        now_ms < self.expires_unix_ms
            && self.target == target
            && self.rule.as_deref() == rule
            && &self.workload == workload
            && match self.scope {
                GrantScope::Once => false,
                GrantScope::Fingerprint => self.fingerprint.as_deref() == Some(fingerprint),
                GrantScope::Identity => true,
            }
    }
}

/// The state file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct GrantsFile {
    pub version: u32,
    pub grants: Vec<Grant>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a grants file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads the grants still in force (a missing file is no grants).
///
/// # Errors
/// When the file exists but cannot be read or parsed.
pub fn load(path: &Path, now_ms: i64) -> Result<Vec<Grant>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file: GrantsFile = serde_json::from_str(&text).map_err(|source| StateError::Parse {
        path: path.to_owned(),
        source,
    })?;
    Ok(file
        .grants
        .into_iter()
        .filter(|g| g.expires_unix_ms > now_ms)
        .collect())
}

/// Writes the grants atomically (a temporary file, fsync, rename), mode 0600.
///
/// # Errors
/// When the directory or file cannot be written.
pub fn save(path: &Path, grants: &[Grant]) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let body = serde_json::to_vec_pretty(&GrantsFile {
        version: 1,
        grants: grants.to_vec(),
    })
    .map_err(|e| err(std::io::Error::other(e)))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(&body).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}
