//! TLS on both legs of a redirected connection (rustls, ring provider).
//!
//! The agent must see plaintext to decide, so it terminates TLS on each leg
//! separately: workloads get a certificate (the target's `cert`/`key`, or
//! one issued by the agent's own CA in `--state-dir`), and the agent opens
//! its own TLS session to the server as the target's `tls.server` says.
//! Configurations are built once per target (and, for issued certificates,
//! per destination address) and cached.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use serde::Serialize;

use crate::policy::{Protocol, ServerTls, TargetSpec, TlsMaterial};

mod ca;

pub use ca::{Ca, CaError};

/// How long a workload may take to complete its TLS handshake, and the
/// server its own.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// ALPN protocol of PostgreSQL's direct TLS (`sslnegotiation=direct`).
pub const ALPN_POSTGRES: &[u8] = b"postgresql";
/// Issued certificates are re-issued after this long (they are valid for
/// longer, see `ca.rs`).
const REISSUE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
/// Cached configurations are dropped all at once beyond this many (only
/// policy reloads and many distinct destinations of CIDR targets add
/// entries).
const MAX_CACHED: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the agent's CA is not available: {0}")]
    Ca(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// The agent's TLS state: the CA, the system roots, cached configurations.
pub struct TlsContext {
    provider: Arc<CryptoProvider>,
    /// The CA, loaded or created at start (`--state-dir`), or made in
    /// memory on first use where no state directory is given (tests).
    ca: OnceLock<Result<Arc<Ca>, String>>,
    system_roots: OnceLock<Arc<RootCertStore>>,
    acceptors: Mutex<HashMap<(usize, Option<IpAddr>), Acceptor>>,
    connectors: Mutex<HashMap<usize, Connector>>,
}

/// The material pointer of the cache key kept alive, and the configuration.
type Connector = (Arc<TlsMaterial>, Arc<ClientConfig>);

struct Acceptor {
    /// Keeps the pointer of the cache key from being reused.
    _material: Arc<TlsMaterial>,
    config: Arc<ServerConfig>,
    subject: Arc<str>,
    issued: bool,
    made: Instant,
}

/// The client leg's server side: what the agent shows a workload.
#[derive(Clone)]
pub struct ClientLegConfig {
    pub config: Arc<ServerConfig>,
    /// Subject of the certificate shown.
    pub subject: Arc<str>,
    /// Whether the agent's CA issued it (else it is the target's `cert`).
    pub issued: bool,
}

impl Default for TlsContext {
    fn default() -> Self {
        Self::with_ca(None)
    }
}

impl TlsContext {
    /// With the CA kept in `state_dir` (`ca.crt`, `ca.key`), created now if
    /// absent.
    ///
    /// # Errors
    /// When the files exist but cannot be read or used, or cannot be
    /// created.
    pub fn in_state_dir(state_dir: &Path) -> Result<Self, CaError> {
        let ca = Ca::load_or_create(state_dir)?;
        Ok(Self::with_ca(Some(Arc::new(ca))))
    }

    fn with_ca(ca: Option<Arc<Ca>>) -> Self {
        let cell = OnceLock::new();
        if let Some(ca) = ca {
            let _ = cell.set(Ok(ca));
        }
        Self {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            ca: cell,
            system_roots: OnceLock::new(),
            acceptors: Mutex::default(),
            connectors: Mutex::default(),
        }
    }

    /// The CA (made in memory when none was loaded).
    ///
    /// # Errors
    /// When it could not be made.
    pub fn ca(&self) -> Result<Arc<Ca>, TlsError> {
        self.ca
            .get_or_init(|| Ca::generate().map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(TlsError::Ca)
    }

    /// The configuration for workloads connecting to `target` at `dst`.
    ///
    /// # Errors
    /// When a certificate cannot be issued or the configuration built.
    pub fn client_leg(
        &self,
        target: &TargetSpec,
        dst: IpAddr,
    ) -> Result<ClientLegConfig, TlsError> {
        let material = &target.tls.material;
        let own = material.identity.is_some();
        let key = (
            Arc::as_ptr(material) as usize,
            if own { None } else { Some(dst) },
        );
        let mut cache = self
            .acceptors
            .lock()
            .map_err(|_| TlsError::Config("cache poisoned".into()))?;
        if let Some(a) = cache.get(&key)
            && (!a.issued || a.made.elapsed() < REISSUE_AFTER)
        {
            return Ok(ClientLegConfig {
                config: Arc::clone(&a.config),
                subject: Arc::clone(&a.subject),
                issued: a.issued,
            });
        }
        let (chain, key_der) = match &material.identity {
            Some((chain, key)) => (chain.clone(), key.clone_key()),
            None => {
                let names = leaf_names(target, dst);
                self.ca()?
                    .issue(&names)
                    .map_err(|e| TlsError::Ca(e.to_string()))?
            }
        };
        let subject: Arc<str> = chain
            .first()
            .map_or_else(String::new, |c| subject(c))
            .into();
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        if target.protocol == Protocol::Postgres {
            // libpq 17 offers it in both negotiation modes and requires it
            // back; older clients offer none, which rustls accepts.
            config.alpn_protocols = vec![ALPN_POSTGRES.to_vec()];
        }
        let config = Arc::new(config);
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(
            key,
            Acceptor {
                _material: Arc::clone(material),
                config: Arc::clone(&config),
                subject: Arc::clone(&subject),
                issued: !own,
                made: Instant::now(),
            },
        );
        Ok(ClientLegConfig {
            config,
            subject,
            issued: !own,
        })
    }

    /// The configuration for the agent's own TLS session to `target`'s
    /// server, as its `tls.server` says.
    ///
    /// # Errors
    /// When the roots cannot be used.
    pub fn server_leg(&self, target: &TargetSpec) -> Result<Arc<ClientConfig>, TlsError> {
        let material = &target.tls.material;
        let key = Arc::as_ptr(material) as usize;
        let mut cache = self
            .connectors
            .lock()
            .map_err(|_| TlsError::Config("cache poisoned".into()))?;
        if let Some((_, c)) = cache.get(&key) {
            return Ok(Arc::clone(c));
        }
        let verifier: Arc<dyn ServerCertVerifier> = if target.tls.server.verifies() {
            let roots = match &material.server_roots {
                Some(certs) => {
                    let mut store = RootCertStore::empty();
                    store.add_parsable_certificates(certs.iter().cloned());
                    Arc::new(store)
                }
                None => self.system_roots(),
            };
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                Arc::clone(&self.provider),
            )
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
            if target.tls.server == ServerTls::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        } else {
            Arc::new(Unverified(Arc::clone(&self.provider)))
        };
        let config = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let config = Arc::new(config);
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, (Arc::clone(material), Arc::clone(&config)));
        Ok(config)
    }

    fn system_roots(&self) -> Arc<RootCertStore> {
        Arc::clone(self.system_roots.get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!("system CA certificates: {e}");
            }
            let mut store = RootCertStore::empty();
            store.add_parsable_certificates(found.certs);
            Arc::new(store)
        }))
    }
}

