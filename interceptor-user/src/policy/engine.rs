//! Decisions: a statement's facts, the workload's identity and the session
//! against the policy's rules.
//!
//! CONTRACT used by the protocol modules (keep these signatures; extend
//! additively): `Engine::new`, `Engine::load`, `Engine::bind_identity`,
//! `Engine::decide`, `Engine::decide_function_call`, `SessionState`,
//! `Verdict`, `StatementVerdict`.
//!
//! Hot path: a message is split and each statement normalised (one linear
//! pass); a keyed hash of the canonical text finds the shape in a per-thread
//! cache of statement facts, where the entry's own canonical text must match
//! (a full parse and the SHA-256 fingerprint happen once per shape, session
//! context and thread), and a per-thread cache of decisions keyed by
//! (policy, identity binding, target, db user, database, name resolution,
//! shape).
//! The agent runs one single-threaded runtime per worker thread, so the
//! caches are `thread_local!`: no lock is shared on the per-query path.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet, hash_map::RandomState},
    hash::{BuildHasher as _, BuildHasherDefault, Hash, Hasher},
    path::Path,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use serde::Serialize;

use super::{
    ApprovalSpec, Decision, IdentityMode, IdentitySelectorSpec, Mode, PolicyError, PolicyFile,
    RuleSpec, WherePresence,
};
use crate::{
    identity::Identity,
    sql::{
        self, Analysis, Dialect, Effect, Fingerprint, Flag, FlagSet, Kind, LexMode, Limits,
        NormInfo, PreparedBody, Resolution, Scratch, SearchPathChange, StatementFacts,
        StatementSpan,
    },
};

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// A validated policy, ready to decide. Immutable; the agent swaps in a new
/// one on reload.
#[derive(Debug)]
pub struct Engine {
    file: PolicyFile,
    generation: u64,
    targets: HashMap<String, TargetInfo>,
    identities: Vec<CompiledSelector>,
    rules: Vec<CompiledRule>,
    limits: Limits,
    /// Part of the facts-cache key: facts depend on the limits.
    limits_key: u64,
}

#[derive(Debug)]
struct TargetInfo {
    index: usize,
    dialect: Dialect,
    default_schema: String,
}

#[derive(Debug)]
struct CompiledSelector {
    name: String,
    cgroup: Option<GlobMatcher>,
    exe: Option<GlobMatcher>,
    spec: IdentitySelectorSpec,
}

/// Globs compiled twice: case-sensitive for PostgreSQL names (quoted names
/// keep their case), case-insensitive for MySQL.
#[derive(Debug)]
struct NameMatcher {
    exact: GlobSet,
    folded: GlobSet,
}

impl NameMatcher {
    fn new(patterns: &[String]) -> Result<Self, String> {
        let mut exact = GlobSetBuilder::new();
        let mut folded = GlobSetBuilder::new();
        for p in patterns {
            let e = |e: globset::Error| format!("bad glob {p:?}: {e}");
            exact.add(
                GlobBuilder::new(p)
                    .literal_separator(false)
                    .build()
                    .map_err(e)?,
            );
            folded.add(
                GlobBuilder::new(p)
                    .case_insensitive(true)
                    .build()
                    .map_err(e)?,
            );
        }
        Ok(Self {
            exact: exact.build().map_err(|e| e.to_string())?,
            folded: folded.build().map_err(|e| e.to_string())?,
        })
    }

    fn is_match(&self, name: &str, dialect: Dialect) -> bool {
        match dialect {
            Dialect::Postgres => self.exact.is_match(name),
            Dialect::Mysql => self.folded.is_match(name),
        }
    }
}

#[derive(Debug)]
struct CompiledRule {
    name: Arc<str>,
    decision: Decision,
    message: Option<String>,
    approval: Option<Arc<ApprovalSpec>>,
    identities: Option<Vec<usize>>,
    targets: Option<Vec<usize>>,
    databases: Option<NameMatcher>,
    db_users: Option<NameMatcher>,
    kinds: Option<u16>,
    tables: Option<NameMatcher>,
    any_tables: Option<NameMatcher>,
    functions: Option<NameMatcher>,
    any_functions: Option<NameMatcher>,
    where_clause: Option<WherePresence>,
    max_limit: Option<u64>,
    flags: Option<FlagSet>,
    fingerprints: Option<HashSet<u64>>,
}

/// How a connection's statements are treated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EffectiveMode {
    #[default]
    Enforce,
    /// Decided and recorded, let through.
    Shadow,
    /// Allowed and recorded; every distinct fingerprint is learnt.
    Learn,
}

/// Which named identities of the policy a connection's workload matches,
/// computed once per connection.
#[derive(Clone, Debug, Default)]
pub struct IdentityBinding {
    /// Names of the matching `identities` entries.
    pub names: Vec<String>,
    /// The identity-level mode, when a matching identity sets one (the
    /// strictest wins: enforce, then shadow, then learn).
    pub mode: Option<IdentityMode>,
    /// The engine this was computed by; a binding from an older policy is
    /// recomputed per message until the connection rebinds.
    generation: u64,
    matched: Vec<usize>,
    key: u64,
}

/// A statement prepared at SQL level in this session.
#[derive(Clone, Debug)]
enum Prepared {
    Text(String),
    Unknown,
}

/// Per-connection state the engine needs between statements: SQL-level
/// prepared statements (`PREPARE name AS q` / `EXECUTE name`), the current
/// database (MySQL `USE`), the search path (PostgreSQL).
#[derive(Debug, Default)]
pub struct SessionState {
    /// Current database; MySQL resolves unqualified names against it. The
    /// engine sets it on `USE db`; the protocol module may set it too
    /// (COM_INIT_DB, session-state tracking).
    pub database: Option<String>,
    prepared: HashMap<String, Prepared>,
    /// PostgreSQL search path when changed by the session (`None`: the
    /// target's default schema).
    search_path: Option<Vec<String>>,
    /// The search path was set to something unreadable.
    search_path_unknown: bool,
    /// Inside an explicit transaction (`BEGIN` seen, no end yet): settings
    /// changed here may be rolled back, so they widen resolution instead of
    /// replacing it.
    in_transaction: bool,
    /// The last message's name resolution and cache keys, reused while
    /// everything they derive from is unchanged: most messages of a
    /// connection change none of it.
    resolved: Option<Resolved>,
}

