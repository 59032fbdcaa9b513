#!/usr/bin/env python3
"""Statements of mysqltest scripts (MariaDB's test suite), as JSON Lines.

    corpus_mysqltest.py OUT_DIR FILE.test...

writes OUT_DIR/NAME.jsonl for each file (NAME: the file's name without
.test, prefixed with SUITE- for a file of suite/SUITE/): one object per
statement, {"line": N, "sql": "..."}, N the 1-based line the statement
starts on, the text as mysqltest would send it (without the delimiter).

It reads the script as mysqltest's own `read_line` does:

- a query ends at the current delimiter outside '', "" and `` quotes
  (mysqltest knows no SQL comments: a delimiter in /* */ ends it too);
- a line whose first character (at the start of a query) is `#` is a
  comment, `--` starts a one-line command (`--error 1064`, `--eval ...`);
- the first word of a query names a mysqltest command when it is one
  (`let`, `echo`, `connect`, `source`, ...), otherwise it is SQL;
- `if (...) {` / `while (...) {` open a block, `}` at the start of a line
  closes it; the SQL inside is kept (the conditions are not evaluated);
- `delimiter X` changes the terminator (stored programs with BEGIN..END);
- `perl`, `write_file` and `append_file` take the lines up to `EOF` (or
  the terminator they name) as data; `disable_parsing` skips up to
  `enable_parsing`.

SQL comes from plain queries and from the `send`, `query`, `query_vertical`,
`query_horizontal` and `eval` / `send_eval` commands. mysqltest expands
variables ($name) only in commands, so an `eval` whose text has a `$` is
left out (its value comes from the run), while a plain query keeps its `$`
(a JSON path such as '$.a' is the server's to read). An EXECUTE or
DEALLOCATE of a name no kept statement prepared is left out too: its
PREPARE was such an `eval`.
"""

import json
import os
import re
import sys

# mysqltest.cc's command_names: a query starting with one of these words is
# a command, not SQL.
COMMANDS = {
    "connection", "query", "connect", "sleep", "real_sleep", "inc", "dec",
    "source", "disconnect", "let", "echo", "while", "end", "system",
    "result", "require", "save_master_pos", "sync_with_master",
    "sync_slave_with_master", "error", "send", "reap", "dirty_close",
    "replace_result", "replace_column", "ping", "eval", "enable_query_log",
    "disable_query_log", "enable_result_log", "disable_result_log",
    "enable_connect_log", "disable_connect_log", "wait_for_slave_to_stop",
    "enable_warnings", "disable_warnings", "enable_info", "disable_info",
    "enable_session_track_info", "disable_session_track_info",
    "enable_metadata", "disable_metadata", "enable_column_names",
    "disable_column_names", "exec", "execw", "exec_in_background",
    "delimiter", "disable_abort_on_error", "enable_abort_on_error",
    "vertical_results", "horizontal_results", "query_vertical",
    "query_horizontal", "sorted_result", "lowercase_result", "start_timer",
    "end_timer", "character_set", "disable_ps_protocol",
    "enable_ps_protocol", "disable_ps2_protocol", "enable_ps2_protocol",
    "disable_view_protocol", "enable_view_protocol",
    "disable_service_connection", "enable_service_connection",
    "enable_non_blocking_api", "disable_non_blocking_api",
    "disable_reconnect", "enable_reconnect", "if", "disable_parsing",
    "enable_parsing", "replace_regex", "replace_numeric_round",
    "remove_file", "file_exists", "write_file", "copy_file", "perl", "die",
    "exit", "skip", "chmod", "append_file", "cat_file", "diff_files",
    "send_quit", "change_user", "mkdir", "rmdir", "force-rmdir",
    "force-cpdir", "list_files", "list_files_write_file",
    "list_files_append_file", "send_shutdown_to_server", "shutdown_server",
    "result_format", "move_file", "remove_files_wildcard",
    "copy_files_wildcard", "send_eval", "output", "reset_connection",
    "enable_prepare_warnings", "disable_prepare_warnings",
    "enable_cursor_protocol", "disable_cursor_protocol", "else",
}
# Commands whose argument is SQL sent to the server.
SQL_COMMANDS = {"send", "query", "query_vertical", "query_horizontal"}
EVAL_COMMANDS = {"eval", "send_eval"}
# Commands followed by data lines up to a terminator (EOF by default).
DATA_COMMANDS = {"perl", "write_file", "append_file"}

