//! Connections and TLS: the acceptor clients meet (`[tls] client_mode`), the connector towards
//! PostgreSQL (`backend_mode`), and the stream type both sides use: TCP, plain or encrypted, or a
//! Unix-domain socket.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{BackendTls, ClientTls, Config};

/// A connection to a client or a server: TCP in the clear or over TLS, or a server's
/// Unix-domain socket.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

/// The socket file of a server whose `host` names a Unix-socket directory (an absolute path,
/// as in libpq): `<host>/.s.PGSQL.<port>`. `None` for a host name or address.
pub fn socket_path(host: &str, port: u16) -> Option<PathBuf> {
    host.starts_with('/')
        .then(|| PathBuf::from(host).join(format!(".s.PGSQL.{port}")))
}

/// How a server is named in messages and stats: `host:port` (`[v6]:port`), or its socket file.
pub fn server_addr(host: &str, port: u16) -> String {
    match socket_path(host, port) {
        Some(path) => path.display().to_string(),
        None if host.contains(':') => format!("[{host}]:{port}"),
        None => format!("{host}:{port}"),
    }
}

/// Opens a connection to a server without TLS: its Unix-domain socket when `host` is a
/// directory, else TCP with `TCP_NODELAY` (request and answer are small and latency-bound).
pub async fn connect_plain(host: &str, port: u16) -> io::Result<Stream> {
    if let Some(path) = socket_path(host, port) {
        return Ok(Stream::Unix(UnixStream::connect(path).await?));
    }
    let tcp = TcpStream::connect((host, port)).await?;
    let _ = tcp.set_nodelay(true);
    Ok(Stream::Plain(tcp))
}

impl Stream {
    /// Reads what is already there without waiting: `WouldBlock` when nothing is (for TLS, on
    /// the socket underneath).
    pub fn try_read_raw(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_read(buf),
            Stream::Tls(t) => t.get_ref().0.try_read(buf),
            Stream::Unix(s) => s.try_read(buf),
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(t) => t.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// TLS set up from `[tls]`: what clients are offered and how servers are reached.
#[derive(Clone)]
pub struct Tls {
    pub client_mode: ClientTls,
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub backend_mode: BackendTls,
    /// The client configuration towards servers (data connections and the monitor alike).
    pub backend: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_mode", &self.client_mode)
            .field("backend_mode", &self.backend_mode)
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS material that cannot be used: the message names the key and its file.
#[derive(Debug, thiserror::Error)]
#[error("{key} {message}")]
pub struct TlsError {
    /// The `[tls]` key at fault, e.g. `tls.key_file`.
    pub key: &'static str,
    pub message: String,
}

fn tls_error(key: &'static str, message: impl Into<String>) -> TlsError {
    TlsError {
        key,
        message: message.into(),
    }
}

impl Tls {
    /// Loads certificates and keys named in the configuration. `causeway check` and start-up
    /// both load them this way, so a file check accepts is one start-up can use.
    pub fn from_config(cfg: &Config) -> Result<Tls, TlsError> {
        let t = &cfg.tls;
        let acceptor = if t.client_mode == ClientTls::Disable {
            None
        } else {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert_file)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| tls_error("tls.cert_file", format!("{}: {e}", t.cert_file)))?;
            if certs.is_empty() {
                return Err(tls_error(
                    "tls.cert_file",
                    format!("{}: no PEM certificate in the file", t.cert_file),
                ));
            }
            let key = PrivateKeyDer::from_pem_file(&t.key_file).map_err(|e| {
                tls_error(
                    "tls.key_file",
                    format!("{}: no PEM private key in the file ({e})", t.key_file),
                )
            })?;
            let server = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| tls_error("tls.cert_file", e.to_string()))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => tls_error(
                        "tls.key_file",
                        format!(
                            "{}: the key does not belong to the certificate in {}",
                            t.key_file, t.cert_file
                        ),
                    ),
                    e => tls_error(
                        "tls.cert_file",
                        format!("{} with {}: {e}", t.cert_file, t.key_file),
                    ),
                })?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
        };
        let backend = match t.backend_mode {
            BackendTls::Disable => None,
            BackendTls::Prefer | BackendTls::Require => {
                let c = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| tls_error("tls.backend_mode", e.to_string()))?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider())))
                    .with_no_client_auth();
                Some(Arc::new(c))
            }
            BackendTls::VerifyFull => {
                let mut roots = rustls::RootCertStore::empty();
                let cas: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_file_iter(&t.backend_ca_file)
                        .and_then(|i| i.collect::<Result<_, _>>())
                        .map_err(|e| {
                            tls_error("tls.backend_ca_file", format!("{}: {e}", t.backend_ca_file))
                        })?;
                if cas.is_empty() {
                    return Err(tls_error(
                        "tls.backend_ca_file",
                        format!("{}: no PEM certificate in the file", t.backend_ca_file),
                    ));
                }
                for ca in cas {
                    roots.add(ca).map_err(|e| {
                        tls_error("tls.backend_ca_file", format!("{}: {e}", t.backend_ca_file))
                    })?;
                }
                let c = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| tls_error("tls.backend_mode", e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(Arc::new(c))
            }
        };
        Ok(Tls {
            client_mode: t.client_mode,
            acceptor,
            backend_mode: t.backend_mode,
            backend,
        })
    }

    /// Opens a data connection to a server, TLS negotiated as `backend_mode` says. A Unix-domain
    /// socket is never encrypted, as with libpq: it does not leave the machine.
    pub async fn connect_server(&self, host: &str, port: u16) -> io::Result<Stream> {
        match connect_plain(host, port).await? {
            Stream::Plain(tcp) => self.connect_backend(tcp, host).await,
            local => Ok(local),
        }
    }

    /// Negotiates TLS on a fresh server connection (SSLRequest), as `backend_mode` says.
    async fn connect_backend(&self, mut tcp: TcpStream, host: &str) -> io::Result<Stream> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Some(config) = &self.backend else {
            return Ok(Stream::Plain(tcp));
        };
        tcp.write_all(&crate::protocol::encode_ssl_request())
            .await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await?;
                Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
            }
            b'N' if self.backend_mode == BackendTls::Prefer => Ok(Stream::Plain(tcp)),
            b'N' => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "server does not support TLS and tls.backend_mode requires it",
            )),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer {other:#04x} to SSLRequest"),
            )),
        }
    }
}