/// What a message's statements change in the session, applied once the
/// message is let through.
#[derive(Default)]
struct Effects {
    /// Every effect but `Effect::None` (most statements have none).
    list: Vec<Effect>,
    /// How many statements set an effect, `None` included (an `EXECUTE`
    /// sets none): a setting is certain only when it is alone.
    statements: usize,
}

/// A connection's name resolution and the cache keys derived from it,
/// with what they were derived from.
#[derive(Debug)]
struct Resolved {
    generation: u64,
    target: String,
    db_user: String,
    database: String,
    session_database: Option<String>,
    search_path: Option<Vec<String>>,
    search_path_unknown: bool,
    resolution: Resolution,
    ctx_key: u64,
    session_key: u64,
}

/// The database rules' `databases` see: MySQL's current one (`USE`
/// changes it), otherwise the one the connection logged in to.
fn rules_database<'a>(dialect: Dialect, session: &'a SessionState, login: &'a str) -> &'a str {
    match (dialect, &session.database) {
        (Dialect::Mysql, Some(db)) => db.as_str(),
        _ => login,
    }
}

impl Resolved {
    fn holds_for(&self, generation: u64, req: &DecisionRequest<'_>, s: &SessionState) -> bool {
        self.generation == generation
            && self.target == req.target
            && self.db_user == req.db_user
            && self.database == req.database
            && self.session_database == s.database
            && self.search_path == s.search_path
            && self.search_path_unknown == s.search_path_unknown
    }
}

/// What to decide: the statement text and who runs it where.
#[derive(Clone, Copy, Debug)]
pub struct DecisionRequest<'a> {
    pub identity: &'a Identity,
    pub binding: &'a IdentityBinding,
    /// Target name, as in the policy's `targets`.
    pub target: &'a str,
    pub db_user: &'a str,
    pub database: &'a str,
    /// One query message: may hold several statements.
    pub sql: &'a str,
}

/// The decision about one statement of a message.
#[derive(Clone, Debug, Serialize)]
pub struct StatementVerdict {
    /// The statement's text (a slice of the message, trimmed).
    pub text: String,
    pub kind: Kind,
    /// Shared with the facts cache: cloning a verdict's pieces for the
    /// audit record costs no allocation.
    pub tables: Arc<[String]>,
    pub fingerprint: Arc<str>,
    pub decision: Decision,
    pub rule: Option<Arc<str>>,
    pub reason: Arc<str>,
    /// True when sqlparser could not parse it (lexical classification).
    pub unparsed: bool,
    /// Its flags (`dynamic_sql`, `file_access`, ...), for the audit record.
    pub flags: FlagSet,
}

/// More about one statement than the audit needs (for tools such as
/// `policy test`), aligned with [`Verdict::statements`].
#[derive(Clone, Debug, Serialize)]
pub struct StatementDetails {
    /// All facts: tables written, functions, flags, WHERE, ...
    #[serde(flatten, serialize_with = "serialize_arc")]
    pub facts: Arc<StatementFacts>,
    /// The literal LIMIT, when there is one.
    pub limit: Option<u64>,
}

/// The decision about a whole message: the strictest of its statements.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// What the policy says. In shadow or learn mode the statement goes
    /// through anyway: see `enforced`.
    pub decision: Decision,
    /// False in shadow and learn mode: the decision is recorded, not applied.
    pub enforced: bool,
    pub mode: EffectiveMode,
    /// The deciding rule, `None` when the default applied.
    pub rule: Option<Arc<str>>,
    /// Human-readable reason, for the client's error and the audit log.
    pub reason: Arc<str>,
    pub statements: Vec<StatementVerdict>,
    /// Evaluation time in microseconds.
    pub eval_us: u64,
    /// The deciding rule's approval settings when `decision` is `approve`.
    #[serde(skip)]
    pub approval: Option<Arc<ApprovalSpec>>,
    /// Full facts per statement, aligned with `statements`.
    #[serde(skip)]
    pub details: Vec<StatementDetails>,
}

fn serialize_arc<S: serde::Serializer, T: Serialize>(v: &Arc<T>, s: S) -> Result<S::Ok, S::Error> {
    v.as_ref().serialize(s)
}

impl Verdict {
    /// Whether the statement must be held back (denied or awaiting approval).
    #[must_use]
    pub fn blocks(&self) -> bool {
        self.enforced && self.decision != Decision::Allow
    }
}

// ---------------------------------------------------------------------------
// Per-thread caches.

/// Hasher for keys that are (or contain) SHA-derived values: mixing is
/// enough, no keyed hashing needed.
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u128(&mut self, x: u128) {
        self.write_u64(x as u64);
        self.write_u64((x >> 64) as u64);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
    fn write_u8(&mut self, x: u8) {
        self.write_u64(u64::from(x));
    }
}

type Mix = BuildHasherDefault<MixHasher>;

