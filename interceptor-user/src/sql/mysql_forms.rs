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
    lexical::{LexFacts, T, lexical_kind, lexical_tables, name_at, set_statement, word},
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
    let cond = |out: &mut Vec<Piece>, start: usize, end: usize| {
        if start < end {
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

/// Skips `DEFINER = user`, `SQL SECURITY x`, `ALGORITHM = x`, `OR
/// REPLACE`, `AGGREGATE`, `TEMPORARY` after CREATE / ALTER; the index of
/// the object's type word.
fn object_word(t: &[T<'_>]) -> usize {
    let mut i = 1;
    loop {
        match word(t, i) {
            "or" if word(t, i + 1) == "replace" => i += 2,
            "definer" | "algorithm" => {
                i += 1;
                if t.get(i).is_some_and(|x| x.kind == TokKind::Op) {
                    i += 1;
                }
                // user, `user`@`host`, 'user'@'host', CURRENT_USER[()]
                while let Some(x) = t.get(i) {
                    let part = match x.kind {
                        TokKind::Word | TokKind::QuotedIdent | TokKind::Str | TokKind::Var => true,
                        TokKind::Op => x.text == "@",
                        TokKind::LParen | TokKind::RParen => true,
                        _ => false,
                    };
                    if !part || (x.kind == TokKind::Word && i > 0 && t[i - 1].kind == TokKind::Word)
                    {
                        break;
                    }
                    i += 1;
                }
            }
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
                f.flags.insert(Flag::RoleChange);
            } else {
                let mut i = on + 1;
                if matches!(w(i), "table" | "function" | "procedure" | "package") {
                    i += 1;
                }
                if name_at(t, i, MY).is_some_and(|(n, _)| n.last() != "*") {
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
            let at = find_top(t, 2, &["for"]);
            set_statement(&t[1..at.min(t.len())], MY, f);
            let inner = t.get(at + 1..).unwrap_or(&[]);
            let k = lexical_kind(inner);
            if k.power() >= f.kind.power() {
                f.kind = k;
            }
            f.simple = inner.is_empty();
            true
        }
        ("alter", _) if w(object_word(t)) == "table" => {
            f.kind = Kind::Ddl;
            f.simple = true;
            let i = object_word(t) + 1;
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
            f.simple = pieces.is_empty();
            for p in pieces {
                let k = if p.select {
                    Kind::Select
                } else {
                    lexical_kind(&t[p.start..p.end])
                };
                if k.power() > f.kind.power() {
                    f.kind = k;
                }
            }
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
            for k in open.unwrap_or(t.len())..t.len() {
                match t[k].kind {
                    TokKind::LParen => depth += 1,
                    TokKind::RParen => {
                        depth -= 1;
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
        t.get(at + 1..)?.iter().map(|x| x.text.to_owned()).collect()
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
    // Multi-table UPDATE: `UPDATE a, b SET` as a cross join.
    if w(out, 0) == "update" {
        let mut depth = 0usize;
        let mut i = 1;
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
    // Multi-table DELETE: `DELETE a.*, b.* FROM` / `DELETE FROM a.* USING`.
    if w(out, 0) == "delete" {
        let end = out
            .iter()
            .position(|s| s == "using" || s == "where")
            .unwrap_or(out.len());
        let mut i = 1;
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
        if COMPOUND_UNITS.contains(&word) {
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
                                "as" | "select" | "with" | "ignore" | "replace"
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
            "into" if depth == 0 && from_seen => at = Some(i),
            _ => {}
        }
    }
    let Some(at) = at else { return };
    let mut j = at + 1;
    loop {
        let Some(s) = out.get(j) else { break };
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
    let rest_ok = match out.get(j).map(String::as_str) {
        None => true,
        Some("for" | "lock") => true,
        _ => false,
    };
    if rest_ok {
        out.drain(at..j);
    }
}
