//! Certificates made by the tests (rcgen): a CA of the test's own and
//! server certificates it issues, written as PEM files.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A test CA in a directory of its own.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    /// `ca.pem`: the CA certificate (give it to whoever verifies).
    pub cert: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and key issued by a [`TestCa`].
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A CA named `name`.
    #[must_use]
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Servers running as other users read the files.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = dir.path().join("ca.pem");
        fs::write(&path, cert.pem()).unwrap();
        Self {
            dir,
            cert: path,
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (IP addresses or DNS names), its
    /// key readable only by `owner` (uid, gid) when given.
    #[must_use]
    pub fn issue(&self, file: &str, names: &[&str], owner: Option<(u32, u32)>) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("test"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_path = self.dir.path().join(format!("{file}.crt"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        fs::write(&cert_path, cert.pem()).unwrap();
        fs::write(&key_path, key.serialize_pem()).unwrap();
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = owner {
            chown(&key_path, uid, gid);
            chown(&cert_path, uid, gid);
        }
        Issued {
            cert: cert_path,
            key: key_path,
        }
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    nix::unistd::chown(path, Some(uid.into()), Some(gid.into())).unwrap();
}

/// uid and gid of a system user.
#[must_use]
pub fn ids(user: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(user)
        .unwrap()
        .unwrap_or_else(|| panic!("no user {user}: run `cargo xtask setup`"));
    (u.uid.as_raw(), u.gid.as_raw())
}
