//! A brokered login: the agent, not the workload, answers the server's
//! authentication requests with the secret of the target's `logins:` entry
//! (SCRAM-SHA-256, SCRAM-SHA-256-PLUS bound to the agent's own TLS leg,
//! md5, cleartext). The workload never sees an authentication request,
//! only the server's `AuthenticationOk` and what follows it.
//!
//! The SCRAM client is `postgres-protocol`'s, the one tokio-postgres uses.

use bytes::{Buf as _, BytesMut};
use postgres_protocol::authentication::{
    md5_hash,
    sasl::{ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256},
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::codec::{self, cstr, error_fields};
use crate::policy::Secret;

/// Largest message the server may send while authenticating.
const MAX_AUTH_FRAME: usize = 64 * 1024;

pub use crate::protocol::LoginError;

/// The server's certificate, for SCRAM-SHA-256-PLUS (`tls-server-end-point`).
pub struct ServerCert<'a>(pub Option<&'a [u8]>);

/// Runs the authentication exchange on `server` (the startup message sent
/// already) as `user` with `password`. Returns what the server has sent
/// from its `AuthenticationOk` on (the relay forwards it to the workload)
/// and the method the server asked for.
///
/// # Errors
/// The server's refusal, a method the agent cannot broker, protocol
/// violations and I/O errors.
pub async fn login<S>(
    server: &mut S,
    user: &str,
    password: &Secret,
    cert: &ServerCert<'_>,
) -> Result<(BytesMut, &'static str), LoginError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let mut scram: Option<ScramSha256> = None;
    // `trust` when the server asks for nothing.
    let mut method = "trust";
    loop {
        let frame = loop {
            if let Some(h) = codec::decode_header(&buf, MAX_AUTH_FRAME)
                .map_err(|e| LoginError::Protocol(e.to_string()))?
                && buf.len() >= h.total
            {
                break h;
            }
            if server.read_buf(&mut buf).await? == 0 {
                return Err(LoginError::Protocol(
                    "the server closed the connection during authentication".into(),
                ));
            }
        };
        let body = &buf[5..frame.total];
        match frame.tag {
            b'R' => {
                let (code, data) = body
                    .split_first_chunk::<4>()
                    .map(|(c, d)| (u32::from_be_bytes(*c), d))
                    .ok_or_else(|| LoginError::Protocol("short Authentication message".into()))?;
                if code == 0 {
                    if scram.as_ref().is_some() {
                        return Err(LoginError::Protocol(
                            "AuthenticationOk before SCRAM finished".into(),
                        ));
                    }
                    return Ok((buf, method));
                }
                let (reply, m) = answer(code, data, user, password, cert, &mut scram)?;
                if let Some(m) = m {
                    method = m;
                }
                server.write_all(&reply).await?;
                server.flush().await?;
            }
            b'E' => {
                let f = error_fields(body);
                return Err(LoginError::Refused {
                    code: f.code.unwrap_or("28000").to_owned(),
                    message: f.message.unwrap_or("authentication failed").to_owned(),
                });
            }
            // A notice during authentication is the server's business.
            b'N' => {}
            other => {
                return Err(LoginError::Protocol(format!(
                    "message {:?} during authentication",
                    char::from(other)
                )));
            }
        }
        buf.advance(frame.total);
    }
}

/// The PasswordMessage / SASL message answering one Authentication request,
/// and the method it starts.
fn answer(
    code: u32,
    data: &[u8],
    user: &str,
    password: &Secret,
    cert: &ServerCert<'_>,
    scram: &mut Option<ScramSha256>,
) -> Result<(bytes::Bytes, Option<&'static str>), LoginError> {
    let pw = password.expose().as_bytes();
    match code {
        // Cleartext.
        3 => Ok((password_message(pw), Some("password"))),
        // MD5, with a 4-byte salt.
        5 => {
            let salt = data
                .first_chunk::<4>()
                .ok_or_else(|| LoginError::Protocol("MD5 request without a salt".into()))?;
            Ok((
                password_message(md5_hash(user.as_bytes(), pw, *salt).as_bytes()),
                Some("md5"),
            ))
        }
        // SASL: the mechanisms offered.
        10 => {
            if scram.is_some() {
                return Err(LoginError::Protocol("a second AuthenticationSASL".into()));
            }
            let offered = mechanisms(data);
            let plus = offered.contains(&SCRAM_SHA_256_PLUS);
            let (mechanism, binding) = match (cert.0, plus) {
                (Some(der), true) => (SCRAM_SHA_256_PLUS, end_point(der)?),
                (Some(_), false) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                (None, _) => (SCRAM_SHA_256, ChannelBinding::unsupported()),
            };
            if !offered.contains(&mechanism) {
                return Err(LoginError::Unsupported(format!(
                    "the server offers SASL mechanisms {offered:?}, none of which the agent can use"
                )));
            }
            let s = ScramSha256::new(pw, binding);
            let mut body = Vec::with_capacity(64);
            body.extend_from_slice(mechanism.as_bytes());
            body.push(0);
            let len = i32::try_from(s.message().len()).unwrap_or(i32::MAX);
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(s.message());
            *scram = Some(s);
            Ok((codec::frame(b'p', &body), Some(mechanism)))
        }
        // SASLContinue: the server-first message.
        11 => {
            let s = scram
                .as_mut()
                .ok_or_else(|| LoginError::Protocol("SASLContinue before SASL".into()))?;
            s.update(data)
                .map_err(|e| LoginError::Protocol(format!("SCRAM: {e}")))?;
            Ok((codec::frame(b'p', s.message()), None))
        }
        // SASLFinal: the server's signature, checked.
        12 => {
            let mut s = scram
                .take()
                .ok_or_else(|| LoginError::Protocol("SASLFinal before SASL".into()))?;
            s.finish(data)
                .map_err(|e| LoginError::Protocol(format!("SCRAM: the server's signature: {e}")))?;
            // Nothing to send; AuthenticationOk follows.
            Ok((bytes::Bytes::new(), None))
        }
        2 => Err(unsupported("Kerberos V5")),
        6 => Err(unsupported("SCM credentials")),
        7 | 8 => Err(unsupported("GSSAPI")),
        9 => Err(unsupported("SSPI")),
        other => Err(LoginError::Protocol(format!(
            "unknown authentication request {other}"
        ))),
    }
}

