//! Secrets the agent holds for database accounts, and a target's `logins:`:
//! database users the agent logs in as itself, for the workloads the entry
//! names, so those workloads hold no password at all.
//!
//! A secret is named in the policy (a file or an environment variable of
//! the agent), never written in it, and read each time it is used, so a
//! rotated file takes effect for the next login. The secret's text is a
//! [`Secret`], whose `Debug` shows nothing, and no policy dump, status or
//! audit record carries more than where it comes from.

use std::{
    fmt,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// A password read from its source. Shown as `<secret>` in diagnostics.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A secret for a unit test.
    #[cfg(test)]
    #[must_use]
    pub fn from_test(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// Where a password comes from: `password_env` or `password_file` (one).
pub(super) struct SecretSource<'a> {
    pub env: Option<&'a str>,
    pub file: Option<&'a Path>,
}

impl SecretSource<'_> {
    /// The secret, read now. No source at all is the empty password.
    ///
    /// # Errors
    /// An unset variable, or a file that cannot be read or is readable by
    /// group or others.
    pub fn read(&self) -> Result<Secret, String> {
        if let Some(var) = self.env {
            return std::env::var(var)
                .map(Secret)
                .map_err(|_| format!("environment variable {var} is not set"));
        }
        if let Some(path) = self.file {
            check_file_mode(path)?;
            return std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| format!("cannot read {}: {e}", path.display()));
        }
        Ok(Secret(String::new()))
    }

    /// At load: one source at most (`required`: exactly one), and it can be
    /// read now.
    pub fn validate(&self, required: bool) -> Result<(), String> {
        match (self.env, self.file) {
            (Some(_), Some(_)) => Err("has both password_env and password_file".into()),
            (None, None) if required => Err("needs password_file or password_env".into()),
            _ => self.read().map(drop),
        }
    }
}

/// A secret file must be the agent's alone: no bits for group or others.
fn check_file_mode(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "secret file {} is readable by group or others (mode {mode:04o}); chmod 600 it",
            path.display()
        ));
    }
    Ok(())
}

/// One `logins:` entry: the agent logs in as `db_user` for workloads of
/// the named identities, with the secret from `password_file` or
/// `password_env`; any other workload asking for `db_user` is refused.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoginSpec {
    pub db_user: String,
    /// Names from the policy's `identities:`.
    pub identities: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl LoginSpec {
    pub(super) fn source(&self) -> SecretSource<'_> {
        SecretSource {
            env: self.password_env.as_deref(),
            file: self.password_file.as_deref(),
        }
    }

    /// The password, read now (a rotated file is picked up).
    ///
    /// # Errors
    /// As [`SecretSource::read`].
    pub fn password(&self) -> Result<Secret, String> {
        self.source().read()
    }

    /// Whether a workload that matched `identities` may log in as this
    /// entry's user.
    #[must_use]
    pub fn allows(&self, identities: &[String]) -> bool {
        identities.iter().any(|i| self.identities.contains(i))
    }

    /// Where the secret comes from, for records and status (never the
    /// secret itself).
    #[must_use]
    pub fn secret_source(&self) -> String {
        match (&self.password_env, &self.password_file) {
            (Some(v), _) => format!("env:{v}"),
            (None, Some(p)) => format!("file:{}", p.display()),
            (None, None) => "none".into(),
        }
    }
}

/// What a workload's login to a target comes to.
#[derive(Debug)]
pub enum Login<'a> {
    /// No `logins:` entry for the user: authentication passes through.
    Passthrough,
    /// The agent logs in with the entry's secret.
    Brokered(&'a LoginSpec),
    /// An entry exists, and this workload is none of its identities.
    Refused(&'a LoginSpec),
}

/// The login a workload of `identities` asking for `db_user` gets.
#[must_use]
pub fn login_for<'a>(logins: &'a [LoginSpec], db_user: &str, identities: &[String]) -> Login<'a> {
    match logins.iter().find(|l| l.db_user == db_user) {
        None => Login::Passthrough,
        Some(l) if l.allows(identities) => Login::Brokered(l),
        Some(l) => Login::Refused(l),
    }
}

/// The refusal a workload of the wrong identity gets, naming both sides.
#[must_use]
pub fn refusal_message(entry: &LoginSpec, identities: &[String]) -> String {
    let who = if identities.is_empty() {
        "this workload matches no policy identity".to_owned()
    } else {
        format!("this workload is identity {}", identities.join(", "))
    };
    format!(
        "interceptor: database user {:?} is logged in by the agent only for identity {}; {who}",
        entry.db_user,
        entry.identities.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(file: Option<PathBuf>) -> LoginSpec {
        LoginSpec {
            db_user: "etl_rw".into(),
            identities: vec!["etl".into()],
            password_env: None,
            password_file: file,
        }
    }

    #[test]
    fn secrets_hide_in_debug_and_loose_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = entry(Some(path.clone()));
        let err = e.password().unwrap_err();
        assert!(
            err.contains("readable by group or others") && err.contains("0644"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pw = e.password().unwrap();
        assert_eq!(pw.expose(), "s3cret");
        assert_eq!(format!("{pw:?}"), "<secret>");
        assert!(!format!("{e:?}").contains("s3cret"));
        // Rotation: the next read sees the new text.
        std::fs::write(&path, "n3w").unwrap();
        assert_eq!(e.password().unwrap().expose(), "n3w");
    }

    #[test]
    fn sources_are_one_of_two() {
        let both = SecretSource {
            env: Some("X"),
            file: Some(Path::new("/x")),
        };
        assert!(both.validate(false).is_err());
        let none = SecretSource {
            env: None,
            file: None,
        };
        assert!(none.validate(true).is_err());
        assert!(none.validate(false).is_ok());
        let unset = SecretSource {
            env: Some("INTERCEPTOR_TEST_SURELY_UNSET"),
            file: None,
        };
        assert!(unset.validate(true).unwrap_err().contains("not set"));
    }

    #[test]
    fn logins_by_user_and_identity() {
        let logins = vec![entry(None)];
        let etl = vec!["etl".to_owned()];
        let other = vec!["reports".to_owned()];
        assert!(matches!(
            login_for(&logins, "etl_rw", &etl),
            Login::Brokered(_)
        ));
        assert!(matches!(
            login_for(&logins, "etl_rw", &other),
            Login::Refused(_)
        ));
        assert!(matches!(
            login_for(&logins, "app", &other),
            Login::Passthrough
        ));
        let msg = refusal_message(&logins[0], &other);
        assert!(msg.contains("\"etl_rw\"") && msg.contains("etl") && msg.contains("reports"));
        assert!(refusal_message(&logins[0], &[]).contains("matches no policy identity"));
    }
}
