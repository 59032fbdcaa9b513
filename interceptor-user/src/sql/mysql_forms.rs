//! MariaDB / MySQL forms sqlparser does not read: statements classified
//! whole from their tokens (administration, accounts, locks, stored
//! programs and the pieces of their bodies) and rewrites of the rest into
//! forms sqlparser reads with the same tables and kind.
//!
//! Stored programs need both. A client sends `CREATE PROCEDURE p() BEGIN
//! ... END` as one message, but the splitter cuts it at every `;` (finer
//! than the server, which is safe: every piece is decided); so the head
//! (`CREATE PROCEDURE ... BEGIN <first statement>`) is opaque procedural
//! code, and every later piece is a statement behind control-flow words
//! (`IF c THEN stmt`, `END IF`, `DECLARE ... HANDLER FOR ... stmt`): the
//! words are dropped, their conditions kept as `SELECT cond`, and what is
//! left is analysed like any statement.

use super::{
    Dialect, Flag, Kind,
    lexer::TokKind,
    lexical::{LexFacts, T, lexical_kind, lexical_tables, name_at, scan, set_statement, word},
};

const MY: Dialect = Dialect::Mysql;

/// Words that open or continue a compound statement's body.
fn is_procedural_start(t: &[T<'_>]) -> bool {
    let w = |i| word(t, i);
    match w(0) {
        "if" | "elseif" | "else" | "while" | "repeat" | "loop" | "case" | "when" | "until"
        | "leave" | "iterate" | "return" | "signal" | "resignal" | "open" | "goto" => true,
        "declare" => true,
        "end" => true,
        "for" => w(2) == "in",
        "get" => matches!(w(1), "diagnostics" | "current" | "stacked"),
        // `BEGIN` alone (or `BEGIN WORK`) starts a transaction.
        "begin" => t.len() > 1 && w(1) != "work",
        // `label: ...`
        _ => is_label(t, 0),
    }
}

fn is_label(t: &[T<'_>], i: usize) -> bool {
    t.get(i).is_some_and(|x| x.kind == TokKind::Word)
        && t.get(i + 1)
            .is_some_and(|x| x.kind == TokKind::Op && x.text == ":")
        && matches!(
            word(t, i + 2),
            "begin" | "loop" | "while" | "repeat" | "for" | ""
        )
}

/// A statement left behind control-flow words: tokens `start..end`, read
/// as `SELECT <tokens>` when `select` (a condition or a value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub select: bool,
    pub start: usize,
    pub end: usize,
}

/// First index at or after `i` (at the top level of parentheses) holding
/// one of `words`, or the end.
fn find_top(t: &[T<'_>], mut i: usize, words: &[&str]) -> usize {
    let mut depth = 0usize;
    while let Some(x) = t.get(i) {
        match x.kind {
            TokKind::LParen => depth += 1,
            TokKind::RParen => depth = depth.saturating_sub(1),
            TokKind::Word if depth == 0 && words.contains(&x.text) => return i,
            _ => {}
        }
        i += 1;
    }
    t.len()
}

/// Skips a `DECLARE ... HANDLER FOR` condition list; the index of the
/// handler's statement.
fn skip_conditions(t: &[T<'_>], mut i: usize) -> usize {
    loop {
        match word(t, i) {
            "sqlstate" => {
                i += 1;
                if word(t, i) == "value" {
                    i += 1;
                }
                i += 1;
            }
            "not" if word(t, i + 1) == "found" => i += 2,
            _ if t.get(i).is_some() => i += 1,
            _ => return i,
        }
        if t.get(i).is_some_and(|x| x.kind == TokKind::Comma) {
            i += 1;
        } else {
            return i;
        }
    }
}

/// The statements behind a body piece's control-flow words, or `None`
/// when the piece is not one. An empty list: pure control flow.
pub(crate) fn procedural_pieces(t: &[T<'_>]) -> Option<Vec<Piece>> {
    if !is_procedural_start(t) {
        return None;
    }
    let mut out = Vec::new();
    let mut i = 0;
    let n = t.len();
    // A condition or value: only a subquery in it reads tables (function
    // calls are flagged by the lexical pass over the whole piece).
    let cond = |out: &mut Vec<Piece>, start: usize, end: usize| {
        if start < end
            && t[start..end]
                .iter()
                .any(|x| x.kind == TokKind::Word && matches!(x.text, "select" | "table" | "values"))
        {
            out.push(Piece {
                select: true,
                start,
                end,
            });
        }
    };
    while i < n {
        let w = word(t, i);
        if is_label(t, i) {
            i += 2;
            continue;
        }
        match w {
            "begin" => {
                i += 1;
                if word(t, i) == "not" && word(t, i + 1) == "atomic" {
                    i += 2;
                }
            }
            "loop" | "repeat" | "else" => i += 1,
            "if" | "elseif" | "while" | "when" => {
                let end = find_top(t, i + 1, &["then", "do"]);
                cond(&mut out, i + 1, end);
                i = end + 1;
            }
            "case" => {
                let end = find_top(t, i + 1, &["when"]);
                cond(&mut out, i + 1, end);
                i = end;
            }
            "until" => {
                let end = find_top(t, i + 1, &["end"]);
                cond(&mut out, i + 1, end);
                return Some(out);
            }
            "return" => {
                cond(&mut out, i + 1, n);
                return Some(out);
            }
            "for" => {
                // FOR x IN (query) DO | FOR x IN cursor DO | FOR i IN a .. b DO
                let end = find_top(t, i + 1, &["do"]);
                let from = i + 3;
                if t.get(from).is_some_and(|x| x.kind == TokKind::LParen)
                    && matches!(word(t, from + 1), "select" | "with" | "values")
                    && end > from + 1
                {
                    out.push(Piece {
                        select: false,
                        start: from + 1,
                        end: end - 1,
                    });
                } else if from < end {
                    // Bounds of a numeric range, or a cursor's name and
                    // arguments: values.
                    let parts: Vec<usize> = (from..end)
                        .filter(|k| t[*k].kind != TokKind::Op || t[*k].text != "..")
                        .collect();
                    if parts.len() == end - from {
                        // A cursor (name, arguments): nothing it reads here.
                    } else {
                        let dots = (from..end)
                            .find(|k| t[*k].kind == TokKind::Op && t[*k].text == "..")
                            .unwrap_or(end);
                        let lo = if word(t, from) == "reverse" {
                            from + 1
                        } else {
                            from
                        };
                        cond(&mut out, lo, dots);
                        cond(&mut out, dots + 1, end);
                    }
                }
                i = end + 1;
            }
            "declare" => match (word(t, i + 1), word(t, i + 2)) {
                ("continue" | "exit" | "undo", "handler") => {
                    i = skip_conditions(t, i + 4);
                }
                (_, "cursor") => {
                    let at = find_top(t, i + 3, &["for", "is"]);
                    if at + 1 < n {
                        out.push(Piece {
                            select: false,
                            start: at + 1,
                            end: n,
                        });
                    }
                    return Some(out);
                }
                (_, "condition") => return Some(out),
                _ => {
                    let d = find_top(t, i + 1, &["default"]);
                    cond(&mut out, d + 1, n);
                    return Some(out);
                }
            },
            "end" | "leave" | "iterate" | "open" | "close" | "goto" => return Some(out),
            "signal" | "resignal" => {
                // SET MESSAGE_TEXT = value, ...: values.
                let set = find_top(t, i + 1, &["set"]);
                let mut k = set + 1;
                while k < n {
                    let next = (k..n).find(|j| t[*j].kind == TokKind::Comma).unwrap_or(n);
                    let eq = (k..next)
                        .find(|j| t[*j].kind == TokKind::Op)
                        .unwrap_or(next);
                    cond(&mut out, eq + 1, next);
                    k = next + 1;
                }
                return Some(out);
            }
            "get" => return Some(out),
            _ => {
                out.push(Piece {
                    select: false,
                    start: i,
                    end: n,
                });
                return Some(out);
            }
        }
    }
    Some(out)
}

/// Adds the facts of a statement read whole inside this one.
fn merge(f: &mut LexFacts, inner: LexFacts) {
    if inner.kind.power() > f.kind.power() {
        f.kind = inner.kind;
    }
    f.flags = f.flags.union(inner.flags);
    f.tables.extend(inner.tables);
    for name in inner.functions {
        if !f.functions.contains(&name) {
            f.functions.push(name);
        }
    }
    f.procedural |= inner.procedural;
}

fn push_name(t: &[T<'_>], i: usize, written: bool, f: &mut LexFacts) -> usize {
    match name_at(t, i, MY) {
        Some((n, next)) => {
            f.tables.push((n, written));
            next
        }
        None => i + 1,
    }
}

/// Comma-separated table names from `i`, each followed by anything up to
/// the next top-level comma (aliases, lock modes, options).
fn name_list(t: &[T<'_>], mut i: usize, written: bool, stop: &[&str], f: &mut LexFacts) {
    while i < t.len() {
        if stop.contains(&word(t, i)) {
            return;
        }
        i = push_name(t, i, written, f);
        let mut depth = 0usize;
        while let Some(x) = t.get(i) {
            match x.kind {
                TokKind::LParen => depth += 1,
                TokKind::RParen => depth = depth.saturating_sub(1),
                TokKind::Comma if depth == 0 => break,
                TokKind::Word if depth == 0 && stop.contains(&x.text) => return,
                _ => {}
            }
            i += 1;
        }
        i += 1;
    }
}

/// Skips an account: `user`, `'user'@'host'`, `` `u`@`h` ``, `u@h`,
/// `CURRENT_USER[()]`, `CURRENT_ROLE`.
fn skip_account(t: &[T<'_>], mut i: usize) -> usize {
    let kind = |i: usize| t.get(i).map(|x| x.kind);
    if matches!(word(t, i), "current_user" | "current_role") {
        i += 1;
        if kind(i) == Some(TokKind::LParen) && kind(i + 1) == Some(TokKind::RParen) {
            i += 2;
        }
        return i;
    }
    if !matches!(
        kind(i),
        Some(TokKind::Word | TokKind::QuotedIdent | TokKind::Str)
    ) {
        return i;
    }
    i += 1;
    match t.get(i) {
        Some(x) if x.kind == TokKind::Var && x.text != "@" => i + 1,
        Some(x) if x.kind == TokKind::Var && x.text == "@" => i + 2,
        _ => i,
    }
}

/// Skips `DEFINER = user`, `SQL SECURITY x`, `ALGORITHM = x`, `OR
/// REPLACE`, `AGGREGATE`, `TEMPORARY` after CREATE / ALTER; the index of
/// the object's type word.
fn object_word(t: &[T<'_>]) -> usize {
    let mut i = 1;
    loop {
        match word(t, i) {
            "or" if word(t, i + 1) == "replace" => i += 2,
            "definer" => {
                i += 1;
                if t.get(i).is_some_and(|x| x.kind == TokKind::Op) {
                    i += 1;
                }
                i = skip_account(t, i);
            }
            "algorithm" => i += 3,
            "sql" if word(t, i + 1) == "security" => i += 3,
            "aggregate" | "temporary" | "online" | "offline" | "ignore" => i += 1,
            _ => return i,
        }
    }
}

/// MariaDB statements read whole from their tokens. Returns whether it
/// classified the statement (then `simple` says if the parser is still
/// needed).
pub(crate) fn classify(t: &[T<'_>], f: &mut LexFacts) -> bool {
    let w = |i| word(t, i);
    match (w(0), w(1)) {
        ("grant" | "revoke", _) => {
            f.kind = Kind::Dcl;
            f.simple = true;
            // GRANT role TO user: no ON clause.
            let on = find_top(t, 1, &["on"]);
            if on == t.len() {
                if !t
                    .iter()
                    .any(|x| x.kind == TokKind::Word && matches!(x.text, "privileges" | "option"))
                {
                    f.flags.insert(Flag::RoleChange);
                }
            } else {
                let mut i = on + 1;
                if matches!(w(i), "table" | "function" | "procedure" | "package") {
                    i += 1;
                }
                let to = find_top(t, i, &["to", "from"]);
                // `db.*`, `*.*`, `*`: whole databases, no table named.
                if !t[i..to].iter().any(|x| x.text == "*") {
                    push_name(t, i, false, f);
                }
            }
            true
        }
        ("create" | "drop" | "alter" | "rename", _)
            if matches!(w(object_word(t)), "user" | "role") =>
        {
            f.kind = Kind::Dcl;
            f.simple = true;
            true
        }
        ("lock", "table" | "tables") => {
            f.kind = Kind::Other;
            f.flags.insert(Flag::Lock);
            f.simple = true;
            name_list(t, 2, false, &[], f);
            true
        }
        ("unlock", _) | ("backup", _) => {
            f.kind = Kind::Other;
            f.flags.insert(Flag::Lock);
            if w(0) == "backup" {
                f.flags.insert(Flag::Admin);
            }
            f.simple = true;
            true
        }
        ("flush", _) => {
            f.kind = Kind::Other;
            f.flags.insert(Flag::Admin);
            f.simple = true;
            let mut i = 1;
            while matches!(w(i), "local" | "no_write_to_binlog") {
                i += 1;
            }
            if matches!(w(i), "table" | "tables") {
                name_list(t, i + 1, false, &["with", "for"], f);
            }
            if (0..t.len()).any(|k| {
                (w(k) == "read" && w(k + 1) == "lock") || (w(k) == "for" && w(k + 1) == "export")
            }) {
                f.flags.insert(Flag::Lock);
            }
            true
        }
        ("check" | "repair" | "optimize" | "analyze" | "checksum", "table" | "tables")
        | ("check", "view") => {
            f.kind = Kind::Other;
            let rebuilds = matches!(w(0), "repair" | "optimize");
            if rebuilds {
                f.flags.insert(Flag::Admin);
            }
            f.simple = true;
            name_list(
                t,
                2,
                rebuilds,
                &[
                    "persistent",
                    "quick",
                    "extended",
                    "fast",
                    "medium",
                    "changed",
                    "for",
                    "use_frm",
                ],
                f,
            );
            true
        }
        ("analyze" | "optimize" | "repair", "local" | "no_write_to_binlog") => {
            f.kind = Kind::Other;
            f.flags.insert(Flag::Admin);
            f.simple = true;
            name_list(
                t,
                3,
                true,
                &["persistent", "quick", "extended", "use_frm"],
                f,
            );
            true
        }
        ("show", _) => {
            f.kind = Kind::Other;
            f.simple = true;
            show(t, f);
            true
        }
        ("binlog", _) => {
            // Replays binary log events: any change at all.
            f.kind = Kind::Other;
            f.flags.insert(Flag::Admin);
            f.simple = true;
            true
        }
        ("cache", "index") | ("load", "index") => {
            f.kind = Kind::Other;
            f.flags.insert(Flag::Admin);
            f.simple = true;
            let start = if w(0) == "cache" { 2 } else { 4 };
            name_list(t, start, false, &["in", "ignore"], f);
            true
        }
        ("help", _) => {
            f.kind = Kind::Other;
            f.simple = true;
            true
        }
        ("do", _) => {
            // Evaluates expressions: a SELECT without a result.
            f.kind = Kind::Select;
            f.simple = !t.iter().any(|x| {
                x.kind == TokKind::Word && matches!(x.text, "select" | "table" | "values")
            });
            true
        }
        ("set", "statement") => {
            // SET STATEMENT var = value, ... FOR stmt: the settings hold
            // for one statement, decided as that statement.
            let at = find_top(t, 2, &["for"]);
            set_statement(&t[1..at.min(t.len())], MY, f);
            let inner = t.get(at + 1..).unwrap_or(&[]);
            let lf = scan(inner, MY);
            if !inner.is_empty() {
                f.kind = lf.kind;
            }
            if lf.simple {
                let effect = lf.effect.clone();
                merge(f, lf);
                f.effect = effect;
                f.simple = true;
            } else {
                f.simple = inner.is_empty();
            }
            true
        }
        ("alter", _) if w(object_word(t)) == "table" => {
            f.kind = Kind::Ddl;
            f.simple = true;
            let mut i = object_word(t) + 1;
            // `ALTER TABLE IF EXISTS t`: the table is after the words.
            if w(i) == "if" && w(i + 1) == "exists" {
                i += 2;
            }
            push_name(t, i, true, f);
            for k in i..t.len() {
                match w(k) {
                    "rename" => {
                        let j = if matches!(w(k + 1), "to" | "as") {
                            k + 2
                        } else {
                            k + 1
                        };
                        if !matches!(w(j), "column" | "index" | "key" | "constraint") {
                            push_name(t, j, true, f);
                        }
                    }
                    "table" if w(k - 1) == "with" => {
                        push_name(t, k + 1, true, f);
                    }
                    "references" => {
                        push_name(t, k + 1, false, f);
                    }
                    _ => {}
                }
            }
            true
        }
        ("create" | "alter" | "drop", _) if w(object_word(t)) == "sequence" => {
            f.kind = Kind::Ddl;
            f.simple = true;
            let mut i = object_word(t) + 1;
            if w(i) == "if" {
                i += if w(i + 1) == "not" { 3 } else { 2 };
            }
            if w(0) == "drop" {
                name_list(t, i, true, &[], f);
            } else {
                push_name(t, i, true, f);
            }
            true
        }
        ("drop", "event" | "procedure" | "function" | "trigger" | "package" | "server") => {
            f.kind = Kind::Ddl;
            f.simple = true;
            if w(1) == "server" {
                f.flags.insert(Flag::RemoteAccess);
            }
            true
        }
        ("create" | "alter", _)
            if matches!(
                w(object_word(t)),
                "procedure" | "function" | "trigger" | "event" | "package"
            ) =>
        {
            stored_program(t, object_word(t), f);
            true
        }
        _ => {
            let Some(pieces) = procedural_pieces(t) else {
                return false;
            };
            f.procedural = true;
            f.kind = Kind::Other;
            f.effect = super::analyze::Effect::None;
            let mut left = 0;
            for p in pieces {
                let k = if p.select {
                    left += 1;
                    Kind::Select
                } else {
                    let inner = &t[p.start..p.end];
                    let lf = scan(inner, MY);
                    if lf.simple {
                        merge(f, lf);
                        continue;
                    }
                    left += 1;
                    lexical_kind(inner)
                };
                if k.power() > f.kind.power() {
                    f.kind = k;
                }
            }
            f.simple = left == 0;
            true
        }
    }
}

/// `CREATE PROCEDURE / FUNCTION / TRIGGER / EVENT`: opaque procedural
/// code, with the table a trigger is on and the tables its body names.
fn stored_program(t: &[T<'_>], at: usize, f: &mut LexFacts) {
    let w = |i| word(t, i);
    f.kind = Kind::Ddl;
    f.procedural = true;
    f.simple = true;
    if (0..t.len()).any(|k| w(k) == "soname") {
        // A user-defined function from a shared library: runs its code.
        f.flags.insert(Flag::Admin);
        f.flags.insert(Flag::FileAccess);
    }
    let body = match w(at) {
        "trigger" => {
            let on = find_top(t, at, &["on"]);
            push_name(t, on + 1, true, f);
            let row = find_top(t, on, &["row"]);
            if matches!(w(row + 1), "follows" | "precedes") {
                row + 3
            } else {
                row + 1
            }
        }
        "event" => find_top(t, at, &["do"]) + 1,
        _ => {
            // After the parameter list.
            let open = (at..t.len()).find(|k| t[*k].kind == TokKind::LParen);
            let mut depth = 0usize;
            let mut end = t.len();
            for (k, x) in t.iter().enumerate().skip(open.unwrap_or(t.len())) {
                match x.kind {
                    TokKind::LParen => depth += 1,
                    TokKind::RParen => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            end = k + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            end
        }
    };
    if let Some(b) = t.get(body..) {
        lexical_tables(b, MY, &mut f.tables);
        let k = lexical_kind(b);
        if k.power() > f.kind.power() {
            f.kind = k;
        }
    }
}

/// Tables a SHOW statement reads: `SHOW COLUMNS / INDEX FROM t [FROM db]`,
/// `SHOW CREATE TABLE / VIEW / SEQUENCE t`, and any subquery's.
fn show(t: &[T<'_>], f: &mut LexFacts) {
    let w = |i| word(t, i);
    let mut i = 1;
    if w(i) == "full" || w(i) == "extended" {
        i += 1;
    }
    if w(i) == "full" {
        i += 1;
    }
    match w(i) {
        "columns" | "fields" | "index" | "indexes" | "keys"
            if matches!(w(i + 1), "from" | "in") =>
        {
            if let Some((mut n, next)) = name_at(t, i + 2, MY) {
                if matches!(w(next), "from" | "in")
                    && let Some((db, _)) = name_at(t, next + 1, MY)
                {
                    n.0.insert(0, db.0[0].clone());
                }
                f.tables.push((n, false));
            }
        }
        "create" if matches!(w(i + 1), "table" | "view" | "sequence") => {
            push_name(t, i + 2, false, f);
        }
        _ => {}
    }
    if t.iter()
        .any(|x| x.kind == TokKind::Word && matches!(x.text, "select" | "table"))
    {
        let mut sub = Vec::new();
        lexical_tables(t, MY, &mut sub);
        f.tables.extend(sub);
    }
}

/// A token of the rewritten text.
type Out = Vec<String>;

/// Rewrites the canonical text of a MariaDB statement sqlparser could not
/// read into one it reads with the same tables and kind, or `None`.
pub(crate) fn repair(canonical: &str) -> Option<String> {
    let t = super::lexical::tokens(canonical, MY);
    let mut out: Out = if let Some(pieces) = procedural_pieces(&t) {
        let mut out = Vec::new();
        for p in pieces {
            if !p.select && scan(&t[p.start..p.end], MY).simple {
                continue;
            }
            if !out.is_empty() {
                out.push(";".to_owned());
            }
            if p.select {
                out.push("select".to_owned());
            }
            out.extend(t[p.start..p.end].iter().map(|x| x.text.to_owned()));
        }
        if out.is_empty() {
            return None;
        }
        out
    } else if word(&t, 0) == "set" && word(&t, 1) == "statement" {
        let at = find_top(&t, 2, &["for"]);
        let inner: Vec<&str> = t.get(at + 1..)?.iter().map(|x| x.text).collect();
        let inner = inner.join(" ");
        return repair(&inner).or(Some(inner));
    } else {
        view_forms(&t)
    };
    let before = out.clone();
    statement_forms(&mut out);
    let toks: Vec<(TokKind, String)> = super::lexical::tokens(&out.join(" "), MY)
        .iter()
        .map(|x| (x.kind, x.text.to_owned()))
        .collect();
    let mut out = expression_forms(&toks);
    trailing_into(&mut out);
    table_groups(&mut out);
    values_queries(&mut out);
    dynamic_column_types(&mut out);
    if out == before && out.join(" ") == canonical {
        return None;
    }
    Some(out.join(" "))
}

/// `CREATE [OR REPLACE] [ALGORITHM = x] [DEFINER = u] [SQL SECURITY x]
/// VIEW ... [WITH [CASCADED | LOCAL] CHECK OPTION]`: the options dropped.
fn view_forms(t: &[T<'_>]) -> Out {
    let all = || t.iter().map(|x| x.text.to_owned()).collect();
    if !matches!(word(t, 0), "create" | "alter") {
        return all();
    }
    let at = object_word(t);
    if word(t, at) != "view" {
        return all();
    }
    let keep = if word(t, 1) == "or" { 3 } else { 1 };
    let n = t.len();
    let mut tail = n;
    if n >= 3 && word(t, n - 2) == "check" && word(t, n - 1) == "option" {
        let mut k = n - 2;
        if matches!(word(t, k - 1), "cascaded" | "local") {
            k -= 1;
        }
        if word(t, k - 1) == "with" {
            tail = k - 1;
        }
    }
    t[..keep]
        .iter()
        .chain(&t[at..tail])
        .map(|x| x.text.to_owned())
        .collect()
}

/// Leading forms: `EXPLAIN EXTENDED / PARTITIONS`, MariaDB's `ANALYZE
/// stmt` (runs it, as `EXPLAIN ANALYZE`), `DO`, view options, `DROP
/// TABLES`, multi-table UPDATE and DELETE.
fn statement_forms(out: &mut Out) {
    let w = |out: &Out, i: usize| out.get(i).map_or("", String::as_str).to_owned();
    match w(out, 0).as_str() {
        "explain" | "describe" | "desc" => {
            if matches!(w(out, 1).as_str(), "extended" | "partitions") {
                out.remove(1);
            }
            if w(out, 1) == "format" && w(out, 2) == "=" {
                out.drain(1..4);
            }
        }
        "analyze"
            if !matches!(
                w(out, 1).as_str(),
                "table" | "tables" | "local" | "no_write_to_binlog"
            ) =>
        {
            if w(out, 1) == "format" && w(out, 2) == "=" {
                out.drain(1..4);
            }
            out.insert(0, "explain".to_owned());
        }
        "do" => out[0] = "select".to_owned(),
        "drop" => {
            if w(out, 1) == "temporary" {
                out.remove(1);
            }
            if w(out, 1) == "tables" {
                out[1] = "table".to_owned();
            }
        }
        _ => {}
    }
    // The statement an EXPLAIN shows.
    let s0 = usize::from(matches!(
        w(out, 0).as_str(),
        "explain" | "describe" | "desc"
    ));
    // Multi-table UPDATE: `UPDATE a, b SET` as a cross join; its
    // modifiers (sqlparser reads `ignore (` as a table function).
    if w(out, s0) == "update" {
        while matches!(w(out, s0 + 1).as_str(), "ignore" | "low_priority") {
            out.remove(s0 + 1);
        }
        let mut depth = 0usize;
        let mut i = s0 + 1;
        while i < out.len() {
            match out[i].as_str() {
                "(" => depth += 1,
                ")" => depth = depth.saturating_sub(1),
                "set" if depth == 0 => break,
                "," if depth == 0 => {
                    out[i] = "cross join".to_owned();
                }
                _ => {}
            }
            i += 1;
        }
    }
    // INSERT ... SELECT ... ON DUPLICATE KEY UPDATE: the query in
    // parentheses, where sqlparser reads the clause after it.
    if matches!(w(out, 0).as_str(), "insert" | "replace") {
        let mut depth = 0usize;
        let mut select = None;
        let mut dup = None;
        for (i, s) in out.iter().enumerate() {
            match s.as_str() {
                "(" => depth += 1,
                ")" => depth = depth.saturating_sub(1),
                "select" | "with" if depth == 0 && select.is_none() => select = Some(i),
                "on" if depth == 0 && out.get(i + 1).is_some_and(|d| d == "duplicate") => {
                    dup = Some(i);
                }
                _ => {}
            }
        }
        if let (Some(a), Some(b)) = (select, dup)
            && a < b
        {
            out.insert(b, ")".to_owned());
            out.insert(a, "(".to_owned());
        }
    }
    // Multi-table DELETE: `DELETE a.*, b.* FROM` / `DELETE FROM a.* USING`.
    if w(out, s0) == "delete" {
        while matches!(w(out, s0 + 1).as_str(), "ignore" | "low_priority" | "quick") {
            out.remove(s0 + 1);
        }
        let end = out
            .iter()
            .position(|s| s == "using" || s == "where")
            .unwrap_or(out.len());
        let mut i = s0 + 1;
        let mut end = end;
        while i + 1 < end {
            if out[i] == "." && out[i + 1] == "*" {
                out.drain(i..i + 2);
                end -= 2;
            } else {
                i += 1;
            }
        }
    }
    create_table_forms(out);
}

/// Table options sqlparser does not know (storage details, no tables).
const TABLE_OPTIONS: &[&str] = &[
    "transactional",
    "page_checksum",
    "delay_key_write",
    "pack_keys",
    "checksum",
    "table_checksum",
    "avg_row_length",
    "min_rows",
    "max_rows",
    "stats_persistent",
    "stats_auto_recalc",
    "stats_sample_pages",
    "sequence",
    "page_compressed",
    "page_compression_level",
    "encrypted",
    "encryption_key_id",
    "ietf_quotes",
    "insert_method",
    "row_format",
    "key_block_size",
    "data",
    "index",
];

/// `CREATE TABLE t (...) options [IGNORE | REPLACE] SELECT ...` and
/// `CREATE TABLE t WITH cte AS (...) SELECT`.
fn create_table_forms(out: &mut Out) {
    let w = |out: &Out, i: usize| out.get(i).map_or("", String::as_str).to_owned();
    let mut at = 1;
    if w(out, at) == "or" {
        at += 2;
    }
    if w(out, at) == "temporary" {
        at += 1;
    }
    if w(out, 0) != "create" || w(out, at) != "table" {
        return;
    }
    let mut i = at + 1;
    if w(out, i) == "if" {
        i += 3;
    }
    // The name.
    i += 1;
    while w(out, i) == "." {
        i += 2;
    }
    if w(out, i) == "with" {
        out.insert(i, "as".to_owned());
        return;
    }
    let mut depth = 0usize;
    while i < out.len() {
        let cur = w(out, i);
        match cur.as_str() {
            // `CREATE TABLE t (SELECT ...) UNION (SELECT ...)`, `CREATE
            // TABLE t (cols) (WITH ... SELECT ...)`: a parenthesised query
            // fills the table.
            "(" if depth == 0
                && matches!(
                    out[i..].iter().find(|x| *x != "(").map(String::as_str),
                    Some("select" | "with" | "values" | "table")
                ) =>
            {
                out.insert(i, "as".to_owned());
                return;
            }
            "(" => depth += 1,
            ")" => depth = depth.saturating_sub(1),
            "ignore" | "replace" if depth == 0 && w(out, i + 1) == "select" => {
                out.remove(i);
                continue;
            }
            "select" | "with" | "as" if depth == 0 => return,
            // `CREATE TABLE t (a int) VALUES (...)`: a VALUES query fills it.
            "values" if depth == 0 => {
                out.insert(i, "as".to_owned());
                return;
            }
            // A column list element: `t1.name int` (a qualified column
            // name), `PERIOD FOR p (s, e)` (application time).
            _ if depth == 1 && matches!(w(out, i - 1).as_str(), "(" | ",") => {
                if w(out, i + 1) == "." {
                    out.drain(i..i + 2);
                    // A qualified name may be a keyword (`t1.index`).
                    if out[i].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
                        out[i] = format!("`{}`", out[i]);
                    }
                    continue;
                }
                if cur == "period" && w(out, i + 1) == "for" {
                    let close = (i..out.len()).find(|k| out[*k] == ")").unwrap_or(out.len());
                    let end = if w(out, close + 1) == "," {
                        close + 2
                    } else {
                        close + 1
                    };
                    let start = if end == close + 1 && w(out, i - 1) == "," {
                        i - 1
                    } else {
                        i
                    };
                    out.drain(start..end.min(out.len()));
                    i = start;
                    continue;
                }
            }
            // MariaDB's name for a stored generated column.
            "persistent" if depth == 1 && w(out, i - 1) == ")" => {
                out[i] = "stored".to_owned();
            }
            "visible" | "invisible" if depth == 1 => {
                out.remove(i);
                continue;
            }
            o if depth == 0
                && TABLE_OPTIONS.contains(&o)
                && (w(out, i + 1) == "=" || matches!(w(out, i + 1).as_str(), "directory"))
                && !(o == "index" && w(out, i + 1) != "directory") =>
            {
                let mut end = i + 1;
                if w(out, end) == "directory" {
                    end += 1;
                }
                if w(out, end) == "=" {
                    end += 1;
                }
                out.drain(i..(end + 1).min(out.len()));
                continue;
            }
            _ => {}
        }
        i += 1;
    }
}

/// Interval units sqlparser does not know, each read as a plain unit.
const COMPOUND_UNITS: &[&str] = &[
    "year_month",
    "day_hour",
    "day_minute",
    "day_second",
    "day_microsecond",
    "hour_minute",
    "hour_second",
    "hour_microsecond",
    "minute_second",
    "minute_microsecond",
    "second_microsecond",
];

/// Words that end the expression an interval unit could belong to.
const CLAUSE_WORDS: &[&str] = &[
    "select", "from", "join", "where", "set", "into", "update", "table", "on", "using", "by",
    "having", "values",
];

/// Whether the word at `i` stands where a unit does: `EXTRACT(unit FROM`,
/// or after `INTERVAL expr` in the same expression. Anywhere else it is a
/// name (`FROM day_hour`) and must stay one.
fn is_unit_position(t: &[(TokKind, String)], i: usize) -> bool {
    if i >= 2
        && t[i - 1].0 == TokKind::LParen
        && t[i - 2].0 == TokKind::Word
        && t[i - 2].1 == "extract"
    {
        return true;
    }
    let mut depth = 0usize;
    for (kind, text) in t[..i].iter().rev() {
        match kind {
            TokKind::RParen => depth += 1,
            TokKind::LParen if depth == 0 => return false,
            TokKind::LParen => depth -= 1,
            TokKind::Comma if depth == 0 => return false,
            TokKind::Word if depth == 0 && text == "interval" => return true,
            TokKind::Word if depth == 0 && CLAUSE_WORDS.contains(&text.as_str()) => return false,
            _ => {}
        }
    }
    false
}

/// Expression forms: compound interval units, `INTERVAL(n, ...)`, `TRIM(LEADING
/// FROM x)`, `SOUNDS LIKE`, `GROUP BY x DESC`, `NEXT / PREVIOUS VALUE FOR
/// seq` (a read of the sequence), `partition by` of CREATE TABLE.
fn expression_forms(t: &[(TokKind, String)]) -> Out {
    let w = |i: usize| {
        t.get(i)
            .filter(|x| x.0 == TokKind::Word)
            .map_or("", |x| x.1.as_str())
    };
    let mut out: Out = Vec::with_capacity(t.len());
    let mut in_group = false;
    let mut depth = 0usize;
    let mut group_depth = 0usize;
    let mut i = 0;
    while let Some((kind, text)) = t.get(i) {
        match kind {
            TokKind::LParen => depth += 1,
            TokKind::RParen => {
                depth = depth.saturating_sub(1);
                if depth < group_depth {
                    in_group = false;
                }
            }
            _ => {}
        }
        let word = if *kind == TokKind::Word {
            text.as_str()
        } else {
            ""
        };
        if word == "group" && w(i + 1) == "by" {
            in_group = true;
            group_depth = depth;
        } else if depth == group_depth
            && matches!(
                word,
                "having" | "order" | "limit" | "window" | "union" | "into" | "for" | "lock"
            )
        {
            in_group = false;
        }
        // GROUP BY x DESC
        if in_group
            && depth == group_depth
            && matches!(word, "asc" | "desc")
            && (t
                .get(i + 1)
                .is_none_or(|x| matches!(x.0, TokKind::Comma | TokKind::RParen))
                || matches!(
                    w(i + 1),
                    "having" | "order" | "limit" | "with" | "union" | "window"
                ))
        {
            i += 1;
            continue;
        }
        let prev = if i > 0 { t[i - 1].1.as_str() } else { "" };
        let next_kind = t.get(i + 1).map(|x| x.0);
        match (kind, word) {
            // `@x := v` (assignment in an expression; `=` has the same
            // operands).
            (TokKind::Op, _) if text.starts_with(":=") => {
                out.push(text[1..].to_owned());
                i += 1;
                continue;
            }
            // "text": a string (without ANSI_QUOTES).
            (TokKind::Str, _) if text.starts_with('"') && text.len() >= 2 => {
                let inner = &text[1..text.len() - 1];
                out.push(format!(
                    "'{}'",
                    inner.replace("\"\"", "\"").replace('\'', "''")
                ));
                i += 1;
                continue;
            }
            // `varchar(20) binary`: a binary collation.
            (_, "binary")
                if matches!(w(0), "create" | "alter")
                    && (prev == ")" || matches!(prev, "char" | "varchar" | "text"))
                    && !matches!(next_kind, Some(TokKind::LParen | TokKind::Str)) =>
            {
                i += 1;
                continue;
            }
            // @`name`, @'name', @"name": a user variable.
            (TokKind::Var, _) if text.contains(['`', '\'', '"']) => {
                let name: String = text
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push(format!("@v_{name}"));
                i += 1;
                continue;
            }
            (_, "charset") if next_kind != Some(TokKind::LParen) => {
                out.push("character set".to_owned());
                i += 1;
                continue;
            }
            // `_utf8 0xC3`: an introducer before a number.
            (TokKind::Word, w0) if w0.starts_with('_') && next_kind == Some(TokKind::Num) => {
                i += 1;
                continue;
            }
            // Window frame EXCLUDE clause.
            (_, "exclude") if matches!(w(i + 1), "current" | "ties" | "group" | "no") => {
                i += if matches!(w(i + 1), "current" | "no") {
                    3
                } else {
                    2
                };
                continue;
            }
            (_, "int" | "integer") if matches!(prev, "unsigned" | "signed") => {
                i += 1;
                continue;
            }
            // CHAR(n USING cs), and a conversion's target character set.
            (_, "using")
                if next_kind.is_some_and(|k| matches!(k, TokKind::Word | TokKind::QuotedIdent))
                    && t.get(i + 2).is_some_and(|x| x.0 == TokKind::RParen) =>
            {
                i += 2;
                continue;
            }
            (_, "mod") if next_kind != Some(TokKind::LParen) && i > 0 => {
                out.push("%".to_owned());
                i += 1;
                continue;
            }
            (_, "binary") if next_kind == Some(TokKind::Str) => {
                i += 1;
                continue;
            }
            (_, "sql_cache" | "sql_no_cache") => {
                i += 1;
                continue;
            }
            (_, "straight_join") => {
                if !matches!(
                    prev,
                    "select" | "distinct" | "all" | "high_priority" | "sql_calc_found_rows"
                ) {
                    out.push("join".to_owned());
                }
                i += 1;
                continue;
            }
            // ODBC `{ OJ t1 LEFT JOIN t2 ON ... }`.
            (TokKind::Other, _) if text == "{" && w(i + 1) == "oj" => {
                i += 2;
                continue;
            }
            (TokKind::Other, _) if text == "}" => {
                i += 1;
                continue;
            }
            // A string as a RANGE frame bound.
            (TokKind::Str, _) if matches!(w(i + 1), "preceding" | "following") => {
                out.push("0".to_owned());
                i += 1;
                continue;
            }
            _ => {}
        }
        if COMPOUND_UNITS.contains(&word) && is_unit_position(t, i) {
            out.push("second".to_owned());
            i += 1;
            continue;
        }
        // INTERVAL(n, n1, ...): the function, not an interval literal.
        if word == "interval" && t.get(i + 1).is_some_and(|x| x.0 == TokKind::LParen) {
            let mut d = 0usize;
            let mut comma = false;
            for x in &t[i + 1..] {
                match x.0 {
                    TokKind::LParen => d += 1,
                    TokKind::RParen => {
                        d -= 1;
                        if d == 0 {
                            break;
                        }
                    }
                    TokKind::Comma if d == 1 => comma = true,
                    _ => {}
                }
            }
            if comma {
                out.push("`interval`".to_owned());
                i += 1;
                continue;
            }
        }
        // TRIM(LEADING FROM x)
        if matches!(word, "leading" | "trailing" | "both")
            && w(i + 1) == "from"
            && i >= 2
            && t[i - 1].0 == TokKind::LParen
            && w(i - 2) == "trim"
        {
            out.push(text.clone());
            out.push("' '".to_owned());
            i += 1;
            continue;
        }
        if word == "sounds" && w(i + 1) == "like" {
            i += 1;
            continue;
        }
        // NEXT VALUE FOR s / PREVIOUS VALUE FOR s: reads (and advances) s.
        if matches!(word, "next" | "previous") && w(i + 1) == "value" && w(i + 2) == "for" {
            let mut j = i + 3;
            let mut name = Vec::new();
            while let Some(x) = t.get(j) {
                if !matches!(x.0, TokKind::Word | TokKind::QuotedIdent | TokKind::Dot) {
                    break;
                }
                if x.0 != TokKind::Dot && name.last().is_some_and(|l: &String| l != ".") {
                    break;
                }
                name.push(x.1.clone());
                j += 1;
            }
            if !name.is_empty() {
                let n = name.join(" ");
                let f = if word == "next" { "nextval" } else { "lastval" };
                out.push(format!("( select {f} ( {n} ) from {n} )"));
                i = j;
                continue;
            }
        }
        // CREATE TABLE ... PARTITION BY ...: storage layout, up to a
        // query that fills the table.
        if word == "partition" && w(i + 1) == "by" && depth == 0 && w(0) == "create" {
            let mut j = i;
            let mut d = 0usize;
            while let Some(x) = t.get(j) {
                match x.0 {
                    TokKind::LParen => d += 1,
                    TokKind::RParen => d = d.saturating_sub(1),
                    TokKind::Word
                        if d == 0
                            && matches!(
                                x.1.as_str(),
                                "as" | "select" | "with" | "values" | "ignore" | "replace"
                            ) =>
                    {
                        break;
                    }
                    _ => {}
                }
                j += 1;
            }
            i = j;
            continue;
        }
        out.push(text.clone());
        i += 1;
    }
    out
}

/// `SELECT ... INTO @a, v` at the end of a query (after FROM, LIMIT):
/// variables, dropped (an INTO before FROM sqlparser reads).
fn trailing_into(out: &mut Out) {
    if !matches!(
        out.first().map(String::as_str),
        Some("select" | "with" | "(")
    ) {
        return;
    }
    let mut depth = 0usize;
    let mut at = None;
    let mut from_seen = false;
    for (i, s) in out.iter().enumerate() {
        match s.as_str() {
            "(" => depth += 1,
            ")" => depth = depth.saturating_sub(1),
            "from" if depth == 0 => from_seen = true,
            "into" if depth == 0 && (from_seen || out[0] == "(") => at = Some(i),
            _ => {}
        }
    }
    let Some(at) = at else { return };
    let mut j = at + 1;
    while let Some(s) = out.get(j) {
        if matches!(s.as_str(), "outfile" | "dumpfile") {
            return;
        }
        j += 1;
        if out.get(j).is_some_and(|c| c == ",") {
            j += 1;
        } else {
            break;
        }
    }
    let rest_ok = matches!(out.get(j).map(String::as_str), None | Some("for" | "lock"));
    if rest_ok {
        out.drain(at..j);
    }
}

/// Index of the `)` closing the `(` at `open`.
fn closing(out: &Out, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (k, s) in out.iter().enumerate().skip(open) {
        match s.as_str() {
            "(" => depth += 1,
            ")" => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(k);
                }
            }
            _ => {}
        }
    }
    None
}

/// A `VALUES` query in parentheses, where sqlparser reads no query (`SET
/// x = (VALUES (1) LIMIT n)`): each row as a `SELECT`, the rows joined by
/// `UNION ALL`, so every expression in them is still read.
fn values_queries(out: &mut Out) {
    let mut i = 1;
    while i + 1 < out.len() {
        if !(out[i] == "values" && out[i - 1] == "(" && out[i + 1] == "(") {
            i += 1;
            continue;
        }
        let mut rows = Vec::new();
        let mut j = i + 1;
        while let Some(c) = closing(out, j) {
            rows.push((j, c));
            if out.get(c + 1).is_some_and(|s| s == ",") && out.get(c + 2).is_some_and(|s| s == "(")
            {
                j = c + 2;
            } else {
                break;
            }
        }
        let end = rows.last().map_or(i, |r| r.1);
        let follows_query = matches!(
            out.get(end + 1).map(String::as_str),
            Some(")" | "limit" | "order" | "union" | "except" | "intersect")
        );
        if rows.is_empty() || rows.iter().any(|(o, c)| c - o < 2) || !follows_query {
            i += 1;
            continue;
        }
        let mut query = Vec::new();
        for (o, c) in &rows {
            if !query.is_empty() {
                query.extend(["union".to_owned(), "all".to_owned()]);
            }
            query.push("select".to_owned());
            query.extend(out[o + 1..*c].iter().cloned());
        }
        let len = query.len();
        out.splice(i..=end, query);
        i += len;
    }
}

/// MariaDB's dynamic column functions take a type after a value
/// (`COLUMN_GET(blob, 1 AS CHAR)`, `COLUMN_CREATE(1, 'x' AS CHAR)`): the
/// types dropped, the values kept.
fn dynamic_column_types(out: &mut Out) {
    let mut dynamic = Vec::new();
    let mut i = 0;
    while i < out.len() {
        match out[i].as_str() {
            "(" => dynamic.push(
                i > 0
                    && matches!(
                        out[i - 1].as_str(),
                        "column_get" | "column_create" | "column_add"
                    ),
            ),
            ")" => {
                dynamic.pop();
            }
            "as" if dynamic.last() == Some(&true) => {
                let mut depth = 0usize;
                let mut end = i + 1;
                while let Some(s) = out.get(end) {
                    match s.as_str() {
                        "(" => depth += 1,
                        ")" if depth == 0 => break,
                        ")" => depth -= 1,
                        "," if depth == 0 => break,
                        _ => {}
                    }
                    end += 1;
                }
                out.drain(i..end);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
}

/// Parenthesised table lists in FROM: `FROM (t1, t2) JOIN t3`, `LEFT JOIN
/// (t2, t3) ON`, `JOIN (t3) ON`: the commas as cross joins, parentheses
/// around one table dropped.
fn table_groups(out: &mut Out) {
    let n = out.len();
    let mut close = vec![usize::MAX; n];
    let mut stack = Vec::new();
    for (i, s) in out.iter().enumerate() {
        match s.as_str() {
            "(" => stack.push(i),
            ")" => {
                if let Some(o) = stack.pop() {
                    close[o] = i;
                }
            }
            _ => {}
        }
    }
    let mut in_from = vec![false];
    let mut group = vec![false];
    let mut commas = Vec::new();
    let mut unwrap = Vec::new();
    for i in 0..n {
        match out[i].as_str() {
            "(" => {
                let prev = if i > 0 { out[i - 1].as_str() } else { "" };
                let first = out[i + 1..]
                    .iter()
                    .find(|x| *x != "(")
                    .map_or("", String::as_str);
                let is_group = (matches!(prev, "from" | "join")
                    || (matches!(prev, "," | "(") && in_from.last() == Some(&true)))
                    && !matches!(first, "select" | "with" | "values" | "table" | ")");
                if is_group && (close[i] == i + 2 || (close[i] == i + 4 && out[i + 2] == ".")) {
                    unwrap.push(i);
                }
                in_from.push(is_group);
                group.push(is_group);
            }
            ")" => {
                in_from.pop();
                group.pop();
                if in_from.is_empty() {
                    return;
                }
            }
            "from" | "join" => {
                if let Some(l) = in_from.last_mut() {
                    *l = true;
                }
            }
            "where" | "group" | "having" | "order" | "limit" | "union" | "set" | "window"
            | "into" | "for" | "lock" | "except" | "intersect" | "returning" => {
                if let Some(l) = in_from.last_mut() {
                    *l = false;
                }
            }
            "," if group.last() == Some(&true) => commas.push(i),
            _ => {}
        }
    }
    if commas.is_empty() && unwrap.is_empty() {
        return;
    }
    let drop: Vec<usize> = unwrap.iter().flat_map(|o| [*o, close[*o]]).collect();
    let old = std::mem::take(out);
    for (i, s) in old.into_iter().enumerate() {
        if drop.contains(&i) {
            continue;
        }
        out.push(if commas.contains(&i) {
            "cross join".to_owned()
        } else {
            s
        });
    }
}
