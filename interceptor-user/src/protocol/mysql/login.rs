//! A brokered MySQL/MariaDB login: the agent answers the server's
//! authentication with the secret of the target's `logins:` entry, in the
//! plugin the server asks for:
//!
//! - `mysql_native_password`;
//! - `caching_sha2_password`, fast path (scramble) and full path (the
//!   password over TLS, or encrypted with the server's RSA key);
//! - `sha256_password` (over TLS, or with the server's RSA key);
//! - MariaDB's `client_ed25519`;
//! - `mysql_clear_password`, over TLS only.
//!
//! The workload's own response is never forwarded: the session sends the
//! server a handshake response (or COM_CHANGE_USER) carrying the agent's
//! answer instead, then this module follows the exchange (AuthSwitchRequest,
//! AuthMoreData) to the server's OK or ERR.

use bytes::BytesMut;
use ed25519_dalek::{
    VerifyingKey,
    hazmat::{ExpandedSecretKey, raw_sign},
};
use rsa::{Oaep, RsaPublicKey, pkcs1::DecodeRsaPublicKey as _, pkcs8::DecodePublicKey as _};
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::codec::{cstr, decode_message, err_fields, packet};
use crate::{policy::Secret, protocol::LoginError};

pub const NATIVE: &str = "mysql_native_password";
pub const CACHING_SHA2: &str = "caching_sha2_password";
pub const SHA256: &str = "sha256_password";
pub const ED25519: &str = "client_ed25519";
pub const CLEAR: &str = "mysql_clear_password";

/// Largest packet the server may send while authenticating.
const MAX_AUTH_PACKET: usize = 64 * 1024;

/// `caching_sha2_password`'s AuthMoreData codes.
const FAST_AUTH_OK: u8 = 3;
const FULL_AUTH: u8 = 4;
/// What a client sends to ask for the server's RSA public key
/// (`caching_sha2_password`; `sha256_password` takes 1).
const REQUEST_KEY_SHA2: u8 = 2;
const REQUEST_KEY_SHA256: u8 = 1;

/// The plugin the agent answers a greeting naming `offered` with (its
/// default plugin): that one where the agent can answer it in the first
/// packet, else `mysql_native_password` (the server switches if the
/// account uses something else).
#[must_use]
pub fn first_plugin(offered: Option<&str>, tls: bool) -> &'static str {
    match offered {
        Some(CACHING_SHA2) => CACHING_SHA2,
        Some(SHA256) if tls => SHA256,
        _ => NATIVE,
    }
}

/// The agent's first answer in `plugin` to `scramble` (a greeting's or an
/// AuthSwitchRequest's).
///
/// # Errors
/// A plugin the agent cannot answer, or cleartext asked for without TLS.
pub fn answer(
    plugin: &str,
    scramble: &[u8],
    password: &Secret,
    tls: bool,
) -> Result<Vec<u8>, LoginError> {
    let pw = password.expose();
    match plugin {
        NATIVE => Ok(native_scramble(pw, scramble)),
        CACHING_SHA2 => Ok(sha2_scramble(pw, scramble)),
        SHA256 if tls => Ok(cleartext(pw)),
        // An empty password goes as one NUL; else ask for the key.
        SHA256 if pw.is_empty() => Ok(vec![0]),
        SHA256 => Ok(vec![REQUEST_KEY_SHA256]),
        ED25519 => Ok(ed25519_sign(pw, scramble)),
        CLEAR if tls => Ok(cleartext(pw)),
        CLEAR => Err(LoginError::Unsupported(
            "the server asks for the password in clear (mysql_clear_password) on a connection \
             without TLS; set tls.server: require on the target"
                .into(),
        )),
        other => Err(LoginError::Unsupported(format!(
            "the server asks for the auth plugin {other:?}, which the agent cannot use for a brokered login"
        ))),
    }
}

/// The known plugin named `name`, as a static name for the audit record.
fn known(name: &[u8]) -> Result<&'static str, LoginError> {
    [NATIVE, CACHING_SHA2, SHA256, ED25519, CLEAR]
        .into_iter()
        .find(|p| p.as_bytes() == name)
        .ok_or_else(|| {
            LoginError::Unsupported(format!(
                "the server asks for the auth plugin {:?}, which the agent cannot use for a brokered login",
                String::from_utf8_lossy(name)
            ))
        })
}

/// What the agent's login ended with: the server's OK payload, the plugin
/// that authenticated.
#[derive(Debug)]
pub struct LoggedIn {
    pub ok: Vec<u8>,
    pub method: &'static str,
}