/// A bounded cache: two generations; when the young one fills, the old one
/// is dropped. Hits in the old generation are promoted.
struct TwoGen<K, V> {
    hot: HashMap<K, V, Mix>,
    cold: HashMap<K, V, Mix>,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> TwoGen<K, V> {
    fn new(cap: usize) -> Self {
        Self {
            hot: HashMap::default(),
            cold: HashMap::default(),
            cap,
        }
    }

    fn get(&mut self, k: &K) -> Option<V> {
        if let Some(v) = self.hot.get(k) {
            return Some(v.clone());
        }
        let v = self.cold.remove(k)?;
        self.insert(k.clone(), v.clone());
        Some(v)
    }

    fn insert(&mut self, k: K, v: V) {
        if self.hot.len() >= self.cap {
            self.cold = std::mem::take(&mut self.hot);
        }
        self.hot.insert(k, v);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct FactsKey {
    /// [`shape_hash`] of the canonical text.
    shape: u64,
    ctx: u64,
    limits: u64,
}

/// Key of [`shape_hash`]: random per process, so a workload can neither aim
/// its statements at one bucket nor make two shapes share a key on purpose.
/// A collision would only cost a miss: a hit also compares the entry's
/// canonical text.
static SHAPE_HASH: LazyLock<RandomState> = LazyLock::new(RandomState::new);

fn shape_hash(canonical: &str, dialect: Dialect) -> u64 {
    SHAPE_HASH.hash_one((dialect, canonical))
}

/// Facts of a shape in a resolution context.
#[derive(Debug)]
struct FactsEntry {
    /// The canonical text and dialect this entry was analysed from.
    canonical: Box<str>,
    dialect: Dialect,
    facts: Arc<StatementFacts>,
    fingerprint: Fingerprint,
    fingerprint_text: Arc<str>,
    effect: Effect,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct DecisionKey {
    generation: u64,
    binding: u64,
    target: usize,
    session: u64,
    ctx: u64,
    shape: u128,
}

#[derive(Clone)]
struct Evaluation {
    decision: Decision,
    rule: Option<usize>,
    reason: Arc<str>,
    /// A matching rule has `max_limit`: the outcome depends on the literal.
    limit_sensitive: bool,
}

struct ThreadCache {
    facts: TwoGen<FactsKey, Arc<FactsEntry>>,
    decisions: TwoGen<DecisionKey, Evaluation>,
    scratch: Scratch,
    canonical: String,
    spans: Vec<StatementSpan>,
}

const FACTS_CACHE: usize = 4096;
const DECISION_CACHE: usize = 8192;

thread_local! {
    static CACHE: RefCell<ThreadCache> = RefCell::new(ThreadCache {
        facts: TwoGen::new(FACTS_CACHE),
        decisions: TwoGen::new(DECISION_CACHE),
        scratch: Scratch::default(),
        canonical: String::new(),
        spans: Vec::new(),
    });
}

/// Test hook: gives every cached shape of this thread another shape's
/// facts, as colliding keys would.
#[cfg(test)]
pub(super) fn scramble_facts_cache() {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let mut values: Vec<Arc<FactsEntry>> = c.facts.hot.values().cloned().collect();
        values.rotate_left(1);
        for (v, new) in c.facts.hot.values_mut().zip(values) {
            *v = new;
        }
    });
}

fn hash_of<T: Hash + ?Sized>(v: &T) -> u64 {
    // Short, attacker-influenced strings (database names): keyed SipHash
    // with a fixed key is fine here, the value only spreads cache buckets
    // and is combined with SHA-derived keys.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

// ---------------------------------------------------------------------------

fn invalid(message: String) -> PolicyError {
    PolicyError::Invalid {
        path: "policy".into(),
        message,
    }
}

fn compile_rule(
    r: &RuleSpec,
    identities: &[CompiledSelector],
    targets: &HashMap<String, TargetInfo>,
) -> Result<CompiledRule, PolicyError> {
    let ctx = |e: String| invalid(format!("rule {:?}: {e}", r.name));
    let matcher = |v: &Option<Vec<String>>| -> Result<Option<NameMatcher>, PolicyError> {
        v.as_deref().map(NameMatcher::new).transpose().map_err(ctx)
    };
    // Names the rule refers to, resolved to positions once.
    let resolve = |names: &Option<Vec<String>>,
                   what: &str,
                   find: &dyn Fn(&str) -> Option<usize>|
     -> Result<Option<Vec<usize>>, PolicyError> {
        names
            .as_ref()
            .map(|ns| {
                ns.iter()
                    .map(|n| {
                        find(n).ok_or_else(|| {
                            invalid(format!("rule {:?} names unknown {what} {n:?}", r.name))
                        })
                    })
                    .collect()
            })
            .transpose()
    };
    let identity_idx = resolve(&r.identities, "identity", &|n| {
        identities.iter().position(|s| s.name == n)
    })?;
    let target_idx = resolve(&r.targets, "target", &|n| targets.get(n).map(|t| t.index))?;
    let fingerprints = r
        .fingerprints
        .as_ref()
        .map(|fs| {
            fs.iter()
                .map(|f| {
                    Fingerprint::parse_id(f)
                        .ok_or_else(|| invalid(format!("rule {:?}: bad fingerprint {f:?}", r.name)))
                })
                .collect::<Result<HashSet<_>, _>>()
        })
        .transpose()?;
    Ok(CompiledRule {
        name: r.name.as_str().into(),
        decision: r.decision,
        message: r.message.clone(),
        approval: r.approval.clone().map(Arc::new),
        identities: identity_idx,
        targets: target_idx,
        databases: matcher(&r.databases)?,
        db_users: matcher(&r.db_users)?,
        kinds: r
            .kinds
            .as_ref()
            .map(|ks| ks.iter().fold(0, |m, k| m | k.bit())),
        tables: matcher(&r.tables)?,
        any_tables: matcher(&r.any_tables)?,
        functions: matcher(&r.functions)?,
        any_functions: matcher(&r.any_functions)?,
        where_clause: r.where_clause,
        max_limit: r.max_limit,
        flags: r.flags.as_ref().map(|fs| fs.iter().copied().collect()),
        fingerprints,
    })
}

fn glob_matcher(p: Option<&String>) -> Result<Option<GlobMatcher>, PolicyError> {
    p.map(|p| {
        GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .map(|g| g.compile_matcher())
            .map_err(|e| invalid(format!("bad glob {p:?}: {e}")))
    })
    .transpose()
}

fn mode_rank(m: IdentityMode) -> u8 {
    match m {
        IdentityMode::Enforce => 2,
        IdentityMode::Shadow => 1,
        IdentityMode::Learn => 0,
    }
}

/// Working state of one decision.
struct Ctx<'a> {
    req: &'a DecisionRequest<'a>,
    target: &'a TargetInfo,
    binding: &'a IdentityBinding,
    resolution: &'a Resolution,
    ctx_key: u64,
    session_key: u64,
    /// The database rules' `databases` see (MySQL: the current one).
    database: &'a str,
}

impl Engine {
    /// # Errors
    /// When the policy cannot be compiled (bad globs, bad fingerprints).
    pub fn new(file: PolicyFile) -> Result<Self, PolicyError> {
        let targets: HashMap<String, TargetInfo> = file
            .targets
            .iter()
            .enumerate()
            .map(|(index, t)| {
                (
                    t.name.clone(),
                    TargetInfo {
                        index,
                        dialect: t.protocol.dialect(),
                        default_schema: t
                            .default_schema
                            .clone()
                            .unwrap_or_else(|| "public".to_owned()),
                    },
                )
            })
            .collect();
        let identities = file
            .identities
            .iter()
            .map(|(name, spec)| {
                Ok(CompiledSelector {
                    name: name.clone(),
                    cgroup: glob_matcher(spec.cgroup.as_ref())?,
                    exe: glob_matcher(spec.exe.as_ref())?,
                    spec: spec.clone(),
                })
            })
            .collect::<Result<Vec<_>, PolicyError>>()?;
        let rules = file
            .rules
            .iter()
            .map(|r| compile_rule(r, &identities, &targets))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            limits: file.limits,
            limits_key: hash_of(&(file.limits.max_depth, file.limits.max_tokens)),
            file,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            targets,
            identities,
            rules,
        })
    }

