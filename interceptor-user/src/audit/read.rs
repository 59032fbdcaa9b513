//! Reading audit logs back (offline `tail --file`, `audit verify`, the
//! writer's restart): which files make up a log, in chain order, and their
//! records, with every line that is not a record reported, never skipped.
//!
//! Rotation naming: the live file is the base path (`audit.jsonl`); at
//! rotation it becomes `audit.jsonl.1`, the previous `.1` becomes `.2`, and
//! so on; `.N` is the oldest, and files beyond `retain` are deleted.

use std::{
    collections::VecDeque,
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde_json::Value;

use super::chain;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{}: {source}", file.display())]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: unparsable line: {message}", file.display())]
    Unparsable {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}:{line}: truncated final line (the agent stopped mid-write)", file.display())]
    Truncated { file: PathBuf, line: usize },
}

/// The `n`th rotated file of `base` (`audit.jsonl` → `audit.jsonl.n`).
#[must_use]
pub fn rotated_path(base: &Path, n: usize) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The rotation number of a path named like a rotated file (`x.3` → 3).
fn rotation_number(path: &Path) -> Option<usize> {
    let name = path.file_name()?.to_str()?;
    let (stem, n) = name.rsplit_once('.')?;
    if stem.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Existing rotated files of `base`, by rotation number (newest first).
pub(crate) fn rotated_siblings(base: &Path) -> std::io::Result<Vec<(usize, PathBuf)>> {
    let dir = match base.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(name) = base.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(n) = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        out.push((n, rotated_path(base, n)));
    }
    out.sort();
    Ok(out)
}

/// The files of one or more logs in chain order. Each path may be a log's
/// base path (its rotated siblings `PATH.1`, `PATH.2`, ... are added) or a
/// single file named like a rotated one (`PATH.N`, taken alone). Files are
/// ordered by the `seq` of their first record; files without any record go
/// last, oldest rotation first.
///
/// # Errors
/// When a path names neither an existing file nor a base with rotated
/// siblings, or a directory cannot be listed or a file read.
pub fn log_files<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<PathBuf>, ReadError> {
    let io = |file: &Path| {
        let file = file.to_owned();
        move |source| ReadError::Io { file, source }
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for p in paths {
        let p = p.as_ref();
        let exists = p.is_file();
        let siblings = if rotation_number(p).is_none() {
            rotated_siblings(p).map_err(io(p))?
        } else {
            Vec::new()
        };
        if !exists && siblings.is_empty() {
            return Err(ReadError::Io {
                file: p.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such log file"),
            });
        }
        if exists {
            found.push(p.to_owned());
        }
        found.extend(siblings.into_iter().map(|(_, f)| f));
    }
    // The same file named twice (or by two routes) counts once.
    let mut seen = std::collections::HashSet::new();
    let mut keyed = Vec::new();
    for f in found {
        let id = std::fs::canonicalize(&f).map_err(io(&f))?;
        if seen.insert(id) {
            let first = first_seq(&f)?;
            let n = rotation_number(&f).unwrap_or(0);
            keyed.push((first.unwrap_or(u64::MAX), std::cmp::Reverse(n), f));
        }
    }
    keyed.sort();
    Ok(keyed.into_iter().map(|(_, _, f)| f).collect())
}

/// `seq` of the first line of `file` that is a record with one.
fn first_seq(file: &Path) -> Result<Option<u64>, ReadError> {
    let io = |source| ReadError::Io {
        file: file.to_owned(),
        source,
    };
    let mut r = BufReader::new(File::open(file).map_err(io)?);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf).map_err(io)? == 0 {
            return Ok(None);
        }
        if let Some(seq) = serde_json::from_slice::<Value>(&buf)
            .ok()
            .and_then(|v| v.get("seq")?.as_u64())
        {
            return Ok(Some(seq));
        }
    }
}

/// One record read back.
#[derive(Clone, Debug)]
pub struct Record {
    pub file: Arc<Path>,
    /// 1-based line number in `file`.
    pub line: usize,
    /// The line as written, without its newline.
    pub text: String,
    /// The line parsed (always a JSON object).
    pub value: Value,
}

/// Lines of several files in order, as records or errors (see [`records`]).
pub struct Records {
    files: VecDeque<PathBuf>,
    current: Option<(Arc<Path>, BufReader<File>, usize)>,
    buf: Vec<u8>,
}

/// Every line of `files` (in the order given, normally from [`log_files`])
/// as a [`Record`], or an error naming file and line: an unparsable line, a
/// truncated final line of the last file, a file that cannot be read. After
/// an error the iterator carries on with the next line.
#[must_use]
pub fn records(files: Vec<PathBuf>) -> Records {
    Records {
        files: files.into(),
        current: None,
        buf: Vec::new(),
    }
}

impl Iterator for Records {
    type Item = Result<Record, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let Some((file, reader, line)) = &mut self.current else {
                let path = self.files.pop_front()?;
                match File::open(&path) {
                    Ok(f) => self.current = Some((Arc::from(path), BufReader::new(f), 0)),
                    Err(source) => return Some(Err(ReadError::Io { file: path, source })),
                }
                continue;
            };
            self.buf.clear();
            match reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => {
                    self.current = None;
                    continue;
                }
                Ok(_) => {}
                Err(source) => {
                    let file = file.to_path_buf();
                    self.current = None;
                    return Some(Err(ReadError::Io { file, source }));
                }
            }
            *line += 1;
            let terminated = self.buf.last() == Some(&b'\n');
            if terminated {
                self.buf.pop();
            }
            let is_last = !terminated && self.files.is_empty();
            return Some(parse_line(file, *line, &self.buf, terminated, is_last));
        }
    }
}

