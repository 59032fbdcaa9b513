//! The hash chain over audit records.
//!
//! Canonical bytes of a record: the exact UTF-8 bytes of its line without
//! the trailing newline and without the final `,"hash":"<64 hex>"` member,
//! so that they end in `,"prev":"<64 hex>"}`. `hash` is the lower-case hex
//! SHA-256 of those bytes and is always the last member of the line; `prev`
//! is the previous record's `hash` (64 zeros for the first record of a new
//! log). Verifying a line therefore needs no JSON re-serialisation: strip
//! the `hash` member, hash what is left, compare.

use sha2::{Digest as _, Sha256};

/// `prev` of the very first record of a brand-new log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Lower-case hex SHA-256.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Whether `s` is 64 lower-case hex digits.
#[must_use]
pub fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Completes a record: `open` is the line up to and including its last
/// member, without the closing brace. Appends `prev`, hashes the canonical
/// bytes and appends `hash`. Returns the line (no newline) and its hash.
#[must_use]
pub fn seal(mut open: String, prev: &str) -> (String, String) {
    open.push_str(",\"prev\":\"");
    open.push_str(prev);
    open.push_str("\"}");
    let hash = sha256_hex(open.as_bytes());
    open.pop();
    open.push_str(",\"hash\":\"");
    open.push_str(&hash);
    open.push_str("\"}");
    (open, hash)
}

/// What a line says about itself, read from its bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Sealed<'a> {
    /// `hash` is last and matches the canonical bytes; `prev` ends them.
    Intact { prev: &'a str, hash: &'a str },
    /// `hash` is last but does not match the canonical bytes.
    Mismatch { stated: &'a str, computed: String },
    /// The line does not end with `,"prev":"…","hash":"…"}`.
    Unsealed,
}

/// Checks one line's own hash (not its place in the chain).
#[must_use]
pub fn check(line: &str) -> Sealed<'_> {
    // `,"prev":"` + 64 + `","hash":"` + 64 + `"}`
    const TAIL: usize = 9 + 64 + 10 + 64 + 2;
    let bytes = line.as_bytes();
    if bytes.len() < TAIL + 1 {
        return Sealed::Unsealed;
    }
    let split = bytes.len() - TAIL;
    let tail = &bytes[split..];
    let hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if !tail.starts_with(b",\"prev\":\"")
        || &tail[73..83] != b"\",\"hash\":\""
        || &tail[147..] != b"\"}"
        || !hex(&tail[9..73])
        || !hex(&tail[83..147])
    {
        return Sealed::Unsealed;
    }
    // The tail is ASCII, so `split` is a character boundary.
    let (Some(body), Some(prev), Some(hash)) = (
        line.get(..split),
        line.get(split + 9..split + 73),
        line.get(split + 83..split + 147),
    ) else {
        return Sealed::Unsealed;
    };
    let mut canonical = Vec::with_capacity(body.len() + 9 + 64 + 2);
    canonical.extend_from_slice(body.as_bytes());
    canonical.extend_from_slice(b",\"prev\":\"");
    canonical.extend_from_slice(prev.as_bytes());
    canonical.extend_from_slice(b"\"}");
    let computed = sha256_hex(&canonical);
    if computed == hash {
        Sealed::Intact { prev, hash }
    } else {
        Sealed::Mismatch {
            stated: hash,
            computed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_check() {
        let (line, hash) = seal("{\"seq\":1,\"event\":\"x\"".to_owned(), GENESIS);
        assert!(line.ends_with(&format!(",\"prev\":\"{GENESIS}\",\"hash\":\"{hash}\"}}")));
        let canonical = format!("{{\"seq\":1,\"event\":\"x\",\"prev\":\"{GENESIS}\"}}");
        assert_eq!(hash, sha256_hex(canonical.as_bytes()));
        assert_eq!(
            check(&line),
            Sealed::Intact {
                prev: GENESIS,
                hash: &hash
            }
        );
        let edited = line.replace("\"x\"", "\"y\"");
        assert!(matches!(check(&edited), Sealed::Mismatch { .. }));
        for bad in [
            "",
            "{}",
            "{\"seq\":1}",
            &line[..line.len() - 1],
            "é".repeat(100).as_str(),
        ] {
            assert_eq!(check(bad), Sealed::Unsealed, "{bad}");
        }
        assert!(serde_json::from_str::<serde_json::Value>(&line).is_ok());
    }
}
