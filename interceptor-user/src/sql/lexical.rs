//! Lexical facts, read from the canonical token stream: flags from
//! function names and keyword sequences (for every statement, so flags
//! never depend on sqlparser understanding a construct), the statements
//! handled whole without a parser (SET, USE, EXECUTE, FETCH, ...) and the
//! conservative classification of statements sqlparser cannot parse.

use super::{
    Dialect, Flag, FlagSet, Kind,
    analyze::{Effect, PreparedBody, SearchPathChange},
    lexer::{LexMode, Lexer, TokKind},
    names::{RawName, fold},
};

#[derive(Clone, Copy, Debug)]
pub(crate) struct T<'a> {
    pub kind: TokKind,
    pub text: &'a str,
}

pub(crate) fn tokens(canonical: &str, dialect: Dialect) -> Vec<T<'_>> {
    Lexer::new(canonical, LexMode::default_for(dialect))
        .map(|t| T {
            kind: t.kind,
            text: canonical.get(t.start..t.end).unwrap_or(""),
        })
        .collect()
}

/// What the lexical pass learns.
#[derive(Debug, Default)]
pub(crate) struct LexFacts {
    pub kind: Kind,
    /// Handled completely here: no parser needed.
    pub simple: bool,
    pub flags: FlagSet,
    pub functions: Vec<String>,
    /// Best-effort tables, for statements the parser cannot read.
    pub tables: Vec<(RawName, bool)>,
    pub effect: Effect,
    pub procedural: bool,
}

pub(crate) fn word<'a>(t: &[T<'a>], i: usize) -> &'a str {
    match t.get(i) {
        Some(T {
            kind: TokKind::Word,
            text,
        }) => text,
        _ => "",
    }
}

/// Unquotes an identifier token (word, `"x"`, `` `x` ``) with folding.
pub(crate) fn ident(t: &T<'_>, dialect: Dialect) -> Option<String> {
    match t.kind {
        TokKind::Word => Some(fold(t.text, false, dialect)),
        TokKind::QuotedIdent => {
            let q = t.text.chars().next()?;
            let inner = t.text.get(1..t.text.len().saturating_sub(1))?;
            let doubled: String = [q, q].iter().collect();
            Some(fold(
                &inner.replace(&doubled, &q.to_string()),
                true,
                dialect,
            ))
        }
        _ => None,
    }
}

/// The value of a string literal token (any prefix, either quote, MySQL
/// backslash escapes when `backslash`).
pub(crate) fn unquote_string(text: &str, backslash: bool) -> Option<String> {
    let start = text.find(['\'', '"'])?;
    let q = text[start..].chars().next()?;
    let body = text.get(start + 1..text.len().checked_sub(1)?)?;
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && backslash {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('0') => out.push('\0'),
                Some('Z') => out.push('\x1a'),
                Some(o) => out.push(o),
                None => {}
            }
        } else if c == q && chars.peek() == Some(&q) {
            chars.next();
            out.push(q);
        } else {
            out.push(c);
        }
    }
    Some(out)
}

const FILE_FUNCTIONS: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_logicalmapdir",
    "pg_ls_replslotdir",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
    "pg_logdir_ls",
    "lo_import",
    "lo_export",
    "load_file",
];

const ADMIN_FUNCTIONS: &[&str] = &[
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_signal_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_switch_xlog",
    "pg_create_restore_point",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_replication_slot_advance",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    "pg_log_backend_memory_contexts",
    "pg_import_system_collations",
];