/// Follows the server's side of the authentication after the agent's first
/// answer (sent in `plugin` with sequence id `seq - 1`) to its OK.
///
/// # Errors
/// The server's ERR, a plugin or request the agent cannot answer, protocol
/// violations and I/O errors.
pub async fn login<S>(
    server: &mut S,
    buf: &mut BytesMut,
    mut seq: u8,
    mut plugin: &'static str,
    mut scramble: Vec<u8>,
    password: &Secret,
    tls: bool,
) -> Result<LoggedIn, LoginError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let pw = password.expose();
    // Full path asked for: the next AuthMoreData is the server's key.
    let mut awaiting_key = false;
    loop {
        let msg = loop {
            match decode_message(buf, seq, MAX_AUTH_PACKET) {
                Ok(Some(m)) => break m,
                Ok(None) => {}
                Err(e) => return Err(LoginError::Protocol(e.to_string())),
            }
            if server.read_buf(buf).await? == 0 {
                return Err(LoginError::Protocol(
                    "the server closed the connection during authentication".into(),
                ));
            }
        };
        let payload = msg.payload();
        let reply = match payload.first() {
            Some(0x00) => {
                return Ok(LoggedIn {
                    ok: payload.into_owned(),
                    method: plugin,
                });
            }
            Some(0xff) => {
                let (code, message) = err_fields(&payload).map_or_else(
                    || ("0".to_owned(), "authentication failed".to_owned()),
                    |f| {
                        (
                            f.code.to_string(),
                            String::from_utf8_lossy(f.message).into_owned(),
                        )
                    },
                );
                return Err(LoginError::Refused { code, message });
            }
            // AuthSwitchRequest: a plugin and its data (a scramble; native
            // and caching_sha2 end it with a NUL).
            Some(0xfe) => {
                let (name, data) = payload
                    .get(1..)
                    .and_then(cstr)
                    .ok_or_else(|| LoginError::Unsupported(
                        "the server asks for the pre-4.1 password hash (mysql_old_password), which the agent cannot use"
                            .into(),
                    ))?;
                plugin = known(name)?;
                scramble = data.strip_suffix(&[0]).unwrap_or(data).to_vec();
                awaiting_key = false;
                answer(plugin, &scramble, password, tls)?
            }
            // AuthMoreData: the plugin goes on.
            Some(0x01) => {
                let data = &payload[1..];
                match plugin {
                    CACHING_SHA2 if !awaiting_key && data == [FAST_AUTH_OK] => {
                        // The OK follows.
                        seq = msg.last_seq.wrapping_add(1);
                        continue;
                    }
                    CACHING_SHA2 if !awaiting_key && data == [FULL_AUTH] => {
                        if tls {
                            cleartext(pw)
                        } else {
                            awaiting_key = true;
                            vec![REQUEST_KEY_SHA2]
                        }
                    }
                    CACHING_SHA2 | SHA256 => {
                        awaiting_key = false;
                        rsa_encrypt(pw, &scramble, data)?
                    }
                    other => {
                        return Err(LoginError::Protocol(format!(
                            "unexpected AuthMoreData for {other}"
                        )));
                    }
                }
            }
            _ => {
                return Err(LoginError::Protocol(format!(
                    "unexpected packet during authentication (first byte {:?})",
                    payload.first()
                )));
            }
        };
        let next = msg.last_seq.wrapping_add(1);
        server.write_all(&packet(next, &reply)).await?;
        server.flush().await?;
        seq = next.wrapping_add(1);
    }
}

/// `mysql_native_password`: SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))).
#[must_use]
pub fn native_scramble(password: &str, nonce: &[u8]) -> Vec<u8> {
    xor_scramble::<Sha1>(password, nonce, true)
}

/// `caching_sha2_password`'s fast path:
/// SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce).
#[must_use]
pub fn sha2_scramble(password: &str, nonce: &[u8]) -> Vec<u8> {
    xor_scramble::<Sha256>(password, nonce, false)
}

/// H(pw) XOR H(nonce + H(H(pw))) (`nonce_first`) or H(pw) XOR
/// H(H(H(pw)) + nonce); nothing for an empty password.
fn xor_scramble<D: Digest>(password: &str, nonce: &[u8], nonce_first: bool) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let h1 = D::digest(password.as_bytes());
    let h2 = D::digest(&h1);
    let mut h = D::new();
    if nonce_first {
        h.update(nonce);
        h.update(&h2);
    } else {
        h.update(&h2);
        h.update(nonce);
    }
    let h3 = h.finalize();
    h1.iter().zip(h3.iter()).map(|(a, b)| a ^ b).collect()
}

/// MariaDB's `ed25519`: an Ed25519 signature of the nonce whose expanded
/// secret key is SHA-512 of the password (where standard Ed25519 hashes a
/// 32-byte seed); the server holds the matching public key.
#[must_use]
pub fn ed25519_sign(password: &str, nonce: &[u8]) -> Vec<u8> {
    let expanded: [u8; 64] = Sha512::digest(password.as_bytes()).into();
    let key = ExpandedSecretKey::from_bytes(&expanded);
    let public = VerifyingKey::from(&key);
    raw_sign::<Sha512>(&key, nonce, &public).to_bytes().to_vec()
}