/// Opens a tokio-postgres connection (monitor, catalog) with the same TLS policy as data
/// connections.
pub async fn pg_connect(
    pg: &tokio_postgres::Config,
    tls: &Tls,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    // Over a Unix-domain socket there is no TLS to negotiate (libpq ignores sslmode there).
    let local = pg
        .get_hosts()
        .iter()
        .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
    let client = match &tls.backend {
        Some(_) if local => {
            let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        None => {
            let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        Some(config) => {
            let mut pg = pg.clone();
            pg.ssl_mode(if tls.backend_mode == BackendTls::Prefer {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            });
            let make = tokio_postgres_rustls::MakeRustlsConnect::new((**config).clone());
            let (client, conn) = pg.connect(make).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
    };
    Ok(client)
}

/// `require`/`prefer` towards servers: encryption without authentication, like libpq's
/// sslmode=require. Signatures are still checked, so the handshake itself is sound.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
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
        dss: &DigitallySignedStruct,
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
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absolute_host_names_a_socket_directory() {
        assert_eq!(
            socket_path("/var/run/postgresql", 5433),
            Some(PathBuf::from("/var/run/postgresql/.s.PGSQL.5433"))
        );
        assert_eq!(socket_path("127.0.0.1", 5432), None);
        assert_eq!(socket_path("db.internal", 5432), None);
        assert_eq!(socket_path("::1", 5432), None);
        assert_eq!(server_addr("/tmp", 6000), "/tmp/.s.PGSQL.6000");
        assert_eq!(server_addr("db.internal", 5432), "db.internal:5432");
        assert_eq!(server_addr("::1", 5432), "[::1]:5432");
    }
}
