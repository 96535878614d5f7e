//! TLS for both planes: one rustls client configuration for the data path's streams, and the same
//! certificates handed to the `redis` crate for its control connections.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

/// The TLS settings of one backend: whom to trust, and the client certificate, if any.
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    root_pem: Option<Vec<u8>>,
    client_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("custom_ca", &self.root_pem.is_some())
            .field("client_cert", &self.client_pem.is_some())
            .finish()
    }
}

fn read(option: &str, path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{option} `{path}`: {e}"))
}

impl Tls {
    /// Trust the CAs in `ca_file` (PEM; empty: the system's roots) and present the client certificate
    /// in `cert_file` with its key in `key_file` (both empty: none).
    pub fn load(ca_file: &str, cert_file: &str, key_file: &str) -> Result<Tls, String> {
        let mut roots = rustls::RootCertStore::empty();
        let root_pem = if ca_file.is_empty() {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "TLS: no tls_ca_file given and no system CA certificates found".to_string(),
                );
            }
            None
        } else {
            let pem = read("tls_ca_file", ca_file)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("tls_ca_file `{ca_file}`: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("tls_ca_file `{ca_file}`: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("tls_ca_file `{ca_file}`: no certificate in it"));
            }
            Some(pem)
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let (config, client_pem) = match (cert_file.is_empty(), key_file.is_empty()) {
            (true, true) => (builder.with_no_client_auth(), None),
            (false, false) => {
                let cert_pem = read("tls_cert_file", cert_file)?;
                let key_pem = read("tls_key_file", key_file)?;
                let chain = CertificateDer::pem_slice_iter(&cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("tls_cert_file `{cert_file}`: {e}"))?;
                if chain.is_empty() {
                    return Err(format!("tls_cert_file `{cert_file}`: no certificate in it"));
                }
                let key = PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|e| format!("tls_key_file `{key_file}`: {e}"))?;
                let config = builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("tls_cert_file/tls_key_file: {e}"))?;
                (config, Some((cert_pem, key_pem)))
            }
            _ => {
                return Err(
                    "tls_cert_file and tls_key_file go together: give both or neither".to_string(),
                )
            }
        };
        Ok(Tls {
            config: Arc::new(config),
            root_pem,
            client_pem,
        })
    }

    /// Run the TLS handshake on `tcp` (its timeouts apply) for server `host`.
    pub fn connect(&self, addr: &str, host: &str, mut tcp: TcpStream) -> io::Result<Stream> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("redis {addr}: TLS server name `{host}`: {e}"),
            )
        })?;
        let mut conn = rustls::ClientConnection::new(self.config.clone(), name)
            .map_err(|e| io::Error::other(format!("redis {addr}: TLS: {e}")))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| {
                io::Error::new(e.kind(), format!("redis {addr}: TLS handshake: {e}"))
            })?;
        }
        Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
    }

    /// The same trust and client certificate for the crate's connections.
    pub fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client_pem
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.root_pem.clone(),
        }
    }
}

/// A data-path stream: plain TCP, or TLS over it.
pub enum Stream {
    /// `redis://`.
    Plain(TcpStream),
    /// `rediss://` or `tls: true`.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}