# Statements left out although the server may accept them, because running
# them against a shared test server would harm it or hang the run:
EXCLUDED = [
    # Stop the server or other sessions (the runner's own among them).
    (re.compile(r"^\s*(shutdown|kill)\b", re.I), "stops the server or a session"),
    # Move the server's endpoints or files: the runner loses it.
    (
        re.compile(
            r"\bset\b.*\b(global|@@global)\b.*\b(port|socket|datadir|basedir|bind_address|"
            r"tmpdir|plugin_dir|secure_file_priv|max_connections)\b",
            re.I | re.S,
        ),
        "changes how the server is reached",
    ),
    # Take away the account the runner logs in with.
    (
        re.compile(
            r"^\s*(drop|rename|alter)\s+user\b.*\broot\b|^\s*set\s+password\s+for\s+['`]?root\b"
            # Without FOR (or FOR CURRENT_USER): the connection's own
            # account, the runner's (the script ran it as another user).
            r"|^\s*set\s+password\s*(=|for\s+current_user)|^\s*alter\s+user\s+current_user"
            r"|^\s*(grant|revoke)\b.*\b(to|from)\s+current_user"
            r"|^\s*revoke\b.*\bfrom\s+['`]?root\b",
            re.I | re.S,
        ),
        "changes the runner's account",
    ),
    (
        re.compile(
            r"^\s*(delete\s+from|update|truncate(\s+table)?|drop\s+table)\s+(`?mysql`?\s*\.)"
            r"(?!.*\bwhere\b)",
            re.I | re.S,
        ),
        "empties a privilege table",
    ),
    (re.compile(r"^\s*drop\s+(database|schema)\s+(if\s+exists\s+)?`?mysql`?\s*$", re.I),
     "drops the system database"),
    # Change the system tables' definitions (the server stops reading
    # them), or remove accounts other than the test's own.
    (
        re.compile(
            r"^\s*(alter|drop|create|truncate)\s+(temporary\s+)?tables?\s+(if\s+(not\s+)?exists\s+)?"
            r"`?mysql`?\s*\.|^\s*rename\s+tables?\b[^;]*\bmysql\s*\.",
            re.I | re.S,
        ),
        "changes a system table's definition",
    ),
    (
        re.compile(
            r"^\s*(delete\s+from|update)\s+`?mysql`?\s*\.(?![^;]*\bwhere\b[^;]*\buser\b)",
            re.I | re.S,
        ),
        "removes or changes accounts other than the test's",
    ),
    (re.compile(r"\bmysql\s*\.\s*\w+[^;]*\broot\b|\broot\b[^;]*\bmysql\s*\.", re.I | re.S),
     "changes the root account"),
    # Wait longer than a second: sleeps, lock waits, busy loops.
    (re.compile(r"\bsleep\s*\(\s*(?!0*(\.\d+)?\s*\)|0*1(\.0*)?\s*\))", re.I), "sleeps more than 1 s"),
    (re.compile(r"\bget_lock\s*\(", re.I), "waits on a named lock"),
    (re.compile(r"\bbenchmark\s*\(\s*\d{7,}", re.I), "busy loop"),
]


PREPARE = re.compile(r"^\s*prepare\s+`?(\w+)`?\s+from\b", re.I)
USES_PREPARED = re.compile(r"^\s*(execute|deallocate\s+prepare|drop\s+prepare)\s+`?(\w+)`?", re.I)


def excluded(sql, prepared):
    """The reason a statement is left out, or None. `prepared`: names of
    the statements prepared so far."""
    for pattern, why in EXCLUDED:
        if pattern.search(sql):
            return why
    m = PREPARE.match(sql)
    if m:
        prepared.add(m.group(1).lower())
    m = USES_PREPARED.match(sql)
    if m and m.group(2).lower() != "immediate":
        name = m.group(2).lower()
        if name not in prepared:
            # Its PREPARE was an `eval` left out: in the script it runs a
            # statement this corpus does not hold.
            return "runs a statement prepared by a command left out"
        if m.group(1).lower() != "execute":
            prepared.discard(name)
    return None


def first_word(query):
    m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_\-]*)", query)
    return m.group(1).lower() if m else ""