/// The name the agent sends as SNI and checks with `verify-full`: the
/// target's `server_name`, else the address connected to.
#[must_use]
pub fn server_name(target: &TargetSpec, dst: IpAddr) -> ServerName<'static> {
    target
        .tls
        .server_name
        .as_deref()
        .and_then(|n| ServerName::try_from(n.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(dst.into()))
}

/// Names an issued certificate covers: the address the workload connected
/// to, the target's `server_name`, and `localhost` for loopback targets.
fn leaf_names(target: &TargetSpec, dst: IpAddr) -> Vec<String> {
    let mut names = vec![dst.to_string()];
    if let Some(n) = &target.tls.server_name {
        names.push(n.clone());
    }
    if dst.is_loopback() {
        names.push("localhost".into());
    }
    names
}

/// A certificate's subject as `CN=…, O=…` (empty when it does not parse).
#[must_use]
pub fn subject(cert: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, c)| c.tbs_certificate.subject.to_string())
        .unwrap_or_default()
}

/// What one leg negotiated, for the audit record.
#[derive(Clone, Debug, Serialize)]
pub struct LegInfo {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: String,
    pub cipher: String,
    /// Server leg: whether the server's certificate was verified
    /// (`verify-ca`, `verify-full`). Client leg: always false (the agent is
    /// the server there).
    pub server_cert_verified: bool,
    /// Subject of the server certificate of this leg: the agent's on the
    /// client leg, the server's on the server leg.
    pub subject: String,
    /// Client leg: the agent's CA issued the certificate shown (else the
    /// target's `cert`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_by_agent_ca: Option<bool>,
    /// Client leg: PostgreSQL direct TLS (no SSLRequest first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
    /// Client leg: the name the workload asked for (SNI).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Server leg: the target's `tls.server`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
}

impl LegInfo {
    /// From an established session.
    #[must_use]
    pub fn of(conn: &rustls::CommonState) -> Self {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            Some(v) => format!("{v:?}"),
            None => String::new(),
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| {
                let s = s.suite();
                s.as_str().map_or_else(|| format!("{s:?}"), str::to_owned)
            })
            .unwrap_or_default();
        Self {
            version,
            cipher,
            server_cert_verified: false,
            subject: String::new(),
            issued_by_agent_ca: None,
            direct: None,
            alpn: conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            sni: None,
            mode: None,
        }
    }
}

/// Both legs, as the `tls` member of `session` events: `null` for a plain
/// leg.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Legs {
    pub client: Option<LegInfo>,
    pub server: Option<LegInfo>,
    /// Why the server leg is plain although the workload used TLS (only
    /// `tls.server: disable` allows that).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_plain: Option<&'static str>,
}

/// `require` and `prefer`: any certificate, as libpq's `sslmode=require`
/// takes it; the handshake's signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a root, the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests;