    /// Reads, validates and compiles a policy file (for start-up and hot
    /// reload: on error the caller keeps the engine it has).
    ///
    /// # Errors
    /// As [`PolicyFile::load`] and [`Engine::new`], with the file's path.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let file = PolicyFile::load(path)?;
        Self::new(file).map_err(|e| match e {
            PolicyError::Invalid { message, .. } => PolicyError::Invalid {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    #[must_use]
    pub fn file(&self) -> &PolicyFile {
        &self.file
    }

    fn selector_matches(s: &CompiledSelector, id: &Identity) -> bool {
        let spec = &s.spec;
        let opt_eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| have.as_deref() == Some(w.as_str()))
        };
        spec.uid.is_none_or(|u| u == id.uid)
            && spec.gid.is_none_or(|g| g == id.gid)
            && opt_eq(&spec.user, &id.user)
            && spec.comm.as_ref().is_none_or(|c| *c == id.comm)
            && s.cgroup
                .as_ref()
                .is_none_or(|g| id.cgroup.as_deref().is_some_and(|c| g.is_match(c)))
            && s.exe
                .as_ref()
                .is_none_or(|g| id.exe.as_deref().is_some_and(|e| g.is_match(e)))
            && spec.exe_sha256.as_ref().is_none_or(|h| {
                id.exe_sha256
                    .as_deref()
                    .is_some_and(|x| x.eq_ignore_ascii_case(h))
            })
            && opt_eq(&spec.unit, &id.unit)
            && opt_eq(&spec.container, &id.container)
            && opt_eq(&spec.pod_uid, &id.pod_uid)
    }

    #[must_use]
    pub fn bind_identity(&self, identity: &Identity) -> IdentityBinding {
        let matched: Vec<usize> = self
            .identities
            .iter()
            .enumerate()
            .filter(|(_, s)| Self::selector_matches(s, identity))
            .map(|(i, _)| i)
            .collect();
        let mode = matched
            .iter()
            .filter_map(|i| self.identities[*i].spec.mode)
            .max_by_key(|m| mode_rank(*m));
        IdentityBinding {
            names: matched
                .iter()
                .map(|i| self.identities[*i].name.clone())
                .collect(),
            mode,
            generation: self.generation,
            key: hash_of(&matched),
            matched,
        }
    }

    /// Names of the identities an identity matches (for tools).
    #[must_use]
    pub fn identity_matches(&self, name: &str, identity: &Identity) -> Option<bool> {
        self.identities
            .iter()
            .find(|s| s.name == name)
            .map(|s| Self::selector_matches(s, identity))
    }

    fn mode_for(&self, binding: &IdentityBinding) -> EffectiveMode {
        match binding.mode {
            Some(IdentityMode::Learn) => EffectiveMode::Learn,
            Some(IdentityMode::Shadow) => EffectiveMode::Shadow,
            Some(IdentityMode::Enforce) => EffectiveMode::Enforce,
            None => match self.file.mode {
                Mode::Enforce => EffectiveMode::Enforce,
                Mode::Shadow => EffectiveMode::Shadow,
            },
        }
    }

    fn resolution(
        &self,
        target: &TargetInfo,
        session: &SessionState,
        req: &DecisionRequest<'_>,
    ) -> Resolution {
        match target.dialect {
            Dialect::Postgres => {
                let schemas = session
                    .search_path
                    .clone()
                    .unwrap_or_else(|| vec![target.default_schema.clone()])
                    .into_iter()
                    .map(|s| match s.as_str() {
                        "$user" => req.db_user.to_owned(),
                        // Left by a widened search path: the default.
                        "" => target.default_schema.clone(),
                        _ => s,
                    })
                    .collect();
                Resolution {
                    dialect: Dialect::Postgres,
                    schemas,
                    unknown: session.search_path_unknown,
                }
            }
            Dialect::Mysql => Resolution {
                dialect: Dialect::Mysql,
                schemas: session
                    .database
                    .clone()
                    .or_else(|| (!req.database.is_empty()).then(|| req.database.to_owned()))
                    .map(|d| vec![d.to_lowercase()])
                    .unwrap_or_default(),
                unknown: false,
            },
        }
    }

    /// Whether `binding` was computed by this engine (after a reload the
    /// caller should rebind once rather than have every message rebound).
    #[must_use]
    pub fn is_current(&self, binding: &IdentityBinding) -> bool {
        binding.generation == self.generation
    }

    /// The request's binding, or a fresh one when it was computed by an
    /// older policy.
    fn current_binding<'a>(
        &self,
        req: &DecisionRequest<'a>,
    ) -> std::borrow::Cow<'a, IdentityBinding> {
        if self.is_current(req.binding) {
            std::borrow::Cow::Borrowed(req.binding)
        } else {
            std::borrow::Cow::Owned(self.bind_identity(req.identity))
        }
    }

    /// Decides one query message.
    pub fn decide(&self, req: &DecisionRequest<'_>, session: &mut SessionState) -> Verdict {
        let started = Instant::now();
        let binding = self.current_binding(req);
        let binding = &*binding;
        let mode = self.mode_for(binding);
        let Some(target) = self.targets.get(req.target) else {
            return self.unknown_target(req, mode, started);
        };
        let resolved = self.resolve(req, target, session);
        let session_ref = &*session;
        let cx = Self::context(req, target, binding, session_ref, &resolved);
        let mut statements = Vec::new();
        let mut details = Vec::new();
        let mut effects = Effects::default();
        CACHE.with(|c| {
            let Ok(mut cache) = c.try_borrow_mut() else {
                // Re-entered from inside a decision (cannot happen today):
                // decide without the cache rather than panic.
                let mut fresh = ThreadCache {
                    facts: TwoGen::new(16),
                    decisions: TwoGen::new(16),
                    scratch: Scratch::default(),
                    canonical: String::new(),
                    spans: Vec::new(),
                };
                self.decide_statements(
                    &cx,
                    session_ref,
                    &mut fresh,
                    &mut statements,
                    &mut details,
                    &mut effects,
                );
                return;
            };
            self.decide_statements(
                &cx,
                session_ref,
                &mut cache,
                &mut statements,
                &mut details,
                &mut effects,
            );
        });
        session.resolved = Some(resolved);
        let verdict = self.verdict(statements, details, mode, started);
        if !verdict.blocks() {
            for e in effects.list {
                apply_effect(session, e, effects.statements);
            }
        }
        verdict
    }

    /// The session's resolution for this request, taken out of the session
    /// (the caller puts it back): the last one when it still holds.
    fn resolve(
        &self,
        req: &DecisionRequest<'_>,
        target: &TargetInfo,
        session: &mut SessionState,
    ) -> Resolved {
        if let Some(r) = session.resolved.take()
            && r.holds_for(self.generation, req, session)
        {
            return r;
        }
        let resolution = self.resolution(target, session, req);
        let database = rules_database(target.dialect, session, req.database);
        Resolved {
            generation: self.generation,
            target: req.target.to_owned(),
            db_user: req.db_user.to_owned(),
            database: req.database.to_owned(),
            session_database: session.database.clone(),
            search_path: session.search_path.clone(),
            search_path_unknown: session.search_path_unknown,
            ctx_key: hash_of(&resolution),
            session_key: hash_of(&(req.db_user, database)),
            resolution,
        }
    }

    fn context<'a>(
        req: &'a DecisionRequest<'a>,
        target: &'a TargetInfo,
        binding: &'a IdentityBinding,
        session: &'a SessionState,
        r: &'a Resolved,
    ) -> Ctx<'a> {
        let database = rules_database(target.dialect, session, req.database);
        Ctx {
            req,
            target,
            binding,
            ctx_key: r.ctx_key,
            session_key: r.session_key,
            resolution: &r.resolution,
            database,
        }
    }

    fn decide_statements(
        &self,
        cx: &Ctx<'_>,
        session: &SessionState,
        cache: &mut ThreadCache,
        out: &mut Vec<StatementVerdict>,
        details: &mut Vec<StatementDetails>,
        effects: &mut Effects,
    ) {
        let sql = cx.req.sql;
        let mut spans = std::mem::take(&mut cache.spans);
        sql::split_into(sql, cx.target.dialect, &mut spans);
        for span in &spans {
            let text = span.text(sql);
            let (entry, limit) =
                self.statement_facts(text, span.mode, span.in_exec_comment, cx, cache);
            let mut entry = entry;
            let mut limit = limit;
            // EXECUTE: decided as the statement prepared under that name.
            if let Effect::Execute(name) = &entry.effect {
                let (e, l) = match session.prepared.get(name) {
                    Some(Prepared::Text(body)) => self.statement_facts(
                        body,
                        LexMode::default_for(cx.target.dialect),
                        false,
                        cx,
                        cache,
                    ),
                    Some(Prepared::Unknown) => (
                        synthetic_dynamic(
                            &format!("execute-unknown {name}"),
                            cx.target.dialect,
                            "prepared from a variable: statement text unknown",
                        ),
                        None,
                    ),
                    None => (
                        synthetic(
                            &format!("execute-missing {name}"),
                            cx.target.dialect,
                            &format!("EXECUTE of {name:?}, which this session did not prepare"),
                        ),
                        None,
                    ),
                };
                entry = e;
                limit = l;
            } else {
                effects.statements += 1;
                if !matches!(entry.effect, Effect::None) {
                    effects.list.push(entry.effect.clone());
                }
            }
            let eval = self.evaluate_cached(&entry, limit, cx, cache);
            out.push(StatementVerdict {
                text: text.to_owned(),
                kind: entry.facts.kind,
                tables: Arc::clone(&entry.facts.tables),
                fingerprint: Arc::clone(&entry.fingerprint_text),
                decision: eval.decision,
                rule: eval.rule.map(|i| Arc::clone(&self.rules[i].name)),
                reason: eval.reason,
                unparsed: entry.facts.unparsed,
                flags: entry.facts.flags,
            });
            details.push(StatementDetails {
                facts: entry.facts.clone(),
                limit: if entry.facts.limit_literal {
                    limit
                } else {
                    None
                },
            });
        }
        cache.spans = spans;
    }

    /// Facts of one statement, from the cache when its shape was seen in
    /// this context. Returns the literal LIMIT value too.
    fn statement_facts(
        &self,
        text: &str,
        mode: LexMode,
        in_exec_comment: bool,
        cx: &Ctx<'_>,
        cache: &mut ThreadCache,
    ) -> (Arc<FactsEntry>, Option<u64>) {
        let dialect = cx.target.dialect;
        if text.len() > self.limits.max_statement_bytes {
            let why = format!(
                "statement of {} bytes exceeds the {}-byte limit",
                text.len(),
                self.limits.max_statement_bytes
            );
            return (synthetic("oversize", dialect, &why), None);
        }
        let mut canonical = std::mem::take(&mut cache.canonical);
        let info = sql::normalize(
            text,
            mode,
            in_exec_comment,
            &mut canonical,
            &mut cache.scratch,
        );
        let key = FactsKey {
            shape: shape_hash(&canonical, dialect),
            ctx: cx.ctx_key,
            limits: self.limits_key,
        };
        let entry = match cache.facts.get(&key) {
            Some(e) if e.dialect == dialect && *e.canonical == *canonical => e,
            _ => {
                let e = Arc::new(analyse_entry(
                    &canonical,
                    &info,
                    Fingerprint::of(&canonical, dialect),
                    cx.resolution,
                    &self.limits,
                    dialect,
                ));
                cache.facts.insert(key, e.clone());
                e
            }
        };
        cache.canonical = canonical;
        (entry, info.limit)
    }

    fn evaluate_cached(
        &self,
        entry: &FactsEntry,
        limit: Option<u64>,
        cx: &Ctx<'_>,
        cache: &mut ThreadCache,
    ) -> Evaluation {
        let key = DecisionKey {
            generation: self.generation,
            binding: cx.binding.key,
            target: cx.target.index,
            session: cx.session_key,
            ctx: cx.ctx_key,
            shape: entry.fingerprint.key,
        };
        if let Some(e) = cache.decisions.get(&key)
            && !e.limit_sensitive
        {
            return e;
        }
        let e = self.evaluate(&entry.facts, entry.fingerprint.id, limit, cx);
        cache.decisions.insert(key, e.clone());
        e
    }

    fn rule_applies(&self, r: &CompiledRule, cx: &Ctx<'_>) -> bool {
        let dialect = cx.target.dialect;
        r.identities
            .as_ref()
            .is_none_or(|ids| ids.iter().any(|i| cx.binding.matched.contains(i)))
            && r.targets
                .as_ref()
                .is_none_or(|ts| ts.contains(&cx.target.index))
            && r.databases
                .as_ref()
                .is_none_or(|m| m.is_match(cx.database, dialect))
            && r.db_users
                .as_ref()
                .is_none_or(|m| m.is_match(cx.req.db_user, dialect))
    }

    /// Whether a rule's statement conditions hold, leaving out `max_limit`.
    ///
    /// When what a statement reads is partly unknown (`dynamic_sql`: SQL
    /// built at run time, a relation named by a value, whole schemas), so
    /// are the tables and functions it touches: a condition on them may
    /// hold, which is enough for a deny rule and never for an allow or
    /// approve rule (then the default applies).
    fn rule_matches(r: &CompiledRule, f: &StatementFacts, fp: u64, dialect: Dialect) -> bool {
        let unknown = f.tables_unknown;
        let deny = r.decision == Decision::Deny;
        r.kinds.is_none_or(|k| k & f.kind.bit() != 0)
            && r.tables.as_ref().is_none_or(|m| {
                (!unknown || deny) && f.tables.iter().all(|t| m.is_match(t, dialect))
            })
            && r.any_tables.as_ref().is_none_or(|m| {
                if unknown {
                    deny
                } else {
                    f.tables.iter().any(|t| m.is_match(t, dialect))
                }
            })
            && r.functions.as_ref().is_none_or(|m| {
                (!unknown || deny) && f.functions.iter().all(|t| m.is_match(t, dialect))
            })
            && r.any_functions.as_ref().is_none_or(|m| {
                if unknown {
                    deny
                } else {
                    f.functions.iter().any(|t| m.is_match(t, dialect))
                }
            })
            && r.where_clause.is_none_or(|w| match w {
                WherePresence::Absent => f.has_where == Some(false),
                WherePresence::Present => f.has_where == Some(true),
            })
            && r.flags.is_none_or(|fl| fl.intersects(f.flags))
            && r.fingerprints.as_ref().is_none_or(|set| set.contains(&fp))
    }

    fn evaluate(
        &self,
        f: &StatementFacts,
        fp: u64,
        limit: Option<u64>,
        cx: &Ctx<'_>,
    ) -> Evaluation {
        let dialect = cx.target.dialect;
        let mut best: Option<(Decision, usize)> = None;
        let mut limit_sensitive = false;
        for (i, r) in self.rules.iter().enumerate() {
            // An unparsed statement's facts are a guess: only rules that
            // deny or hold can use them.
            if f.unparsed && r.decision == Decision::Allow {
                continue;
            }
            if !self.rule_applies(r, cx) || !Self::rule_matches(r, f, fp, dialect) {
                continue;
            }
            if let Some(max) = r.max_limit {
                limit_sensitive = true;
                let ok = f.limit_literal && limit.is_some_and(|l| l <= max);
                if !ok {
                    continue;
                }
            }
            if best.is_none_or(|(d, _)| r.decision > d) {
                best = Some((r.decision, i));
            }
        }
        let on_parse_error = self.file.on_parse_error;
        let (decision, rule) = match best {
            Some((d, i)) if !f.unparsed || d >= on_parse_error => (d, Some(i)),
            _ if f.unparsed => (on_parse_error, None),
            Some((d, i)) => (d, Some(i)),
            None => (self.file.default, None),
        };
        let reason = match rule {
            Some(i) => rule_reason(&self.rules[i], f),
            None if f.unparsed => format!(
                "statement could not be parsed ({}); the policy's on_parse_error is {on_parse_error}",
                f.parse_error.as_deref().unwrap_or("unknown error")
            ),
            None if decision == Decision::Allow => {
                "no rule matched this statement; the policy's default is allow".to_owned()
            }
            None => format!("no rule allowed this statement; the policy's default is {decision}"),
        };
        Evaluation {
            decision,
            rule,
            reason: reason.into(),
            limit_sensitive,
        }
    }

    fn verdict(
        &self,
        statements: Vec<StatementVerdict>,
        details: Vec<StatementDetails>,
        mode: EffectiveMode,
        started: Instant,
    ) -> Verdict {
        let worst = statements
            .iter()
            .enumerate()
            .max_by(|(ia, a), (ib, b)| a.decision.cmp(&b.decision).then(ib.cmp(ia)))
            .map(|(i, _)| i);
        let (decision, rule, reason, approval) = match worst {
            Some(i) => {
                let s = &statements[i];
                let reason = if statements.len() > 1 {
                    format!("statement {} of {}: {}", i + 1, statements.len(), s.reason).into()
                } else {
                    Arc::clone(&s.reason)
                };
                let approval = match (&s.rule, s.decision) {
                    (Some(name), Decision::Approve) => self
                        .rules
                        .iter()
                        .find(|r| &r.name == name)
                        .and_then(|r| r.approval.clone())
                        .or_else(|| Some(Arc::new(default_approval()))),
                    (None, Decision::Approve) => Some(Arc::new(default_approval())),
                    _ => None,
                };
                (s.decision, s.rule.clone(), reason, approval)
            }
            None => (Decision::Allow, None, "empty query".into(), None),
        };
        Verdict {
            decision,
            enforced: mode == EffectiveMode::Enforce,
            mode,
            rule,
            reason,
            statements,
            eval_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            approval,
            details,
        }
    }

    fn unknown_target(
        &self,
        req: &DecisionRequest<'_>,
        mode: EffectiveMode,
        started: Instant,
    ) -> Verdict {
        let reason = format!("target {:?} is not in the policy", req.target);
        let facts = Arc::new(StatementFacts {
            kind: Kind::Other,
            tables: Arc::from([]),
            tables_written: Vec::new(),
            functions: Vec::new(),
            flags: FlagSet::default(),
            has_where: None,
            limit_literal: false,
            unparsed: true,
            parse_error: Some(reason.clone()),
            procedural: false,
            tables_unknown: false,
            hidden: Vec::new(),
        });
        let st = StatementVerdict {
            text: req.sql.trim().to_owned(),
            kind: Kind::Other,
            tables: Arc::from([]),
            fingerprint: Arc::from(""),
            decision: Decision::Deny,
            rule: None,
            reason: reason.as_str().into(),
            unparsed: true,
            flags: FlagSet::default(),
        };
        let d = StatementDetails { facts, limit: None };
        let mut v = self.verdict(vec![st], vec![d], mode, started);
        v.reason = reason.into();
        v
    }

    /// Decides a PostgreSQL FunctionCall message (a call by function OID,
    /// named by the caller as well as it can).
    pub fn decide_function_call(
        &self,
        req: &DecisionRequest<'_>,
        function: &str,
        session: &mut SessionState,
    ) -> Verdict {
        let started = Instant::now();
        let binding = self.current_binding(req);
        let binding = &*binding;
        let mode = self.mode_for(binding);
        let Some(target) = self.targets.get(req.target) else {
            return self.unknown_target(req, mode, started);
        };
        let resolved = self.resolve(req, target, session);
        let cx = Self::context(req, target, binding, session, &resolved);
        let name = function
            .strip_prefix("pg_catalog.")
            .unwrap_or(function)
            .to_lowercase();
        let fp = Fingerprint::of(&format!("function-call {name}"), target.dialect);
        // Arguments of a FunctionCall are values the agent does not read:
        // a function that runs SQL text or reads a named relation reads
        // something unknown.
        let hidden = sql::hidden::opaque_call(target.dialect, &name);
        let mut flags = sql::function_flags(&name);
        if hidden.is_some() {
            flags.insert(Flag::DynamicSql);
        }
        let facts = Arc::new(StatementFacts {
            kind: Kind::Call,
            tables: Arc::from([]),
            tables_written: Vec::new(),
            functions: vec![name.clone()],
            flags,
            has_where: None,
            limit_literal: false,
            unparsed: false,
            parse_error: None,
            procedural: false,
            tables_unknown: hidden.is_some(),
            hidden: hidden.into_iter().collect(),
        });
        let eval = self.evaluate(&facts, fp.id, None, &cx);
        session.resolved = Some(resolved);
        let st = StatementVerdict {
            text: format!("FunctionCall {function}"),
            kind: Kind::Call,
            tables: Arc::from([]),
            fingerprint: fp.to_string().into(),
            decision: eval.decision,
            rule: eval.rule.map(|i| self.rules[i].name.clone()),
            reason: eval.reason,
            unparsed: false,
            flags: facts.flags,
        };
        let d = StatementDetails { facts, limit: None };
        self.verdict(vec![st], vec![d], mode, started)
    }
}

