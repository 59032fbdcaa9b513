//! The agent's own certificate authority: made once in `--state-dir`
//! (`ca.crt`, and `ca.key` with mode 0600), it issues the certificates
//! workloads see for targets without a `cert`. Hand `ca.crt` to a workload
//! and `verify-full` works.

use std::{
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// The CA's validity.
const CA_DAYS: i64 = 3650;
/// An issued certificate's validity (re-issued well before, see `mod.rs`).
const LEAF_DAYS: i64 = 90;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Unusable { path: PathBuf, message: String },
    #[error("{path}: mode {mode:o} lets others read the CA key; make it 0600")]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("certificate: {0}")]
    Issue(#[from] rcgen::Error),
}

pub struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// Where `ca.crt` lives (none for an in-memory CA).
    pub cert_path: Option<PathBuf>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Ca {
    /// A CA that lives only in memory (tests, and runs without a state
    /// directory).
    ///
    /// # Errors
    /// When key generation fails.
    pub fn generate() -> Result<Self, CaError> {
        let (params, key) = ca_params()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
            cert_path: None,
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir`, or creates them when
    /// neither exists.
    ///
    /// # Errors
    /// When only one of them exists, either is unreadable or unusable, the
    /// key is readable by others, or they cannot be written.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => Self::create(dir, &cert_path, &key_path),
            (true, false) => Err(CaError::Unusable {
                path: key_path,
                message: "missing while ca.crt exists; restore it, or remove ca.crt to make a new CA (workloads must then trust the new ca.crt)".into(),
            }),
            (false, true) => Err(CaError::Unusable {
                path: cert_path,
                message: "missing while ca.key exists; restore it, or remove ca.key to make a new CA".into(),
            }),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let mode = std::fs::metadata(key_path)
            .map_err(io(key_path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::KeyMode {
                path: key_path.to_owned(),
                mode,
            });
        }
        let cert_pem = std::fs::read_to_string(cert_path).map_err(io(cert_path))?;
        let key_pem = std::fs::read_to_string(key_path).map_err(io(key_path))?;
        let unusable = |path: &Path, e: &dyn std::fmt::Display| CaError::Unusable {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| unusable(key_path, &e))?;
        let cert = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e: rustls_pki_types::pem::Error| unusable(cert_path, &e))?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| unusable(cert_path, &e))?;
        Ok(Self {
            cert,
            issuer,
            cert_path: Some(cert_path.to_owned()),
        })
    }

    fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (params, key) = ca_params()?;
        let cert = params.self_signed(&key)?;
        // The key first, created 0600 (never briefly readable), then the
        // certificate: a crash in between leaves a key without a
        // certificate, which the next start reports.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(key_path)
            .map_err(io(key_path))?;
        f.write_all(key.serialize_pem().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io(key_path))?;
        let tmp = dir.join("ca.crt.tmp");
        std::fs::write(&tmp, cert.pem()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, cert_path).map_err(io(cert_path))?;
        tracing::info!(
            "created the agent's CA: {} (give it to workloads that verify the server)",
            cert_path.display()
        );
        Ok(Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
            cert_path: Some(cert_path.to_owned()),
        })
    }

    /// The CA certificate.
    #[must_use]
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Issues a server certificate for `names` (IP addresses or DNS names;
    /// the first is the common name), with a fresh key. Returns the chain
    /// (leaf, then the CA) and the key.
    ///
    /// # Errors
    /// When a name is not valid in a certificate or signing fails.
    pub fn issue(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map_or("interceptor", String::as_str),
        );
        dn.push(DnType::OrganizationName, "Interceptor agent");
        params.distinguished_name = dn;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(LEAF_DAYS);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert.clone()], key))
    }
}

fn ca_params() -> Result<(CertificateParams, KeyPair), CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Interceptor agent CA");
    dn.push(DnType::OrganizationName, "Interceptor agent");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(CA_DAYS);
    Ok((params, KeyPair::generate()?))
}