/// Flags implied by calling a function (name without `pg_catalog.`).
#[must_use]
pub fn function_flags(name: &str) -> FlagSet {
    let mut f = FlagSet::default();
    let base = name.rsplit('.').next().unwrap_or(name);
    if FILE_FUNCTIONS.contains(&base) {
        f.insert(Flag::FileAccess);
    }
    if ADMIN_FUNCTIONS.contains(&base)
        || base.starts_with("pg_replication_origin_")
        || base.starts_with("pg_stat_reset")
    {
        f.insert(Flag::Admin);
    }
    if base.starts_with("dblink") || base.starts_with("postgres_fdw_") {
        f.insert(Flag::RemoteAccess);
    }
    if base.starts_with("pg_advisory_")
        || base.starts_with("pg_try_advisory_")
        || base == "get_lock"
    {
        f.insert(Flag::Lock);
    }
    if base == "set_config" {
        f.insert(Flag::SessionChange);
    }
    f
}

/// Settings whose change cannot widen access or change how later text is
/// read; any other SET is a `session_change`.
const HARMLESS_SETTINGS: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "timezone",
    "time",
    "time_zone",
    "extra_float_digits",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "client_min_messages",
    "bytea_output",
    "names",
    "character_set_client",
    "character_set_results",
    "character_set_connection",
    "collation_connection",
    "autocommit",
    "sql_safe_updates",
    "max_execution_time",
    "net_read_timeout",
    "net_write_timeout",
    "wait_timeout",
    "interactive_timeout",
    "session_track_schema",
    "session_track_state_change",
    "session_track_system_variables",
    "session_track_transaction_info",
    "transaction_isolation",
    "tx_isolation",
    "transaction_read_only",
    "tx_read_only",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "work_mem",
    "maintenance_work_mem",
    "jit",
    "lc_messages",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "synchronous_commit",
    "lock_wait_timeout",
    "innodb_lock_wait_timeout",
    "group_concat_max_len",
    "sql_select_limit",
    "div_precision_increment",
    "cte_max_recursion_depth",
    "xml",
];

fn classify_setting(name: &str, scope: &str, facts: &mut LexFacts) {
    if matches!(scope, "global" | "persist" | "persist_only") {
        facts.flags.insert(Flag::Admin);
    }
    if name.starts_with('@') {
        // MySQL user variable: the client's own scratch space.
        return;
    }
    match name {
        "role" | "session_authorization" => facts.flags.insert(Flag::RoleChange),
        n if HARMLESS_SETTINGS.contains(&n) || n.starts_with("enable_") => {}
        _ => facts.flags.insert(Flag::SessionChange),
    }
}

/// Schemas of a `search_path` value list.
fn search_path_values(vals: &[T<'_>], dialect: Dialect) -> SearchPathChange {
    let mut out = Vec::new();
    for v in vals {
        match v.kind {
            TokKind::Comma => {}
            TokKind::Word if v.text == "default" => return SearchPathChange::Reset,
            TokKind::Word | TokKind::QuotedIdent => match ident(v, dialect) {
                Some(s) => out.push(s),
                None => return SearchPathChange::Unknown,
            },
            TokKind::Str => {
                let Some(s) = unquote_string(v.text, false) else {
                    return SearchPathChange::Unknown;
                };
                for part in s.split(',') {
                    let p = part.trim();
                    if p.is_empty() {
                        continue;
                    }
                    if let Some(q) = p.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
                        out.push(q.replace("\"\"", "\""));
                    } else {
                        out.push(p.to_lowercase());
                    }
                }
            }
            _ => return SearchPathChange::Unknown,
        }
    }
    SearchPathChange::Set {
        schemas: out,
        local: false,
    }
}