fn default_approval() -> ApprovalSpec {
    ApprovalSpec {
        approvers: Vec::new(),
        required: None,
        timeout: None,
        on_timeout: None,
        escalate_to: None,
        escalation_timeout: None,
        notify: None,
    }
}

fn describe(f: &StatementFacts) -> String {
    let mut s = f.kind.to_string();
    if !f.tables.is_empty() {
        s.push_str(" on ");
        let shown: Vec<&str> = f.tables.iter().take(3).map(String::as_str).collect();
        s.push_str(&shown.join(", "));
        if f.tables.len() > 3 {
            s.push_str(&format!(" and {} more", f.tables.len() - 3));
        }
    }
    if f.tables_unknown {
        s.push_str(if f.tables.is_empty() {
            " on unknown tables"
        } else {
            " and unknown tables"
        });
    }
    let flags: Vec<&str> = f.flags.iter().map(Flag::as_str).collect();
    if !flags.is_empty() {
        s.push_str(&format!(" ({})", flags.join(", ")));
    }
    s
}

fn rule_reason(r: &CompiledRule, f: &StatementFacts) -> String {
    let verb = match r.decision {
        Decision::Allow => "allows",
        Decision::Deny => "denies",
        Decision::Approve => "requires approval for",
    };
    let mut s = format!("rule {:?} {verb} {}", r.name, describe(f));
    if let Some(m) = &r.message {
        s.push_str(": ");
        s.push_str(m);
    }
    s
}

