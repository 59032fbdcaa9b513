//! `SELECTOR` of `interceptor block`: an identity name from the policy, or
//! `key=value` conditions over identity fields, all of which must match.

use globset::{GlobBuilder, GlobMatcher};

use crate::{
    identity::Identity,
    policy::{Engine, IdentitySelectorSpec},
};

/// Keys a `key=value` selector may use, in canonical order.
pub const KEYS: [&str; 11] = [
    "pid",
    "uid",
    "gid",
    "user",
    "comm",
    "exe",
    "exe_sha256",
    "cgroup",
    "unit",
    "container",
    "pod_uid",
];

/// Longest comm the kernel keeps (`TASK_COMM_LEN` - 1).
pub const MAX_COMM: usize = 15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("empty selector: give an identity name or key=value conditions")]
    Empty,
    #[error("unknown selector key {0:?} (known: {keys})", keys = KEYS.join(", "))]
    UnknownKey(String),
    #[error("selector key {0:?} given twice")]
    DuplicateKey(String),
    #[error("selector key {0:?} has an empty value")]
    EmptyValue(String),
    #[error("{key}={value:?}: {why}")]
    BadValue {
        key: String,
        value: String,
        why: String,
    },
    #[error("{0:?} is neither key=value nor a single identity name")]
    Mixed(String),
}

/// Conditions over identity fields; `None` is "any". Same meaning as an
/// identity in the policy (globs over `cgroup` and `exe`, exact values
/// otherwise), plus `pid`, which matches the process (tgid) or thread id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub user: Option<String>,
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub exe_sha256: Option<String>,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    pub container: Option<String>,
    pub pod_uid: Option<String>,
}

impl Fields {
    /// The conditions of a policy identity.
    #[must_use]
    pub fn from_spec(s: &IdentitySelectorSpec) -> Self {
        Self {
            pid: None,
            uid: s.uid,
            gid: s.gid,
            user: s.user.clone(),
            comm: s.comm.clone(),
            exe: s.exe.clone(),
            exe_sha256: s.exe_sha256.as_ref().map(|h| h.to_ascii_lowercase()),
            cgroup: s.cgroup.clone(),
            unit: s.unit.clone(),
            container: s.container.clone(),
            pod_uid: s.pod_uid.clone(),
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Only conditions a cgroup path decides (`cgroup`, `unit`,
    /// `container`, `pod_uid`), and at least one.
    #[must_use]
    pub fn only_cgroup_facts(&self) -> bool {
        let rest = Self {
            cgroup: None,
            unit: None,
            container: None,
            pod_uid: None,
            ..self.clone()
        };
        rest.is_empty() && !self.is_empty()
    }

    /// Whether the process-level parts need `/proc/PID/exe`.
    #[must_use]
    pub fn needs_exe(&self) -> bool {
        self.exe.is_some() || self.exe_sha256.is_some()
    }

    fn canonical(&self) -> String {
        let mut parts = Vec::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        };
        put("pid", self.pid.map(|v| v.to_string()));
        put("uid", self.uid.map(|v| v.to_string()));
        put("gid", self.gid.map(|v| v.to_string()));
        put("user", self.user.clone());
        put("comm", self.comm.clone());
        put("exe", self.exe.clone());
        put("exe_sha256", self.exe_sha256.clone());
        put("cgroup", self.cgroup.clone());
        put("unit", self.unit.clone());
        put("container", self.container.clone());
        put("pod_uid", self.pod_uid.clone());
        parts.join(" ")
    }
}

/// [`Fields`] with its globs compiled.
#[derive(Clone, Debug)]
pub struct CompiledFields {
    pub fields: Fields,
    cgroup: Option<GlobMatcher>,
    exe: Option<GlobMatcher>,
}

fn glob(key: &str, p: Option<&String>) -> Result<Option<GlobMatcher>, SelectorError> {
    p.map(|p| {
        // As the policy compiles identity globs: `*` stays within one path
        // component.
        GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .map(|g| g.compile_matcher())
            .map_err(|e| SelectorError::BadValue {
                key: key.to_owned(),
                value: p.clone(),
                why: format!("bad glob: {e}"),
            })
    })
    .transpose()
}

impl CompiledFields {
    /// # Errors
    /// A bad glob.
    pub fn new(fields: Fields) -> Result<Self, SelectorError> {
        Ok(Self {
            cgroup: glob("cgroup", fields.cgroup.as_ref())?,
            exe: glob("exe", fields.exe.as_ref())?,
            fields,
        })
    }

    /// Whether the identity meets every condition. A condition on a fact
    /// the identity lacks (no exe, no cgroup) does not match.
    #[must_use]
    pub fn matches(&self, id: &Identity) -> bool {
        let f = &self.fields;
        let opt_eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| have.as_deref() == Some(w.as_str()))
        };
        f.pid.is_none_or(|p| p == id.tgid || p == id.pid)
            && f.uid.is_none_or(|u| u == id.uid)
            && f.gid.is_none_or(|g| g == id.gid)
            && opt_eq(&f.user, &id.user)
            && f.comm.as_ref().is_none_or(|c| *c == id.comm)
            && self
                .exe
                .as_ref()
                .is_none_or(|g| id.exe.as_deref().is_some_and(|e| g.is_match(e)))
            && f.exe_sha256.as_ref().is_none_or(|h| {
                id.exe_sha256
                    .as_deref()
                    .is_some_and(|x| x.eq_ignore_ascii_case(h))
            })
            && self.cgroup_facts_match(
                id.cgroup.as_deref(),
                id.unit.as_deref(),
                id.container.as_deref(),
                id.pod_uid.as_deref(),
            )
    }

