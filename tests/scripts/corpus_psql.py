#!/usr/bin/env python3
"""Statements of psql scripts (PostgreSQL's regression suite), as JSON Lines.

    corpus_psql.py OUT_DIR FILE.sql...

writes OUT_DIR/NAME.jsonl for each file: one object per statement,
{"line": N, "sql": "..."}, N the 1-based line the statement starts on, the
text as psql would send it (without the terminating semicolon).

It reads the script as psql's own lexer does: quotes ('', E'', "", $tag$),
comments (--, nested /* */), parentheses (a semicolon inside them does not
end a statement), backslash commands (skipped; \\g and its variants end the
statement before them), and COPY ... FROM stdin data up to \\. (skipped).
Statements that use psql variables (:name, :'name', :"name") are left out:
psql substitutes those before the server sees the text, and their values
come from the run.
"""

import json
import os
import re
import sys

# Backslash commands that send the statement buffered before them.
SENDS = {"g", "gx", "gset", "gexec", "gdesc", "crosstabview", "watch", "bind"}
VARIABLE = re.compile(r"(?<![:\w]):['\"]?[A-Za-z_]")
# psql reads the data of COPY ... FROM STDIN (or FROM STDOUT) from the script.
COPY_STDIN = re.compile(r"^\s*copy\b.*\bfrom\s+std(in|out)\b", re.I | re.S)


def statements(text):
    """Yields (line, sql) for each statement of a psql script."""
    out = []
    buf = []
    start = None
    i = 0
    n = len(text)
    line = 1
    depth = 0
    copy_data = False

    def flush():
        nonlocal buf, start, depth
        sql = "".join(buf).strip()
        if sql:
            out.append((start, sql))
        buf = []
        start = None
        depth = 0
        return sql

    while i < n:
        if copy_data:
            end = text.find("\n", i)
            end = n if end < 0 else end
            if text[i:end].rstrip("\r") == "\\.":
                copy_data = False
            i = end + 1
            line += 1
            continue
        c = text[i]
        if start is None and not c.isspace() and c != "\\" and not text.startswith("--", i):
            start = line
        if c == "\n":
            line += 1
            buf.append(c)
            i += 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            level = 0
            j = i
            while j < n:
                if text.startswith("/*", j):
                    level += 1
                    j += 2
                elif text.startswith("*/", j):
                    level -= 1
                    j += 2
                    if level == 0:
                        break
                else:
                    j += 1
            chunk = text[i:j]
            line += chunk.count("\n")
            buf.append(chunk)
            i = j
        elif c in "'\"" or (c in "eE" and text.startswith("'", i + 1) and not _word_before(buf)):
            j = i
            if c in "eE":
                buf.append(c)
                j += 1
            quote = text[j]
            backslash = c in "eE"
            k = j + 1
            while k < n:
                if backslash and text[k] == "\\":
                    k += 2
                    continue
                if text[k] == quote:
                    if k + 1 < n and text[k + 1] == quote:
                        k += 2
                        continue
                    break
                k += 1
            chunk = text[j : k + 1]
            line += chunk.count("\n")
            buf.append(chunk)
            i = k + 1
        elif c == "$" and (m := re.match(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$", text[i:])) and not _word_before(buf):
            tag = m.group(0)
            end = text.find(tag, i + len(tag))
            end = n if end < 0 else end + len(tag)
            chunk = text[i:end]
            line += chunk.count("\n")
            buf.append(chunk)
            i = end
        elif c == "(":
            depth += 1
            buf.append(c)
            i += 1
        elif c == ")":
            depth = max(0, depth - 1)
            buf.append(c)
            i += 1
        elif c == ";" and depth == 0:
            sql = flush()
            if COPY_STDIN.match(sql):
                copy_data = True
            i += 1
        elif c == "\\":
            end = text.find("\n", i)
            end = n if end < 0 else end
            command = text[i + 1 : end].split(None, 1)
            name = command[0] if command else ""
            if name == "\\":
                # `\\` separates commands on one line: the rest is SQL.
                i += 2
                continue
            if name in SENDS:
                sql = flush()
                if COPY_STDIN.match(sql):
                    copy_data = True
            i = end
        else:
            buf.append(c)
            i += 1
    flush()
    return out


def _word_before(buf):
    """Whether the buffered text ends inside a word (then `e'` or `$` is
    part of it, as in `somename$1` or `type'...'`)."""
    tail = "".join(buf[-1:])
    return bool(tail) and (tail[-1].isalnum() or tail[-1] == "_")


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for path in sys.argv[2:]:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        name = os.path.splitext(os.path.basename(path))[0]
        kept = 0
        with open(os.path.join(out_dir, name + ".jsonl"), "w", encoding="utf-8") as f:
            for line, sql in statements(text):
                if VARIABLE.search(_unquoted(sql)):
                    continue
                try:
                    sql.encode("utf-8")
                except UnicodeEncodeError:
                    continue
                f.write(json.dumps({"line": line, "sql": sql}, ensure_ascii=False) + "\n")
                kept += 1
        print(f"{name}: {kept}")


def _unquoted(sql):
    """The statement with quoted text blanked, to look for psql variables."""
    return re.sub(r"'(?:[^']|'')*'|\$([A-Za-z_]*)\$.*?\$\1\$", "''", sql, flags=re.S)


if __name__ == "__main__":
    main()
