//! Query-shape fingerprints: a hash of the canonical text.
//!
//! The hash is SHA-256 (hardware-accelerated where the CPU has SHA
//! extensions), not a fast non-cryptographic hash, because fingerprints key
//! decisions: the decision cache serves a cached `allow` to any statement
//! with the same key, and policies pin allowed shapes by fingerprint. A
//! workload able to craft a text colliding with an allowed shape would
//! bypass the policy; with SHA-256 that needs a 2^64 second preimage for a
//! pinned fingerprint and a 2^64 birthday search for the 128-bit cache key.
//! It is computed once per shape: the facts cache in front of it is found by
//! a keyed hash and compares the canonical text itself.

use std::fmt;

use sha2::{Digest as _, Sha256};

use super::Dialect;

/// The fingerprint of one statement shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    /// Public 64-bit fingerprint, shown as `v1:<16 hex>`.
    pub id: u64,
    /// 128-bit key for caches (collision-resistant).
    pub key: u128,
}

/// Bumped when the canonical text changes, so old fingerprints never
/// silently match new shapes.
const VERSION_TAG: &[u8] = b"interceptor-fingerprint-v1\0";

impl Fingerprint {
    /// Hashes a statement's canonical text (see [`super::normalize`]).
    #[must_use]
    pub fn of(canonical: &str, dialect: Dialect) -> Self {
        let mut h = Sha256::new();
        h.update(VERSION_TAG);
        h.update(match dialect {
            Dialect::Postgres => b"pg\0",
            Dialect::Mysql => b"my\0",
        });
        h.update(canonical.as_bytes());
        let d = h.finalize();
        let mut k = [0u8; 16];
        k.copy_from_slice(&d[..16]);
        let key = u128::from_be_bytes(k);
        Self {
            id: (key >> 64) as u64,
            key,
        }
    }

    /// Parses `v1:<16 hex>` into the public id.
    #[must_use]
    pub fn parse_id(s: &str) -> Option<u64> {
        let hex = s.strip_prefix("v1:")?;
        if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v1:{:016x}", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_parseable() {
        let a = Fingerprint::of("select 0", Dialect::Postgres);
        let b = Fingerprint::of("select 0", Dialect::Mysql);
        assert_ne!(a, b);
        let s = a.to_string();
        assert!(s.starts_with("v1:") && s.len() == 19, "{s}");
        assert_eq!(Fingerprint::parse_id(&s), Some(a.id));
        assert_eq!(Fingerprint::parse_id("v2:0000000000000000"), None);
        assert_eq!(Fingerprint::parse_id("v1:xyz"), None);
    }
}
