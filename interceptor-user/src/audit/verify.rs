//! Checking a log's hash chain: every record's own hash, every link to the
//! record before, and `seq` without gaps, across rotated files.

use std::{fmt, path::PathBuf};

use serde_json::Value;

use super::{
    chain::{self, Sealed},
    read::{ReadError, records},
};

/// An unbroken chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub files: usize,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// `prev` of the first record: [`chain::GENESIS`] when the log starts
    /// here, otherwise the hash of a record no longer present (rotated
    /// away by retention).
    pub anchor: Option<String>,
    /// `hash` of the last record: keep it elsewhere to detect a cut tail.
    pub last_hash: Option<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (Some(first), Some(last), Some(anchor)) = (self.first_seq, self.last_seq, &self.anchor)
        else {
            return write!(f, "ok: no records in {} file(s)", self.files);
        };
        let start = if anchor == chain::GENESIS {
            "the start of the log".to_owned()
        } else {
            format!("prev {anchor} (earlier records rotated away)")
        };
        write!(
            f,
            "ok: {} records in {} file(s), seq {first}..{last}, anchored at {start}, last hash {}",
            self.records,
            self.files,
            self.last_hash.as_deref().unwrap_or("")
        )
    }
}

/// The first record that breaks the chain.
#[derive(Debug)]
pub struct Failure {
    pub file: PathBuf,
    /// 1-based; 0 when the file could not be read at all.
    pub line: usize,
    pub seq: Option<u64>,
    pub problem: Problem,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Problem {
    /// The record's bytes do not hash to its `hash`.
    Edited,
    /// The line does not end with `prev` and `hash` members.
    Unsealed,
    /// The record has no numeric `seq`.
    NoSeq,
    /// `seq` is not the previous record's plus one.
    SeqGap {
        expected: u64,
        found: u64,
    },
    /// `prev` is not the previous record's `hash`.
    BrokenLink {
        previous_seq: u64,
    },
    Unparsable(String),
    /// The last line of the newest file is incomplete.
    Truncated,
    Io(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Edited => f.write_str("hash mismatch: the record was edited"),
            Self::Unsealed => f.write_str(
                "record carries no hash chain (prev and hash must be its last members)",
            ),
            Self::NoSeq => f.write_str("record has no seq"),
            Self::SeqGap { expected, found } if found > expected => write!(
                f,
                "seq {found} where {expected} was due: record(s) deleted or reordered before this one"
            ),
            Self::SeqGap { expected, found } => write!(
                f,
                "seq {found} where {expected} was due: record inserted or reordered"
            ),
            Self::BrokenLink { previous_seq } => write!(
                f,
                "prev does not match the hash of the record before it (seq {previous_seq}): a record was deleted, inserted, replaced or reordered"
            ),
            Self::Unparsable(m) => write!(f, "unparsable line: {m}"),
            Self::Truncated => f.write_str(
                "truncated final line (the agent stopped mid-write); the records before it chain correctly",
            ),
            Self::Io(m) => write!(f, "cannot read: {m}"),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, "seq {seq}: ")?;
        }
        write!(f, "{}", self.problem)
    }
}

/// Verifies `files` as one chain, in the order given (normally from
/// [`super::log_files`]).
///
/// # Errors
/// The first record (or line) that breaks the chain.
pub fn verify(files: Vec<PathBuf>) -> Result<Summary, Failure> {
    let mut sum = Summary {
        files: files.len(),
        ..Summary::default()
    };
    let mut last: Option<(u64, String)> = None;
    for item in records(files) {
        let rec = item.map_err(|e| match e {
            ReadError::Io { file, source } => Failure {
                file,
                line: 0,
                seq: None,
                problem: Problem::Io(source.to_string()),
            },
            ReadError::Unparsable {
                file,
                line,
                message,
            } => Failure {
                file,
                line,
                seq: None,
                problem: Problem::Unparsable(message),
            },
            ReadError::Truncated { file, line } => Failure {
                file,
                line,
                seq: None,
                problem: Problem::Truncated,
            },
        })?;
        let seq = rec.value.get("seq").and_then(Value::as_u64);
        let fail = |problem| Failure {
            file: rec.file.to_path_buf(),
            line: rec.line,
            seq,
            problem,
        };
        let Some(seq) = seq else {
            return Err(fail(Problem::NoSeq));
        };
        let (prev, hash) = match chain::check(&rec.text) {
            Sealed::Intact { prev, hash } => (prev, hash),
            Sealed::Mismatch { .. } => return Err(fail(Problem::Edited)),
            Sealed::Unsealed => return Err(fail(Problem::Unsealed)),
        };
        match &last {
            None => {
                sum.first_seq = Some(seq);
                sum.anchor = Some(prev.to_owned());
            }
            Some((last_seq, last_hash)) => {
                let expected = last_seq.saturating_add(1);
                if seq != expected {
                    return Err(fail(Problem::SeqGap {
                        expected,
                        found: seq,
                    }));
                }
                if prev != last_hash {
                    return Err(fail(Problem::BrokenLink {
                        previous_seq: *last_seq,
                    }));
                }
            }
        }
        sum.records += 1;
        sum.last_seq = Some(seq);
        last = Some((seq, hash.to_owned()));
    }
    sum.last_hash = last.map(|(_, h)| h);
    Ok(sum)
}