    /// The cgroup-path conditions alone, for a cgroup directory.
    #[must_use]
    pub fn cgroup_facts_match(
        &self,
        cgroup: Option<&str>,
        unit: Option<&str>,
        container: Option<&str>,
        pod_uid: Option<&str>,
    ) -> bool {
        let f = &self.fields;
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        self.cgroup
            .as_ref()
            .is_none_or(|g| cgroup.is_some_and(|c| g.is_match(c)))
            && eq(&f.unit, unit)
            && eq(&f.container, container)
            && eq(&f.pod_uid, pod_uid)
    }
}

/// A parsed selector.
#[derive(Clone, Debug)]
pub enum Selector {
    /// An identity of the policy, looked up at each use (so a policy reload
    /// changes what it covers).
    Named(String),
    Fields(Box<CompiledFields>),
}

impl Selector {
    /// Parses `name` or `key=value key=value ...` (whitespace separated).
    ///
    /// # Errors
    /// Unknown or repeated keys, empty or malformed values, bad globs.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let tokens: Vec<&str> = text.split_whitespace().collect();
        match tokens.as_slice() {
            [] => Err(SelectorError::Empty),
            [one] if !one.contains('=') => Ok(Self::Named((*one).to_owned())),
            _ => {
                let mut f = Fields::default();
                let mut seen = Vec::new();
                for t in &tokens {
                    let Some((k, v)) = t.split_once('=') else {
                        return Err(SelectorError::Mixed(text.trim().to_owned()));
                    };
                    if !KEYS.contains(&k) {
                        return Err(SelectorError::UnknownKey(k.to_owned()));
                    }
                    if seen.contains(&k) {
                        return Err(SelectorError::DuplicateKey(k.to_owned()));
                    }
                    seen.push(k);
                    if v.is_empty() {
                        return Err(SelectorError::EmptyValue(k.to_owned()));
                    }
                    set(&mut f, k, v)?;
                }
                CompiledFields::new(f).map(|c| Self::Fields(Box::new(c)))
            }
        }
    }

    /// The canonical text: the name, or the conditions in [`KEYS`] order;
    /// two selectors meaning the same conditions have the same text.
    #[must_use]
    pub fn canonical(&self) -> String {
        match self {
            Self::Named(n) => n.clone(),
            Self::Fields(f) => f.fields.canonical(),
        }
    }

    /// Whether `id` is covered; a named identity the policy no longer has
    /// covers nothing.
    #[must_use]
    pub fn matches(&self, id: &Identity, engine: &Engine) -> bool {
        match self {
            Self::Named(n) => engine.identity_matches(n, id) == Some(true),
            Self::Fields(f) => f.matches(id),
        }
    }

    /// The conditions, with a named identity looked up in the policy.
    ///
    /// # Errors
    /// The policy has no identity of that name, or its globs are bad.
    pub fn fields(&self, engine: &Engine) -> Result<CompiledFields, String> {
        match self {
            Self::Named(n) => {
                let spec = engine
                    .file()
                    .identities
                    .get(n)
                    .ok_or_else(|| format!("the policy has no identity named {n:?}"))?;
                CompiledFields::new(Fields::from_spec(spec)).map_err(|e| e.to_string())
            }
            Self::Fields(f) => Ok((**f).clone()),
        }
    }
}

