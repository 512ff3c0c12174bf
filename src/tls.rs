//! TLS for the gRPC and HTTP listeners, with optional client certificates.
//!
//! gRPC uses tonic's own rustls acceptor. HTTP is served here, by hyper
//! over tokio-rustls, so that a handler can see the client's certificate
//! ([`ClientCert`]) and authenticate with it.

use std::{path::Path, sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::config::TlsArgs;

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub grpc: tonic::transport::ServerTlsConfig,
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
    let mut grpc = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(std::fs::read(cert_path)?, std::fs::read(key_path)?),
    );
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
            grpc = grpc
                .client_ca_root(tonic::transport::Certificate::from_pem(std::fs::read(
                    ca_path,
                )?))
                .client_auth_optional(true);
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut http = builder.with_single_cert(certs, key)?;
    http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Tls {
        http: Arc::new(http),
        grpc: grpc.timeout(HANDSHAKE_TIMEOUT),
    }))
}

/// `listener` with TCP_NODELAY on every connection it accepts, as on the
/// TLS path below and on gRPC: without it a small answer can wait for the
/// peer's delayed ACK (about 40 ms).
pub fn nodelay(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    })
}

/// The gRPC server's connections from `listener`, with TCP_NODELAY: without
/// it a small answer (an ack, an hourly-stats page) can wait for the peer's
/// delayed ACK, about 40 ms. The builder's `tcp_nodelay` does not reach an
/// incoming handed to it, as this one is (locus binds before it serves).
pub fn grpc_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves `app` on `listener`, over TLS when `tls` is given, until
/// `shutdown`; then lets the requests in flight finish.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let Some(tls) = tls else {
        return axum::serve(nodelay(listener), app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    };
    let acceptor = TlsAcceptor::from(tls);
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| ClientCert(Arc::new(c.to_vec())));
            let service = tower::service_fn(move |mut req: axum::extract::Request<_>| {
                if let Some(c) = &cert {
                    req.extensions_mut().insert(c.clone());
                }
                tower::Service::call(&mut app.clone(), req)
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service),
            );
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    async fn bound() -> (TcpListener, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (listener, client)
    }

    /// What the HTTP and metrics ports accept has TCP_NODELAY.
    #[tokio::test]
    async fn http_connections_are_accepted_with_nodelay() {
        use axum::serve::Listener;
        let (listener, _client) = bound().await;
        let (tcp, _) = nodelay(listener).accept().await;
        assert!(tcp.nodelay().unwrap());
    }

    /// And what the gRPC port accepts.
    #[tokio::test]
    async fn grpc_connections_are_accepted_with_nodelay() {
        let (listener, _client) = bound().await;
        let mut incoming = std::pin::pin!(grpc_incoming(listener));
        let tcp = incoming.next().await.unwrap().unwrap();
        assert!(tcp.nodelay().unwrap());
    }
}