fn parse_line(
    file: &Arc<Path>,
    line: usize,
    bytes: &[u8],
    terminated: bool,
    is_last: bool,
) -> Result<Record, ReadError> {
    let unparsable = |message: String| ReadError::Unparsable {
        file: file.to_path_buf(),
        line,
        message,
    };
    let parsed = std::str::from_utf8(bytes)
        .map_err(|_| String::from("not UTF-8"))
        .and_then(|text| match serde_json::from_str::<Value>(text) {
            Ok(v @ Value::Object(_)) => Ok((text.to_owned(), v)),
            Ok(_) => Err(String::from("not a JSON object")),
            Err(e) => Err(e.to_string()),
        });
    match parsed {
        Ok((text, value)) => Ok(Record {
            file: Arc::clone(file),
            line,
            text,
            value,
        }),
        Err(_) if is_last => Err(ReadError::Truncated {
            file: file.to_path_buf(),
            line,
        }),
        Err(message) if !terminated => Err(unparsable(format!(
            "unterminated last line of a file that is not the newest ({message})"
        ))),
        Err(message) => Err(unparsable(message)),
    }
}

/// Where an existing log ends: its last record's `seq` and `hash`.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    pub seq: Option<u64>,
    pub hash: Option<String>,
    /// Bytes of a partial last line removed from the base file.
    pub repaired: Option<u64>,
}

/// Reads where the log at `base` ends (base file, else its newest rotated
/// file), after making the base file end on a line boundary: a partial last
/// line (the agent stopped mid-write) that is not a complete record is cut
/// off, since appending after it would corrupt the next record too.
pub(crate) fn tail(base: &Path) -> std::io::Result<Tail> {
    let mut out = Tail {
        repaired: repair(base)?,
        ..Tail::default()
    };
    let mut candidates = vec![base.to_owned()];
    candidates.extend(rotated_siblings(base)?.into_iter().map(|(_, p)| p));
    for c in candidates {
        if let Some(v) = last_record(&c)? {
            out.seq = v.get("seq").and_then(Value::as_u64);
            out.hash = v
                .get("hash")
                .and_then(Value::as_str)
                .filter(|h| chain::is_hash(h))
                .map(str::to_owned);
            break;
        }
    }
    Ok(out)
}

fn repair(base: &Path) -> std::io::Result<Option<u64>> {
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(base)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::End(-1))?;
    f.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(None);
    }
    // Find the start of the partial line.
    let mut start = 0u64;
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    'search: while end > 0 {
        let from = end.saturating_sub(chunk.len() as u64);
        let n = usize::try_from(end - from).unwrap_or(chunk.len());
        f.seek(SeekFrom::Start(from))?;
        f.read_exact(&mut chunk[..n])?;
        if let Some(p) = memchr::memrchr(b'\n', &chunk[..n]) {
            start = from + p as u64 + 1;
            break 'search;
        }
        end = from;
    }
    f.seek(SeekFrom::Start(start))?;
    let mut partial = Vec::new();
    f.read_to_end(&mut partial)?;
    let complete = std::str::from_utf8(&partial)
        .is_ok_and(|s| matches!(chain::check(s), chain::Sealed::Intact { .. }));
    if complete {
        // Only the newline is missing.
        f.seek(SeekFrom::End(0))?;
        f.write_all(b"\n")?;
        return Ok(None);
    }
    f.set_len(start)?;
    f.sync_all()?;
    Ok(Some(len - start))
}

/// The last line of `file` that parses as a record with a `seq`.
fn last_record(file: &Path) -> std::io::Result<Option<Value>> {
    let mut f = match File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let mut window = 64 * 1024u64;
    loop {
        let from = len.saturating_sub(window);
        f.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::new();
        (&mut f).take(len - from).read_to_end(&mut buf)?;
        let mut lines: Vec<&[u8]> = buf.split(|b| *b == b'\n').collect();
        if from > 0 && !lines.is_empty() {
            // The first piece may start mid-line.
            lines.remove(0);
        }
        let found = lines.iter().rev().filter(|l| !l.is_empty()).find_map(|l| {
            serde_json::from_slice::<Value>(l)
                .ok()
                .filter(|v| v.get("seq").and_then(Value::as_u64).is_some())
        });
        if found.is_some() || from == 0 {
            return Ok(found);
        }
        window = window.saturating_mul(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_names() {
        let base = Path::new("/var/log/a.jsonl");
        assert_eq!(rotated_path(base, 3), Path::new("/var/log/a.jsonl.3"));
        assert_eq!(rotation_number(Path::new("/x/a.jsonl.12")), Some(12));
        assert_eq!(rotation_number(Path::new("/x/a.jsonl")), None);
        assert_eq!(rotation_number(Path::new("/x/.5")), None);
    }

    #[test]
    fn repairs_a_partial_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, "{\"seq\":1}\n{\"seq\":2,\"ev").unwrap();
        let t = tail(&p).unwrap();
        assert_eq!(t.repaired, Some(12));
        assert_eq!(t.seq, Some(1));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"seq\":1}\n");
        // Garbage without any newline is cut entirely.
        std::fs::write(&p, "garbage").unwrap();
        assert_eq!(tail(&p).unwrap().repaired, Some(7));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
    }
}