/// Facts for statements that are not text we can analyse.
fn synthetic(tag: &str, dialect: Dialect, why: &str) -> Arc<FactsEntry> {
    synthetic_with(tag, dialect, why, false)
}

/// [`synthetic`] for a statement whose text is built at run time
/// (`EXECUTE` of `PREPARE ... FROM @var`): `dynamic_sql`, tables unknown.
fn synthetic_dynamic(tag: &str, dialect: Dialect, why: &str) -> Arc<FactsEntry> {
    synthetic_with(tag, dialect, why, true)
}

fn synthetic_with(tag: &str, dialect: Dialect, why: &str, dynamic: bool) -> Arc<FactsEntry> {
    let fingerprint = Fingerprint::of(tag, dialect);
    let mut flags = FlagSet::default();
    if dynamic {
        flags.insert(Flag::DynamicSql);
    }
    Arc::new(FactsEntry {
        canonical: tag.into(),
        dialect,
        facts: Arc::new(StatementFacts {
            kind: Kind::Other,
            tables: Arc::from([]),
            tables_written: Vec::new(),
            functions: Vec::new(),
            flags,
            has_where: None,
            limit_literal: false,
            unparsed: true,
            parse_error: Some(why.to_owned()),
            procedural: false,
            tables_unknown: dynamic,
            hidden: Vec::new(),
        }),
        fingerprint_text: fingerprint.to_string().into(),
        fingerprint,
        effect: Effect::None,
    })
}