class Script:
    """A mysqltest script, read query by query."""

    def __init__(self, text):
        self.text = text
        self.i = 0
        self.line = 1
        self.delimiter = ";"

    def advance(self, n):
        chunk = self.text[self.i:self.i + n]
        self.line += chunk.count("\n")
        self.i += n

    def rest_of_line(self):
        end = self.text.find("\n", self.i)
        end = len(self.text) if end < 0 else end
        s = self.text[self.i:end]
        self.advance(end - self.i + 1)
        return s

    def data_block(self, terminator):
        """Skips lines up to one that is `terminator` (trimmed)."""
        while self.i < len(self.text):
            if self.rest_of_line().strip() == terminator:
                return

    def read(self):
        """The next query: (kind, line, text) with kind 'comment', 'command'
        (a `--` line), 'close' (a `}`) or 'query'; None at the end."""
        t = self.text
        n = len(t)
        # Line start: skip blanks.
        while self.i < n and t[self.i] in " \t\r\n":
            self.advance(1)
        if self.i >= n:
            return None
        start = self.line
        c = t[self.i]
        if c == "#":
            return ("comment", start, self.rest_of_line())
        if c == "-":
            s = self.rest_of_line()
            return ("command", start, s[2:] if s.startswith("--") else s[1:])
        if c == "}":
            self.advance(1)
            return ("close", start, "}")
        buf_start = self.i
        quote = None
        slash = False
        d = self.delimiter
        while self.i < n:
            c = t[self.i]
            if quote:
                if c == quote and not slash:
                    quote = None
                slash = c == "\\" and not slash
                self.advance(1)
                continue
            if t.startswith(d, self.i):
                q = t[buf_start:self.i]
                self.advance(len(d))
                return ("query", start, q)
            if c == "{":
                w = first_word(t[buf_start:self.i])
                if w in ("if", "while", "else"):
                    q = t[buf_start:self.i]
                    self.advance(1)
                    return ("open", start, q)
            if c in "'\"`" and not slash:
                quote = c
            slash = c == "\\" and not slash
            self.advance(1)
        q = t[buf_start:]
        return ("query", start, q) if q.strip() else None


def statements(text):
    """(line, sql) for each SQL statement of a mysqltest script."""
    s = Script(text)
    out = []
    parsing = True

    def command(line, cmd, args):
        """Handles a mysqltest command; returns SQL it sends, if any."""
        nonlocal parsing
        if cmd == "enable_parsing":
            parsing = True
            return None
        if not parsing:
            return None
        if cmd == "delimiter":
            new = args.strip().split()
            if new:
                s.delimiter = new[0]
            return None
        if cmd in DATA_COMMANDS:
            words = args.split()
            if cmd == "perl":
                term = words[0] if words else "EOF"
            else:
                term = words[1] if len(words) > 1 else "EOF"
            s.data_block(term.rstrip(";"))
            return None
        if cmd == "disable_parsing":
            parsing = False
            return None
        if cmd in SQL_COMMANDS:
            # A bare `send` sends the next query, which is read as one.
            return args
        if cmd in EVAL_COMMANDS:
            return None if "$" in args else args
        return None

    while True:
        q = s.read()
        if q is None:
            break
        kind, line, text = q
        if kind in ("comment", "close", "open"):
            continue
        if kind == "command":
            stripped = text.strip()
            cmd = first_word(stripped)
            if cmd not in COMMANDS:
                continue  # `-- text`: a comment
            args = stripped[len(cmd):]
            # `--perl` and `--write_file` read data up to their terminator.
            sql = command(line, cmd, args.rstrip().removesuffix(s.delimiter) if cmd in DATA_COMMANDS else args)
            if sql is not None and sql.strip():
                out.append((line, sql.strip()))
            continue
        # A query: the first word decides.
        lead = len(text) - len(text.lstrip())
        body = text.strip()
        line += text[:lead].count("\n")
        if not body:
            continue
        cmd = first_word(body)
        if cmd in COMMANDS and not (
            # `end` is a command only alone; `connect` only with a parenthesis
            # or a name, never SQL (SQL has no CONNECT).
            cmd == "end" and body.lower() != "end"
        ):
            args = body[len(cmd):]
            sql = command(line, cmd, args)
            if sql is not None and sql.strip():
                out.append((line + args[: len(args) - len(args.lstrip())].count("\n"), sql.strip()))
            continue
        if not parsing:
            continue
        out.append((line, body))
    return out


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    out_dir = argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for path in argv[2:]:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        name = os.path.basename(path).removesuffix(".test")
        parts = os.path.normpath(path).split(os.sep)
        if "suite" in parts:
            name = f"{parts[parts.index('suite') + 1]}-{name}"
        kept = skipped = 0
        prepared = set()
        with open(os.path.join(out_dir, name + ".jsonl"), "w", encoding="utf-8") as f:
            for line, sql in statements(text):
                if excluded(sql, prepared):
                    skipped += 1
                    continue
                try:
                    sql.encode("utf-8")
                except UnicodeEncodeError:
                    # Bytes that are not UTF-8 (ctype tests): not JSON text.
                    skipped += 1
                    continue
                f.write(json.dumps({"line": line, "sql": sql}, ensure_ascii=False) + "\n")
                kept += 1
        print(f"{name}: {kept} statements ({skipped} excluded)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