fn cleartext(password: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(password.len() + 1);
    v.extend_from_slice(password.as_bytes());
    v.push(0);
    v
}

/// The full path without TLS: (pw + NUL) XOR the scramble (repeated),
/// encrypted with the server's RSA public key (PEM) under OAEP/SHA-1.
fn rsa_encrypt(password: &str, scramble: &[u8], pem: &[u8]) -> Result<Vec<u8>, LoginError> {
    let bad = |e: &dyn std::fmt::Display| {
        LoginError::Protocol(format!("the server's RSA public key: {e}"))
    };
    let pem = std::str::from_utf8(pem).map_err(|e| bad(&e))?;
    let pem = pem.trim_end_matches('\0');
    let key = RsaPublicKey::from_public_key_pem(pem)
        .or_else(|_| RsaPublicKey::from_pkcs1_pem(pem))
        .map_err(|e| bad(&e))?;
    let mut plain = cleartext(password);
    if !scramble.is_empty() {
        for (i, b) in plain.iter_mut().enumerate() {
            *b ^= scramble[i % scramble.len()];
        }
    }
    key.encrypt(&mut rand_core::OsRng, Oaep::new::<Sha1>(), &plain)
        .map_err(|e| LoginError::Protocol(format!("encrypting with the server's RSA key: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use ed25519_dalek::{Signature, Verifier as _};
    use rsa::{RsaPrivateKey, pkcs8::EncodePublicKey as _};
    use tokio::io::duplex;

    use super::*;
    use crate::protocol::mysql::codec::{HEADER, decode_header};

    const NONCE: &[u8; 20] = b"0123456789abcdefghij";

    /// The server's check of a native answer: it holds SHA1(SHA1(pw)).
    #[test]
    fn native_answer_passes_the_servers_check() {
        let stored = Sha1::digest(Sha1::digest(b"secret"));
        let r = native_scramble("secret", NONCE);
        let mut h = Sha1::new();
        h.update(NONCE);
        h.update(stored);
        let x: Vec<u8> = r.iter().zip(h.finalize()).map(|(a, b)| a ^ b).collect();
        assert_eq!(Sha1::digest(&x), stored);
        assert!(native_scramble("", NONCE).is_empty());
    }

    /// The server's check of a caching_sha2 fast-path answer: it holds
    /// SHA256(SHA256(pw)).
    #[test]
    fn sha2_answer_passes_the_servers_check() {
        let stored = Sha256::digest(Sha256::digest(b"secret"));
        let r = sha2_scramble("secret", NONCE);
        let mut h = Sha256::new();
        h.update(stored);
        h.update(NONCE);
        let x: Vec<u8> = r.iter().zip(h.finalize()).map(|(a, b)| a ^ b).collect();
        assert_eq!(Sha256::digest(&x), stored);
    }

    /// The signature verifies under the public key MariaDB derives from
    /// the password (the scalar of SHA-512(pw), clamped, times the base).
    #[test]
    fn ed25519_signature_verifies_under_the_password_key() {
        let expanded: [u8; 64] = Sha512::digest(b"secret").into();
        let public = VerifyingKey::from(&ExpandedSecretKey::from_bytes(&expanded));
        let sig =
            Signature::from_slice(&ed25519_sign("secret", b"nonce-32-bytes-long-0123456789ab"))
                .unwrap();
        public
            .verify(b"nonce-32-bytes-long-0123456789ab", &sig)
            .unwrap();
        assert!(public.verify(b"another nonce", &sig).is_err());
    }

    async fn read_packet(s: &mut tokio::io::DuplexStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; HEADER];
        s.read_exact(&mut head).await.unwrap();
        let h = decode_header(&head).unwrap();
        let mut body = vec![0u8; h.len];
        s.read_exact(&mut body).await.unwrap();
        (h.seq, body)
    }

    async fn send(s: &mut tokio::io::DuplexStream, seq: u8, payload: &[u8]) {
        s.write_all(&packet(seq, payload)).await.unwrap();
    }

    const OK: &[u8] = &[0, 0, 0, 2, 0, 0, 0];

    /// A scripted caching_sha2 server: fast path, full path over TLS, full
    /// path with the RSA key (decrypted and checked here), and a switch to
    /// native, each ending in the OK the session hands to the workload.
    #[tokio::test]
    async fn caching_sha2_fast_full_and_rsa_paths() {
        let secret = Secret::from_test("pa55word");
        // Fast path.
        let (mut agent, mut server) = duplex(4096);
        let srv = tokio::spawn(async move {
            send(&mut server, 2, &[1, FAST_AUTH_OK]).await;
            send(&mut server, 3, OK).await;
        });
        let mut buf = BytesMut::new();
        let done = login(
            &mut agent,
            &mut buf,
            2,
            CACHING_SHA2,
            NONCE.to_vec(),
            &secret,
            false,
        )
        .await
        .unwrap();
        assert_eq!((done.ok.as_slice(), done.method), (OK, CACHING_SHA2));
        srv.await.unwrap();

        // Full path over TLS: the password in clear.
        let (mut agent, mut server) = duplex(4096);
        let srv = tokio::spawn(async move {
            send(&mut server, 2, &[1, FULL_AUTH]).await;
            let (seq, body) = read_packet(&mut server).await;
            assert_eq!((seq, body.as_slice()), (3, &b"pa55word\0"[..]));
            send(&mut server, 4, OK).await;
        });
        let done = login(
            &mut agent,
            &mut BytesMut::new(),
            2,
            CACHING_SHA2,
            NONCE.to_vec(),
            &secret,
            true,
        )
        .await
        .unwrap();
        assert_eq!(done.method, CACHING_SHA2);
        srv.await.unwrap();

        // Full path without TLS: key requested, password encrypted.
        let private = RsaPrivateKey::new(&mut rand_core::OsRng, 1024).unwrap();
        let pem = private
            .to_public_key()
            .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap();
        let (mut agent, mut server) = duplex(8192);
        let srv = tokio::spawn(async move {
            send(&mut server, 2, &[1, FULL_AUTH]).await;
            let (seq, body) = read_packet(&mut server).await;
            assert_eq!((seq, body.as_slice()), (3, &[REQUEST_KEY_SHA2][..]));
            let mut more = vec![1];
            more.extend_from_slice(pem.as_bytes());
            send(&mut server, 4, &more).await;
            let (seq, body) = read_packet(&mut server).await;
            assert_eq!(seq, 5);
            let plain = private.decrypt(Oaep::new::<Sha1>(), &body).unwrap();
            let pw: Vec<u8> = plain
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ NONCE[i % NONCE.len()])
                .collect();
            assert_eq!(pw, b"pa55word\0");
            send(&mut server, 6, OK).await;
        });
        login(
            &mut agent,
            &mut BytesMut::new(),
            2,
            CACHING_SHA2,
            NONCE.to_vec(),
            &secret,
            false,
        )
        .await
        .unwrap();
        srv.await.unwrap();

        // Switch to native with a new scramble, then an ERR.
        let (mut agent, mut server) = duplex(4096);
        let srv = tokio::spawn(async move {
            let mut switch = b"\xfemysql_native_password\0".to_vec();
            switch.extend_from_slice(b"ABCDEFGHIJKLMNOPQRST\0");
            send(&mut server, 2, &switch).await;
            let (seq, body) = read_packet(&mut server).await;
            assert_eq!(seq, 3);
            assert_eq!(body, native_scramble("pa55word", b"ABCDEFGHIJKLMNOPQRST"));
            let mut err = vec![0xff, 0x15, 0x04, b'#'];
            err.extend_from_slice(b"28000Access denied");
            send(&mut server, 4, &err).await;
        });
        let e = login(
            &mut agent,
            &mut BytesMut::new(),
            2,
            CACHING_SHA2,
            NONCE.to_vec(),
            &secret,
            false,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, LoginError::Refused { code, message } if code == "1045" && message == "Access denied"),
            "{e:?}"
        );
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn what_the_agent_cannot_answer_is_said() {
        let secret = Secret::from_test("pw");
        for (switch, want) in [
            (b"\xfe".to_vec(), "mysql_old_password"),
            (
                b"\xfeauth_gssapi_client\0xyz".to_vec(),
                "auth_gssapi_client",
            ),
            (
                b"\xfemysql_clear_password\0".to_vec(),
                "tls.server: require",
            ),
        ] {
            let (mut agent, mut server) = duplex(4096);
            send(&mut server, 2, &switch).await;
            let e = login(
                &mut agent,
                &mut BytesMut::new(),
                2,
                NATIVE,
                NONCE.to_vec(),
                &secret,
                false,
            )
            .await
            .unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        // The server leaves, or sends garbage.
        let (mut agent, server) = duplex(4096);
        drop(server);
        let e = login(
            &mut agent,
            &mut BytesMut::new(),
            2,
            NATIVE,
            NONCE.to_vec(),
            &secret,
            false,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
        let (mut agent, mut server) = duplex(4096);
        send(&mut server, 7, OK).await;
        let e = login(
            &mut agent,
            &mut BytesMut::new(),
            2,
            NATIVE,
            NONCE.to_vec(),
            &secret,
            false,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, LoginError::Protocol(_)), "{e}");
    }
}
