//! TLS for the gRPC and HTTP listeners, with optional client certificates:
//! the certificate, key and client CA read once, for tokio-rustls. The
//! handshake runs under the connection limits of [`crate::connections`];
//! the HTTP server ([`crate::http_server`]) hands a handler the client's
//! certificate ([`ClientCert`]) so that it can authenticate with it; gRPC
//! reads it from tonic's connection info.

use std::{path::Path, sync::Arc};

use tokio_rustls::rustls::{
    self, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::config::TlsArgs;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Pem {
        what: &'static str,
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("--tls-client-ca: {0}")]
    ClientCa(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The DER certificate a client presented on this connection.
#[derive(Debug, Clone)]
pub struct ClientCert(pub Arc<Vec<u8>>);

/// What both listeners need, read from the files once.
#[derive(Clone)]
pub struct Tls {
    pub http: Arc<rustls::ServerConfig>,
    /// The same, with ALPN `h2` only.
    pub grpc: Arc<rustls::ServerConfig>,
}

fn pem_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError {
    let path = path.display().to_string();
    move |source| TlsError::Pem { what, path, source }
}

/// Reads the certificate, key and client CA named by `args`; `None` when TLS is off.
pub fn load(args: &TlsArgs) -> Result<Option<Tls>, TlsError> {
    let (Some(cert_path), Some(key_path)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(pem_err("certificate", cert_path))?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(pem_err("private key", key_path))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match &args.tls_client_ca {
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for ca in
                CertificateDer::pem_file_iter(ca_path).map_err(pem_err("client CA", ca_path))?
            {
                roots
                    .add(ca.map_err(pem_err("client CA", ca_path))?)
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                // Clients without a certificate still authenticate with tokens.
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut http = builder.with_single_cert(certs, key)?;
    let mut grpc = http.clone();
    http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Tls {
        http: Arc::new(http),
        grpc: Arc::new(grpc),
    }))
}