fn unsupported(method: &str) -> LoginError {
    LoginError::Unsupported(format!(
        "the server asks for {method} authentication, which the agent cannot do for a brokered login"
    ))
}

fn password_message(pw: &[u8]) -> bytes::Bytes {
    let mut body = Vec::with_capacity(pw.len() + 1);
    body.extend_from_slice(pw);
    body.push(0);
    codec::frame(b'p', &body)
}

/// The NUL-terminated mechanism names of an AuthenticationSASL body.
fn mechanisms(mut data: &[u8]) -> Vec<&str> {
    let mut out = Vec::new();
    while let Some((name, rest)) = cstr(data) {
        if name.is_empty() {
            break;
        }
        out.push(name);
        data = rest;
    }
    out
}

/// `tls-server-end-point` (RFC 5929): the certificate hashed with its
/// signature's hash, SHA-256 for MD5, SHA-1 and anything else.
fn end_point(der: &[u8]) -> Result<ChannelBinding, LoginError> {
    use sha2::{Digest as _, Sha256, Sha384, Sha512};
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
        LoginError::Protocol(format!("the server's certificate does not parse: {e}"))
    })?;
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    let hash = match oid.as_str() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Sha384::digest(der).to_vec(),
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Sha512::digest(der).to_vec(),
        // Ed25519 and Ed448 have no hash of their own to use.
        "1.3.101.112" | "1.3.101.113" => {
            return Err(LoginError::Unsupported(
                "SCRAM channel binding with an EdDSA server certificate is not defined".into(),
            ));
        }
        _ => Sha256::digest(der).to_vec(),
    };
    Ok(ChannelBinding::tls_server_end_point(hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_mechanisms_are_listed() {
        assert_eq!(
            mechanisms(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"),
            vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
        assert!(mechanisms(b"").is_empty());
        // Unterminated: what is whole.
        assert_eq!(mechanisms(b"A\0B"), vec!["A"]);
    }

    #[test]
    fn md5_and_cleartext_answers() {
        let pw = Secret::from_test("pw");
        let mut scram = None;
        let cert = ServerCert(None);
        let (clear, m) = answer(3, &[], "u", &pw, &cert, &mut scram).unwrap();
        assert_eq!(&clear[..], b"p\0\0\0\x07pw\0");
        assert_eq!(m, Some("password"));
        let (md5, _) = answer(5, &[1, 2, 3, 4], "u", &pw, &cert, &mut scram).unwrap();
        assert!(md5[5..].starts_with(b"md5"));
        assert!(matches!(
            answer(5, &[1], "u", &pw, &cert, &mut scram),
            Err(LoginError::Protocol(_))
        ));
        assert!(matches!(
            answer(7, &[], "u", &pw, &cert, &mut scram),
            Err(LoginError::Unsupported(_))
        ));
        assert!(matches!(
            answer(11, b"r=x", "u", &pw, &cert, &mut scram),
            Err(LoginError::Protocol(_))
        ));
    }

    #[test]
    fn sasl_picks_plus_only_with_a_certificate() {
        let pw = Secret::from_test("pw");
        let mut scram = None;
        let (plain, _) = answer(
            10,
            b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0",
            "u",
            &pw,
            &ServerCert(None),
            &mut scram,
        )
        .unwrap();
        assert!(plain[5..].starts_with(b"SCRAM-SHA-256\0"));
        // The gs2 header says the client does not support binding.
        assert!(plain.windows(3).any(|w| w == b"n,,"));
        assert!(scram.is_some());
        // A second SASL request is a violation.
        assert!(
            answer(
                10,
                b"SCRAM-SHA-256\0\0",
                "u",
                &pw,
                &ServerCert(None),
                &mut scram
            )
            .is_err()
        );
        let mut scram = None;
        assert!(matches!(
            answer(10, b"OTHER\0\0", "u", &pw, &ServerCert(None), &mut scram),
            Err(LoginError::Unsupported(_))
        ));
    }

    #[test]
    fn end_point_hash_follows_the_signature() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pw = Secret::from_test("pw");
        let mut scram = None;
        let (msg, m) = answer(
            10,
            b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0",
            "u",
            &pw,
            &ServerCert(Some(cert.der())),
            &mut scram,
        )
        .unwrap();
        assert!(msg[5..].starts_with(b"SCRAM-SHA-256-PLUS\0"));
        assert_eq!(m, Some("SCRAM-SHA-256-PLUS"));
        assert!(msg.windows(24).any(|w| w == b"p=tls-server-end-point,,"));
    }
}