fn analyse_entry(
    canonical: &str,
    info: &NormInfo,
    fp: Fingerprint,
    resolution: &Resolution,
    limits: &Limits,
    dialect: Dialect,
) -> FactsEntry {
    let a: Analysis = sql::analyze(canonical, info, dialect, limits);
    let facts = a.resolve(resolution);
    FactsEntry {
        canonical: canonical.into(),
        dialect,
        facts: Arc::new(facts),
        fingerprint_text: fp.to_string().into(),
        fingerprint: fp,
        effect: a.effect,
    }
}

fn union_path(session: &mut SessionState, add: Vec<String>) {
    let mut cur = session.search_path.clone().unwrap_or_default();
    if session.search_path.is_none() {
        // The target default stays possible.
        cur.push(String::new());
    }
    for s in add {
        if !cur.contains(&s) {
            cur.push(s);
        }
    }
    session.search_path = Some(cur);
}

fn apply_effect(session: &mut SessionState, effect: Effect, statements_in_message: usize) {
    // A setting is certain only when it is the message's only statement
    // and outside an explicit transaction; otherwise a later error or a
    // ROLLBACK may undo it, so resolution widens instead.
    let certain = statements_in_message == 1 && !session.in_transaction;
    match effect {
        Effect::None | Effect::Execute(_) => {}
        Effect::Use(db) => session.database = Some(db),
        Effect::SearchPath(SearchPathChange::Set { schemas, local }) => {
            if certain && !local {
                session.search_path = Some(schemas);
            } else {
                union_path(session, schemas);
            }
        }
        Effect::SearchPath(SearchPathChange::Reset) => {
            if certain {
                session.search_path = None;
                session.search_path_unknown = false;
            } else {
                union_path(session, Vec::new());
            }
        }
        Effect::SearchPath(SearchPathChange::Unknown) => session.search_path_unknown = true,
        Effect::Prepare { name, body } => {
            let p = match body {
                PreparedBody::Text(t) => Prepared::Text(t),
                PreparedBody::Unknown => Prepared::Unknown,
            };
            session.prepared.insert(name, p);
        }
        Effect::Deallocate(Some(name)) => {
            session.prepared.remove(&name);
        }
        Effect::Deallocate(None) => session.prepared.clear(),
        Effect::DiscardAll => {
            session.prepared.clear();
            if certain {
                session.search_path = None;
                session.search_path_unknown = false;
            }
        }
        Effect::Begin => session.in_transaction = true,
        Effect::End => session.in_transaction = false,
    }
}

impl SessionState {
    /// Forgets SQL-level state (on a protocol-level reset such as
    /// `COM_RESET_CONNECTION`).
    pub fn reset(&mut self) {
        *self = Self {
            database: self.database.take(),
            ..Self::default()
        };
    }
}