fn set(f: &mut Fields, k: &str, v: &str) -> Result<(), SelectorError> {
    let bad = |why: &str| SelectorError::BadValue {
        key: k.to_owned(),
        value: v.to_owned(),
        why: why.to_owned(),
    };
    let num = || v.parse::<u32>().map_err(|_| bad("expected a number"));
    match k {
        "pid" => f.pid = Some(num()?),
        "uid" => f.uid = Some(num()?),
        "gid" => f.gid = Some(num()?),
        "user" => f.user = Some(v.to_owned()),
        "comm" => {
            if v.len() > MAX_COMM {
                return Err(bad("the kernel keeps at most 15 bytes of a comm"));
            }
            f.comm = Some(v.to_owned());
        }
        "exe" => f.exe = Some(v.to_owned()),
        "exe_sha256" => {
            if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("expected 64 hex digits"));
            }
            f.exe_sha256 = Some(v.to_ascii_lowercase());
        }
        "cgroup" => f.cgroup = Some(v.to_owned()),
        "unit" => f.unit = Some(v.to_owned()),
        "container" => f.container = Some(v.to_ascii_lowercase()),
        "pod_uid" => f.pod_uid = Some(v.to_owned()),
        _ => return Err(SelectorError::UnknownKey(k.to_owned())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            pid: 101,
            tgid: 100,
            uid: 1000,
            gid: 1000,
            user: Some("app".into()),
            comm: "psql".into(),
            exe: Some("/usr/bin/psql".into()),
            exe_sha256: Some("ab".repeat(32)),
            cgroup: Some("/system.slice/app.service".into()),
            unit: Some("app.service".into()),
            ..Identity::default()
        }
    }

    fn engine() -> Engine {
        let file = crate::policy::PolicyFile::parse(
            "version: 1\nidentities:\n  app: {uid: 1000, comm: psql}\n  web: {cgroup: '/web/*'}\n",
            std::path::Path::new("t"),
        )
        .unwrap();
        Engine::new(file).unwrap()
    }

    #[test]
    fn parses_names_and_conditions() {
        assert!(matches!(Selector::parse(" app ").unwrap(), Selector::Named(n) if n == "app"));
        let s = Selector::parse("comm=psql uid=1000").unwrap();
        // Canonical order, whatever order was typed.
        assert_eq!(s.canonical(), "uid=1000 comm=psql");
        assert_eq!(
            Selector::parse("uid=1000   comm=psql").unwrap().canonical(),
            s.canonical()
        );
        let s = Selector::parse(&format!("exe_sha256={}", "AB".repeat(32))).unwrap();
        assert_eq!(s.canonical(), format!("exe_sha256={}", "ab".repeat(32)));
    }

    #[test]
    fn parse_errors_are_specific() {
        assert_eq!(Selector::parse("  ").unwrap_err(), SelectorError::Empty);
        assert_eq!(
            Selector::parse("colour=red").unwrap_err(),
            SelectorError::UnknownKey("colour".into())
        );
        assert_eq!(
            Selector::parse("uid=1 uid=2").unwrap_err(),
            SelectorError::DuplicateKey("uid".into())
        );
        assert_eq!(
            Selector::parse("uid=").unwrap_err(),
            SelectorError::EmptyValue("uid".into())
        );
        assert!(matches!(
            Selector::parse("uid=abc").unwrap_err(),
            SelectorError::BadValue { .. }
        ));
        assert!(matches!(
            Selector::parse("cgroup=/a/[b").unwrap_err(),
            SelectorError::BadValue { why, .. } if why.contains("glob")
        ));
        assert!(matches!(
            Selector::parse("comm=averyveryverylongname").unwrap_err(),
            SelectorError::BadValue { .. }
        ));
        assert!(matches!(
            Selector::parse("app uid=1").unwrap_err(),
            SelectorError::Mixed(_)
        ));
        assert!(
            Selector::parse("colour=red")
                .unwrap_err()
                .to_string()
                .contains("known: pid, uid")
        );
    }

    #[test]
    fn matching_ands_every_condition() {
        let e = engine();
        let i = id();
        for yes in [
            "uid=1000",
            "uid=1000 comm=psql",
            "pid=100",
            "pid=101",
            "user=app",
            "exe=/usr/bin/*",
            "cgroup=/system.slice/*",
            "unit=app.service",
            "app",
        ] {
            assert!(Selector::parse(yes).unwrap().matches(&i, &e), "{yes}");
        }
        for no in [
            "uid=0",
            "uid=1000 comm=bash",
            "pid=7",
            "exe=/bin/*",
            "cgroup=/*",
            "container=abc",
            "web",
            "nosuch",
        ] {
            assert!(!Selector::parse(no).unwrap().matches(&i, &e), "{no}");
        }
    }

    #[test]
    fn named_selectors_resolve_through_the_policy() {
        let e = engine();
        let f = Selector::parse("web").unwrap().fields(&e).unwrap();
        assert!(f.fields.only_cgroup_facts());
        assert!(f.cgroup_facts_match(Some("/web/a"), None, None, None));
        assert!(!f.cgroup_facts_match(Some("/web/a/b"), None, None, None));
        let f = Selector::parse("app").unwrap().fields(&e).unwrap();
        assert!(!f.fields.only_cgroup_facts());
        assert!(
            Selector::parse("nosuch")
                .unwrap()
                .fields(&e)
                .unwrap_err()
                .contains("no identity named")
        );
    }
}
