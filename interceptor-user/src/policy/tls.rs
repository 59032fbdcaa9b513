//! A target's `tls:` section: how the agent talks TLS to the workloads
//! (client leg) and to the server (server leg). Files named here are read
//! while the policy is parsed, so a missing or unreadable certificate is an
//! error with the policy's file, line and column, and a reload re-reads
//! them.

use std::{fmt, path::PathBuf, sync::Arc};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::{Deserialize, Serialize};

/// How the agent connects to the server (`tls.server`), as libpq's
/// `sslmode` names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTls {
    /// Never TLS to the server, even when the workload used TLS to the
    /// agent (audited on every session).
    Disable,
    /// TLS when the server offers it; plain otherwise, unless the workload
    /// asked for TLS (then the connection is refused rather than sent on in
    /// clear).
    #[default]
    Prefer,
    /// TLS, certificate not verified.
    Require,
    /// TLS, certificate chain verified against `server_ca` (or the system's
    /// roots), name not checked.
    VerifyCa,
    /// TLS, chain and name (`server_name`, else the target's address)
    /// verified.
    VerifyFull,
}

impl ServerTls {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Whether a server without TLS is refused.
    #[must_use]
    pub fn requires_tls(self) -> bool {
        matches!(self, Self::Require | Self::VerifyCa | Self::VerifyFull)
    }

    /// Whether the server's certificate chain is checked.
    #[must_use]
    pub fn verifies(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }
}

impl fmt::Display for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `tls:` section as written.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TlsSpecRaw {
    #[serde(default)]
    server: ServerTls,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server_ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
}

/// A target's TLS settings with the files they name already loaded.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(try_from = "TlsSpecRaw", into = "TlsSpecRaw")]
pub struct TlsSpec {
    pub server: ServerTls,
    pub server_ca: Option<PathBuf>,
    /// SNI and the name `verify-full` checks.
    pub server_name: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// What the files held, shared by every clone of this spec (the agent
    /// caches its TLS configurations by this pointer).
    pub material: Arc<TlsMaterial>,
}

/// Certificates and keys read from the files of a [`TlsSpec`].
#[derive(Debug, Default)]
pub struct TlsMaterial {
    /// Roots for `verify-*` (`server_ca`); `None` means the system's.
    pub server_roots: Option<Vec<CertificateDer<'static>>>,
    /// The certificate chain and key shown to workloads (`cert`/`key`).
    pub identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

impl From<TlsSpec> for TlsSpecRaw {
    fn from(s: TlsSpec) -> Self {
        Self {
            server: s.server,
            server_ca: s.server_ca,
            server_name: s.server_name,
            cert: s.cert,
            key: s.key,
        }
    }
}

impl TryFrom<TlsSpecRaw> for TlsSpec {
    type Error = String;

    fn try_from(raw: TlsSpecRaw) -> Result<Self, String> {
        let server_roots = match &raw.server_ca {
            Some(path) => {
                let roots = read_certs(path, "server_ca")?;
                let mut store = rustls::RootCertStore::empty();
                let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
                if added == 0 {
                    return Err(format!(
                        "tls.server_ca {}: no usable CA certificate in it",
                        path.display()
                    ));
                }
                Some(roots)
            }
            None => None,
        };
        if let Some(name) = &raw.server_name
            && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return Err(format!(
                "tls.server_name {name:?} is neither a DNS name nor an IP address"
            ));
        }
        if raw.server == ServerTls::Disable
            && (raw.server_ca.is_some() || raw.server_name.is_some())
        {
            return Err(
                "tls.server_ca and tls.server_name have no effect with tls.server: disable".into(),
            );
        }
        let identity = match (&raw.cert, &raw.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "cert")?;
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("tls.key {}: no private key read: {e}", key.display()))?;
                // Catches a key that does not belong to the certificate now,
                // not at the first workload's handshake.
                let provider = rustls::crypto::ring::default_provider();
                let signing = provider
                    .key_provider
                    .load_private_key(key_der.clone_key())
                    .map_err(|e| format!("tls.key {}: {e}", key.display()))?;
                let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
                certified.keys_match().map_err(|e| {
                    format!(
                        "tls.cert {} and tls.key {} do not belong together: {e}",
                        cert.display(),
                        key.display()
                    )
                })?;
                Some((chain, key_der))
            }
            (None, None) => None,
            _ => return Err("tls.cert and tls.key go together: give both or neither".into()),
        };
        Ok(Self {
            server: raw.server,
            server_ca: raw.server_ca,
            server_name: raw.server_name,
            cert: raw.cert,
            key: raw.key,
            material: Arc::new(TlsMaterial {
                server_roots,
                identity,
            }),
        })
    }
}

fn read_certs(path: &std::path::Path, field: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("tls.{field} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.{field} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.{field} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<TlsSpec, String> {
        serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn modes_and_defaults() {
        let s = parse("{}").unwrap();
        assert_eq!(s.server, ServerTls::Prefer);
        assert!(s.material.identity.is_none() && s.material.server_roots.is_none());
        for (text, mode) in [
            ("disable", ServerTls::Disable),
            ("prefer", ServerTls::Prefer),
            ("require", ServerTls::Require),
            ("verify-ca", ServerTls::VerifyCa),
            ("verify-full", ServerTls::VerifyFull),
        ] {
            assert_eq!(parse(&format!("server: {text}")).unwrap().server, mode);
            assert_eq!(mode.as_str(), text);
        }
        assert!(parse("server: allow").is_err());
        assert!(
            parse("sever: prefer")
                .unwrap_err()
                .contains("unknown field")
        );
    }

    #[test]
    fn files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let w = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let c = w("c.pem", &cert.pem());
        let k = w("k.pem", &key.serialize_pem());
        let o = w("o.pem", &other.serialize_pem());
        let junk = w("junk.pem", "not pem");
        let s = parse(&format!(
            "{{cert: {c}, key: {k}, server_ca: {c}, server: verify-full}}"
        ))
        .unwrap();
        assert!(s.material.identity.is_some());
        assert_eq!(s.material.server_roots.as_ref().unwrap().len(), 1);
        let e = parse(&format!("{{cert: {c}, key: {o}}}")).unwrap_err();
        assert!(e.contains("do not belong together"), "{e}");
        let e = parse(&format!("{{cert: {c}}}")).unwrap_err();
        assert!(e.contains("go together"), "{e}");
        let e = parse(&format!("{{server_ca: {junk}}}")).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = parse("{server_ca: /nonexistent/ca.pem}").unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let e = parse("{server: disable, server_name: db.test}").unwrap_err();
        assert!(e.contains("no effect"), "{e}");
        let e = parse("{server_name: 'not a name'}").unwrap_err();
        assert!(e.contains("neither"), "{e}");
    }
}
