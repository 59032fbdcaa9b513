//! A leg of a relayed connection: plain TCP or TLS over it. The relay code
//! is written once against [`Stream`] and its halves; the plain variant
//! borrows the socket's own halves, so plain connections pay one match per
//! poll and nothing else.
//!
//! Writes to a TLS variant may leave ciphertext in rustls's buffer when the
//! socket is full: writers flush before they wait for input (a no-op on
//! plain TCP).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream, tcp, unix},
};
use tokio_rustls::TlsStream;

pub enum Stream {
    Plain(TcpStream),
    /// A unix-domain socket (unix targets: never TLS).
    Unix(UnixStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only between [`Stream::take_plain`] and the TLS stream replacing
    /// it; every operation fails.
    Upgrading,
}

pub enum ReadHalf<'a> {
    Plain(tcp::ReadHalf<'a>),
    Unix(unix::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
    Upgrading,
}

pub enum WriteHalf<'a> {
    Plain(tcp::WriteHalf<'a>),
    Unix(unix::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
    Upgrading,
}

fn upgrading() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "TLS handshake in progress")
}

impl Stream {
    /// Borrowed halves for a relay that reads and writes in one task.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Self::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Self::Unix(s) => {
                let (r, w) = s.split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
            Self::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
            Self::Upgrading => (ReadHalf::Upgrading, WriteHalf::Upgrading),
        }
    }

    /// The plain socket, for a TLS handshake over it; the stream is
    /// unusable until the caller puts the TLS stream in its place.
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Self::Upgrading) {
            Self::Plain(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }

    #[must_use]
    pub fn is_unix(&self) -> bool {
        matches!(self, Self::Unix(_))
    }

    #[must_use]
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// The peer's end-entity certificate (DER), on a TLS leg.
    #[must_use]
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        match self {
            Self::Tls(t) => t
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(AsRef::as_ref),
            _ => None,
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Self::Plain(s)
    }
}

macro_rules! delegate_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Upgrading => Poll::Ready(Err(upgrading())),
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Upgrading => Poll::Ready(Err(upgrading())),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_flush(cx),
                    Self::Unix(s) => Pin::new(s).poll_flush(cx),
                    Self::Tls(s) => Pin::new(s).poll_flush(cx),
                    Self::Upgrading => Poll::Ready(Err(upgrading())),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Upgrading => Poll::Ready(Err(upgrading())),
                }
            }
        }
    };
}

/// Waiting for input with no buffer held meanwhile, so that an idle
/// connection holds none.
macro_rules! delegate_wait {
    ($t:ty) => {
        impl $t {
            /// Whether `wait_input` can wait for input with no buffer held
            /// meanwhile: on a plain socket, not on TLS, whose library may
            /// hold decrypted bytes already.
            #[must_use]
            pub fn waits_unbuffered(&self) -> bool {
                matches!(self, Self::Plain(_) | Self::Unix(_))
            }

            /// Waits until there is input (or the end of the stream, or an
            /// error); returns at once where `waits_unbuffered` is false.
            pub async fn wait_input(&self) -> io::Result<()> {
                match self {
                    Self::Plain(s) => s.readable().await,
                    Self::Unix(s) => s.readable().await,
                    Self::Tls(_) | Self::Upgrading => Ok(()),
                }
            }
        }
    };
}

delegate_wait!(Stream);
delegate_wait!(ReadHalf<'_>);
delegate_read!(Stream);
delegate_write!(Stream);
delegate_read!(ReadHalf<'_>);
delegate_write!(WriteHalf<'_>);