pub(crate) fn set_statement(t: &[T<'_>], dialect: Dialect, f: &mut LexFacts) {
    f.kind = Kind::Session;
    let w = |i| word(t, i);
    match (w(1), w(2), w(3)) {
        ("transaction" | "constraints", _, _)
        | ("session" | "local", "characteristics" | "transaction", _) => {
            f.kind = Kind::Tcl;
            return;
        }
        ("global" | "persist" | "persist_only", "transaction", _) => {
            f.kind = Kind::Tcl;
            f.flags.insert(Flag::Admin);
            return;
        }
        ("names" | "charset", _, _) | ("character", "set", _) => return,
        ("role", _, _)
        | ("session" | "local", "role", _)
        | ("session", "authorization", _)
        | ("session" | "local", "session", "authorization") => {
            f.flags.insert(Flag::RoleChange);
            return;
        }
        ("password", _, _) => {
            f.kind = Kind::Dcl;
            return;
        }
        ("default", "role", _) => {
            f.kind = Kind::Dcl;
            f.flags.insert(Flag::RoleChange);
            return;
        }
        _ => {}
    }
    let mut i = 1;
    loop {
        let mut scope = "";
        if matches!(
            w(i),
            "session" | "local" | "global" | "persist" | "persist_only"
        ) {
            scope = w(i);
            i += 1;
        }
        let Some(tok) = t.get(i) else { return };
        // The setting's name: a variable, or words joined by dots.
        let mut name = String::new();
        if tok.kind == TokKind::Var {
            let v = tok.text.to_lowercase();
            if let Some(sys) = v.strip_prefix("@@") {
                let (sc, n) = match sys.split_once('.') {
                    Some((sc, n)) => (sc.to_owned(), n.to_owned()),
                    None => (String::new(), sys.to_owned()),
                };
                if !sc.is_empty() {
                    scope = match sc.as_str() {
                        "global" => "global",
                        "persist" => "persist",
                        "persist_only" => "persist_only",
                        _ => "session",
                    };
                }
                name = n;
            } else {
                name = v;
            }
            i += 1;
        } else {
            // word(.word)*
            while let Some(tk) = t.get(i) {
                if !matches!(tk.kind, TokKind::Word | TokKind::QuotedIdent) {
                    break;
                }
                name.push_str(&tk.text.to_lowercase());
                i += 1;
                if t.get(i).is_some_and(|d| d.kind == TokKind::Dot) {
                    name.push('.');
                    i += 1;
                } else {
                    break;
                }
            }
        }
        // `=`, `:=` or TO.
        if t.get(i)
            .is_some_and(|x| x.kind == TokKind::Op || (x.kind == TokKind::Word && x.text == "to"))
        {
            i += 1;
        }
        let start = i;
        let mut depth = 0i32;
        while let Some(tk) = t.get(i) {
            match tk.kind {
                TokKind::LParen | TokKind::LBracket => depth += 1,
                TokKind::RParen | TokKind::RBracket => depth -= 1,
                TokKind::Comma if depth <= 0 && dialect == Dialect::Mysql => break,
                _ => {}
            }
            i += 1;
        }
        let values = &t[start..i.min(t.len())];
        if name == "search_path" {
            let mut change = search_path_values(values, dialect);
            if let SearchPathChange::Set { local, .. } = &mut change {
                *local = scope == "local";
            }
            f.effect = Effect::SearchPath(change);
        }
        classify_setting(&name, scope, f);
        if t.get(i).is_some_and(|x| x.kind == TokKind::Comma) {
            i += 1;
            continue;
        }
        return;
    }
}

pub(crate) fn name_at(t: &[T<'_>], mut i: usize, dialect: Dialect) -> Option<(RawName, usize)> {
    let mut parts = Vec::new();
    loop {
        let tok = t.get(i)?;
        if !matches!(tok.kind, TokKind::Word | TokKind::QuotedIdent) {
            break;
        }
        parts.push(super::names::NamePart(ident(tok, dialect)?));
        i += 1;
        if t.get(i).is_some_and(|x| x.kind == TokKind::Dot) {
            i += 1;
        } else {
            break;
        }
    }
    if parts.is_empty() || t.get(i).is_some_and(|x| x.kind == TokKind::LParen) {
        return None;
    }
    Some((RawName(parts), i))
}

const NOT_TABLE_WORDS: &[&str] = &[
    "select",
    "lateral",
    "only",
    "if",
    "exists",
    "not",
    "table",
    "ignore",
    "low_priority",
    "delayed",
    "high_priority",
    "quick",
    "stdin",
    "stdout",
    "where",
    "set",
    "values",
    "default",
];

/// Names after FROM / JOIN / INTO / UPDATE / TABLE: a best effort for
/// statements the parser could not read, so deny rules naming tables still
/// see them.
pub(crate) fn lexical_tables(t: &[T<'_>], dialect: Dialect, out: &mut Vec<(RawName, bool)>) {
    let first = word(t, 0);
    for i in 0..t.len() {
        let w = word(t, i);
        let written = match w {
            "from" | "join" | "using" => first == "delete" && w == "from",
            "into" | "update" | "truncate" => true,
            "table" if matches!(first, "create" | "alter" | "drop" | "truncate" | "lock") => true,
            // `TABLE name`: a read (alone, in parentheses, after UNION).
            "table"
                if i == 0
                    || t[i - 1].kind == TokKind::LParen
                    || matches!(
                        word(t, i - 1),
                        "union" | "except" | "intersect" | "all" | "distinct"
                    )
                    || (first == "insert" && word(t, i - 1) != "into") =>
            {
                false
            }
            _ => continue,
        };
        let mut j = i + 1;
        while NOT_TABLE_WORDS.contains(&word(t, j))
            && !word(t, j).is_empty()
            && word(t, j) != "select"
        {
            j += 1;
        }
        if let Some((n, _)) = name_at(t, j, dialect)
            && !NOT_TABLE_WORDS.contains(&n.last())
        {
            out.push((n, written));
        }
    }
}

/// Kind of a statement from its leading words, for statements no parser
/// read; conservative (a WITH or SELECT mentioning DELETE is a delete).
pub(crate) fn lexical_kind(t: &[T<'_>]) -> Kind {
    let w = |i| word(t, i);
    let mut k = match (w(0), w(1)) {
        (
            "select" | "values" | "table" | "with" | "handler" | "fetch" | "move" | "close"
            | "declare",
            _,
        ) => Kind::Select,
        ("", _) if t.first().is_some_and(|x| x.kind == TokKind::LParen) => Kind::Select,
        ("insert", _) => Kind::Insert,
        ("replace", _) => Kind::Delete,
        ("load", "data" | "xml") => Kind::Insert,
        ("update", _) => Kind::Update,
        ("delete", _) => Kind::Delete,
        ("merge", _) => Kind::Merge,
        ("truncate", _) => Kind::Truncate,
        ("create" | "alter" | "drop", "role" | "user" | "group")
        | ("grant" | "revoke" | "deny", _) => Kind::Dcl,
        ("alter", "default") => Kind::Dcl,
        (
            "create" | "alter" | "drop" | "comment" | "rename" | "security" | "import" | "refresh"
            | "reindex" | "cluster",
            _,
        ) => Kind::Ddl,
        ("start", "slave" | "replica" | "group_replication") => Kind::Other,
        (
            "begin" | "start" | "commit" | "rollback" | "savepoint" | "release" | "end" | "abort"
            | "xa" | "prepare",
            "transaction",
        )
        | (
            "begin" | "start" | "commit" | "rollback" | "savepoint" | "release" | "end" | "abort"
            | "xa",
            _,
        ) => Kind::Tcl,
        ("set" | "reset" | "discard" | "deallocate" | "use" | "listen" | "unlisten", _) => {
            Kind::Session
        }
        ("copy", _) => Kind::Copy,
        ("call" | "do", _) => Kind::Call,
        ("explain" | "describe" | "desc", _) => Kind::Explain,
        _ => Kind::Other,
    };
    if matches!(k, Kind::Select | Kind::Insert | Kind::Update) {
        // Data-modifying words anywhere raise the kind (not FOR UPDATE).
        for i in 1..t.len() {
            let cand = match w(i) {
                "insert" => Kind::Insert,
                "update" if !matches!(w(i - 1), "for" | "key") => Kind::Update,
                "delete" if w(i - 1) != "on" => Kind::Delete,
                "merge" => Kind::Merge,
                _ => continue,
            };
            if cand.power() > k.power() {
                k = cand;
            }
        }
    }
    k
}

/// The lexical pass over a statement's canonical text.
pub(crate) fn scan(t: &[T<'_>], dialect: Dialect) -> LexFacts {
    let mut f = LexFacts {
        kind: lexical_kind(t),
        ..LexFacts::default()
    };
    let w = |i| word(t, i);
    // Function calls: a name right before `(`.
    for i in 0..t.len() {
        if !t.get(i + 1).is_some_and(|x| x.kind == TokKind::LParen) {
            continue;
        }
        let Some(mut name) = t.get(i).and_then(|x| ident(x, dialect)) else {
            continue;
        };
        if t[i].kind == TokKind::Word && is_keyword_before_paren(t[i].text) {
            continue;
        }
        if i >= 2
            && t[i - 1].kind == TokKind::Dot
            && let Some(q) = ident(&t[i - 2], dialect)
            && q != "pg_catalog"
        {
            name = format!("{q}.{name}");
        }
        let ff = function_flags(&name);
        if name.rsplit('.').next() == Some("set_config") {
            set_config_call(t, i + 2, dialect, &mut f);
        }
        f.flags = f.flags.union(ff);
        if !f.functions.contains(&name) {
            f.functions.push(name);
        }
    }
    // Keyword sequences.
    for i in 0..t.len() {
        match w(i) {
            "into" if matches!(w(i + 1), "outfile" | "dumpfile") => {
                f.flags.insert(Flag::FileAccess)
            }
            // MySQL `CREATE TABLE ... DATA DIRECTORY = '/path'` (or INDEX
            // DIRECTORY): the server writes the table's files where the
            // statement says.
            "directory"
                if dialect == Dialect::Mysql
                    && i > 0
                    && matches!(w(i - 1), "data" | "index")
                    && matches!(w(0), "create" | "alter") =>
            {
                f.flags.insert(Flag::FileAccess);
            }
            "engine" if w(i + 1) == "federated" || w(i + 2) == "federated" => {
                f.flags.insert(Flag::RemoteAccess);
            }
            "connection" if matches!(w(0), "create" | "alter") => {
                f.flags.insert(Flag::RemoteAccess)
            }
            _ => {}
        }
    }
    match (w(0), w(1), w(2)) {
        ("load", "data" | "xml", _) => {
            f.flags.insert(Flag::FileAccess);
            if let Some(i) = (0..t.len()).find(|i| w(*i) == "into" && w(i + 1) == "table")
                && let Some((n, _)) = name_at(t, i + 2, dialect)
            {
                f.tables.push((n, true));
            }
            f.simple = true;
        }
        ("load", _, _) => {
            // PostgreSQL LOAD 'library': runs a shared object's code.
            f.flags.insert(Flag::FileAccess);
            f.flags.insert(Flag::Admin);
        }
        ("copy", _, _) => {
            for i in 1..t.len() {
                if w(i) == "program" {
                    f.flags.insert(Flag::ProgramExec);
                }
                if matches!(w(i), "from" | "to")
                    && t.get(i + 1).is_some_and(|x| x.kind == TokKind::Str)
                {
                    f.flags.insert(Flag::FileAccess);
                }
            }
        }
        ("alter", "system", _) => {
            f.kind = Kind::Ddl;
            f.flags.insert(Flag::Admin);
            f.simple = true;
        }
        (
            "kill" | "shutdown" | "checkpoint" | "restart" | "install" | "uninstall" | "purge",
            _,
            _,
        )
        | ("change", "master" | "replication", _)
        | ("start" | "stop", "slave" | "replica" | "group_replication", _)
        | ("reset", "master" | "slave" | "replica" | "persist" | "binary", _) => {
            f.kind = Kind::Other;
            f.flags.insert(Flag::Admin);
            f.simple = !matches!(w(0), "kill");
        }
        ("flush", _, _) => {
            f.flags.insert(Flag::Admin);
        }
        ("create" | "alter" | "drop", "server", _)
        | ("create" | "alter" | "drop", "foreign", _)
        | ("create" | "alter" | "drop", "user", "mapping")
        | ("import", "foreign", _) => {
            f.kind = Kind::Ddl;
            f.flags.insert(Flag::RemoteAccess);
        }
        _ => {}
    }
    if w(0) == "create" && w(1) == "extension" {
        f.flags.insert(Flag::Admin);
        let ext = t
            .get(2 + usize::from(w(2) == "if") * 3)
            .and_then(|x| ident(x, dialect));
        if let Some(e) = ext {
            if e == "dblink" || e.ends_with("_fdw") {
                f.flags.insert(Flag::RemoteAccess);
            }
            if e == "adminpack" || e == "file_fdw" {
                f.flags.insert(Flag::FileAccess);
            }
        }
    }
    // Procedural code.
    let proc_words = ["function", "procedure", "trigger", "event"];
    if matches!(w(0), "create" | "alter") && (1..6).any(|i| proc_words.contains(&w(i))) {
        f.procedural = true;
    }
    // MariaDB statements read whole, or pieces of a stored program's body.
    let classified = dialect == Dialect::Mysql && super::mysql_forms::classify(t, &mut f);
    // Statements read whole, without a parser.
    match w(0) {
        _ if classified => {}
        "set" if !has_subquery(t) => {
            set_statement(t, dialect, &mut f);
            f.simple = true;
        }
        "set" => set_statement(t, dialect, &mut f),
        "reset" => {
            f.simple = true;
            match (w(1), w(2)) {
                ("all", _) | ("search_path", _) => {
                    f.effect = Effect::SearchPath(SearchPathChange::Reset)
                }
                ("role", _) | ("session", "authorization") => f.flags.insert(Flag::RoleChange),
                _ => {}
            }
        }
        "discard" => {
            f.simple = true;
            if w(1) == "all" {
                f.effect = Effect::DiscardAll;
            }
        }
        "deallocate" | "drop"
            if w(0) == "deallocate" || (w(1) == "prepare" && dialect == Dialect::Mysql) =>
        {
            f.simple = true;
            f.kind = Kind::Session;
            let i = if w(1) == "prepare" { 2 } else { 1 };
            f.effect = match t.get(i) {
                Some(x) if x.kind == TokKind::Word && x.text == "all" => Effect::Deallocate(None),
                Some(x) => ident(x, dialect).map_or(Effect::None, |n| Effect::Deallocate(Some(n))),
                None => Effect::None,
            };
        }
        "use" => {
            f.simple = true;
            f.flags.insert(Flag::SessionChange);
            if let Some(db) = t.get(1).and_then(|x| ident(x, dialect)) {
                f.effect = Effect::Use(db);
            }
        }
        "execute" => {
            f.simple = true;
            f.kind = Kind::Other;
            if let Some(n) = t.get(1).and_then(|x| ident(x, dialect)) {
                f.effect = Effect::Execute(n);
            }
        }
        "prepare" if dialect == Dialect::Mysql => {
            f.simple = true;
            let name = t.get(1).and_then(|x| ident(x, dialect));
            let body = match (w(2), t.get(3)) {
                ("from", Some(x)) if x.kind == TokKind::Str => {
                    unquote_string(x.text, true).map_or(PreparedBody::Unknown, PreparedBody::Text)
                }
                _ => PreparedBody::Unknown,
            };
            if let Some(name) = name {
                f.effect = Effect::Prepare { name, body };
            }
        }
        "listen" | "unlisten" | "show" | "notify" | "checkpoint" | "begin" | "commit"
        | "rollback" | "savepoint" | "release" | "end" | "abort" | "move" | "close" | "fetch"
        | "handler" | "shutdown" | "do" | "xa" => {
            f.simple = !has_subquery(t);
            match (w(0), w(1), w(2)) {
                ("begin", _, _) => f.effect = Effect::Begin,
                ("commit" | "end" | "abort", w1, _) if w1 != "prepared" => f.effect = Effect::End,
                ("rollback", w1, w2) if w1 != "prepared" && w1 != "to" && w2 != "to" => {
                    f.effect = Effect::End
                }
                _ => {}
            }
            if w(0) == "do" {
                f.procedural = true;
            }
            if w(0) == "handler"
                && let Some((n, _)) = name_at(t, 1, dialect)
            {
                f.tables.push((n, false));
            }
        }
        "start" if w(1) == "transaction" => {
            f.simple = true;
            f.effect = Effect::Begin;
        }
        _ => {}
    }
    if !f.simple {
        lexical_tables(t, dialect, &mut f.tables);
    }
    f
}

fn has_subquery(t: &[T<'_>]) -> bool {
    t.iter().any(|x| {
        x.kind == TokKind::Word && matches!(x.text, "select" | "from" | "table" | "values")
    })
}

/// `set_config('name', 'value', is_local)`: literals after `set_config` are
/// kept in the canonical text, so the setting can be read here.
fn set_config_call(t: &[T<'_>], i: usize, dialect: Dialect, f: &mut LexFacts) {
    let name = t
        .get(i)
        .filter(|x| x.kind == TokKind::Str)
        .and_then(|x| unquote_string(x.text, dialect == Dialect::Mysql))
        .map(|s| s.to_lowercase());
    match name.as_deref() {
        Some("search_path") => {
            let value = t.get(i + 2).filter(|x| {
                x.kind == TokKind::Str && t.get(i + 1).is_some_and(|c| c.kind == TokKind::Comma)
            });
            f.effect = Effect::SearchPath(match value {
                Some(v) => search_path_values(std::slice::from_ref(v), dialect),
                None => SearchPathChange::Unknown,
            });
            f.flags.insert(Flag::SessionChange);
        }
        Some(n) => classify_setting(n, "", f),
        // Setting name computed at run time: could be anything.
        None => {
            f.flags.insert(Flag::RoleChange);
            f.flags.insert(Flag::SessionChange);
            f.effect = Effect::SearchPath(SearchPathChange::Unknown);
        }
    }
}

/// Words that take a parenthesis without being function calls.
fn is_keyword_before_paren(w: &str) -> bool {
    matches!(
        w,
        "in" | "values"
            | "as"
            | "exists"
            | "any"
            | "all"
            | "some"
            | "using"
            | "on"
            | "and"
            | "or"
            | "not"
            | "from"
            | "join"
            | "where"
            | "select"
            | "into"
            | "table"
            | "over"
            | "filter"
            | "within"
            | "with"
            | "lateral"
            | "returning"
            | "by"
            | "set"
            | "when"
            | "then"
            | "else"
            | "is"
            | "array"
            | "row"
            | "cast"
            | "key"
            | "unique"
            | "check"
            | "references"
            | "primary"
            | "index"
            | "partition"
            | "like"
            | "between"
            | "case"
            | "distinct"
            | "union"
            | "except"
            | "intersect"
            | "limit"
            | "offset"
            | "group"
            | "order"
            | "having"
            | "window"
            | "recursive"
            | "default"
            | "cube"
            | "rollup"
            | "sets"
            | "do"
            | "conflict"
            | "update"
            | "delete"
            | "insert"
            | "only"
            | "include"
            | "foreign"
            | "constraint"
            | "to"
            | "char"
            | "varchar"
            | "numeric"
            | "decimal"
            | "int"
            | "integer"
            | "bigint"
            | "smallint"
            | "float"
            | "double"
            | "timestamp"
            | "time"
            | "interval"
            | "bit"
            | "varbinary"
            | "binary"
            | "text"
            | "character"
            | "values_list"
            | "extract"
            | "substring"
            | "trim"
            | "position"
            | "overlay"
            | "coalesce"
            | "nullif"
            | "greatest"
            | "least"
            | "exclude"
            | "generated"
            | "identity"
            | "storage"
    )
}
