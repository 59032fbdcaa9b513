use std::os::unix::fs::PermissionsExt as _;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::policy::PolicyFile;

fn target(tls: &str) -> TargetSpec {
    let text = format!(
        "version: 1\ntargets:\n  - {{name: pg, protocol: postgres, address: '127.0.0.1:5432', tls: {tls}}}\n"
    );
    PolicyFile::parse(&text, Path::new("test.yaml"))
        .unwrap()
        .targets
        .remove(0)
}

#[test]
fn ca_is_created_once_with_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = Ca::load_or_create(dir.path()).unwrap();
    let mode = std::fs::metadata(dir.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let b = Ca::load_or_create(dir.path()).unwrap();
    assert_eq!(a.cert(), b.cert(), "the second start loads the same CA");
    // A certificate issued after the reload chains to the first CA.
    let (chain, _) = b.issue(&["127.0.0.1".into()]).unwrap();
    assert_eq!(&chain[1], a.cert());

    std::fs::set_permissions(
        dir.path().join("ca.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let e = Ca::load_or_create(dir.path()).unwrap_err();
    assert!(e.to_string().contains("0600"), "{e}");
    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let e = Ca::load_or_create(dir.path()).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn issued_certificate_names_the_target() {
    let t = target("{server_name: db.example.test}");
    let names = leaf_names(&t, "127.0.0.1".parse().unwrap());
    assert_eq!(names, ["127.0.0.1", "db.example.test", "localhost"]);
    let ctx = TlsContext::default();
    let leg = ctx.client_leg(&t, "127.0.0.1".parse().unwrap()).unwrap();
    assert!(leg.issued);
    assert!(leg.subject.contains("CN=127.0.0.1"), "{}", leg.subject);
    assert_eq!(leg.config.alpn_protocols, [ALPN_POSTGRES.to_vec()]);
    // Cached: the same configuration for the same target and address.
    let again = ctx.client_leg(&t, "127.0.0.1".parse().unwrap()).unwrap();
    assert!(Arc::ptr_eq(&leg.config, &again.config));
}

/// One handshake in memory: the agent's client-leg configuration against
/// its own server-leg configuration for `server` (with `server_name`).
async fn handshake(
    acceptor: Arc<ServerConfig>,
    connector: Arc<ClientConfig>,
    name: &str,
) -> Result<LegInfo, String> {
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut s = tokio_rustls::TlsAcceptor::from(acceptor)
            .accept(a)
            .await
            .ok()?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.ok()?;
        s.write_all(&buf).await.ok()?;
        s.flush().await.ok()
    });
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut c = tokio_rustls::TlsConnector::from(connector)
        .connect(name, b)
        .await
        .map_err(|e| e.to_string())?;
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    let _ = server.await;
    Ok(LegInfo::of(c.get_ref().1))
}

#[tokio::test]
async fn server_leg_modes_verify_as_named() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = TlsContext::in_state_dir(dir.path()).unwrap();
    let ca = dir.path().join("ca.crt").display().to_string();
    // A "server" presenting a certificate from the agent's CA for 127.0.0.1.
    let server = ctx
        .client_leg(&target("{}"), "127.0.0.1".parse().unwrap())
        .unwrap()
        .config;
    let full = target(&format!("{{server: verify-full, server_ca: {ca}}}"));
    let info = handshake(
        Arc::clone(&server),
        ctx.server_leg(&full).unwrap(),
        "127.0.0.1",
    )
    .await
    .unwrap();
    assert_eq!(info.version, "TLSv1.3");
    assert!(info.cipher.starts_with("TLS13_"), "{}", info.cipher);
    // The wrong name: verify-full refuses, verify-ca accepts.
    let e = handshake(
        Arc::clone(&server),
        ctx.server_leg(&full).unwrap(),
        "other.test",
    )
    .await
    .unwrap_err();
    assert!(e.contains("not valid for name"), "{e}");
    let ca_only = target(&format!("{{server: verify-ca, server_ca: {ca}}}"));
    handshake(
        Arc::clone(&server),
        ctx.server_leg(&ca_only).unwrap(),
        "other.test",
    )
    .await
    .unwrap();
    // Another CA's roots: both verify modes refuse, require accepts.
    let other = tempfile::tempdir().unwrap();
    Ca::load_or_create(other.path()).unwrap();
    let wrong = other.path().join("ca.crt").display().to_string();
    let wrong = target(&format!("{{server: verify-ca, server_ca: {wrong}}}"));
    let e = handshake(
        Arc::clone(&server),
        ctx.server_leg(&wrong).unwrap(),
        "127.0.0.1",
    )
    .await
    .unwrap_err();
    // Both CAs have the same name, so webpki finds the issuer by name and
    // the signature fails.
    assert!(e.contains("invalid peer certificate"), "{e}");
    let require = target("{server: require}");
    handshake(server, ctx.server_leg(&require).unwrap(), "127.0.0.1")
        .await
        .unwrap();
}

#[test]
fn default_sni_is_the_address() {
    let t = target("{}");
    assert_eq!(
        server_name(&t, "10.0.0.5".parse().unwrap()),
        ServerName::try_from("10.0.0.5").unwrap()
    );
    let t = target("{server_name: db.example.test}");
    assert_eq!(
        server_name(&t, "10.0.0.5".parse().unwrap()),
        ServerName::try_from("db.example.test").unwrap()
    );
}
