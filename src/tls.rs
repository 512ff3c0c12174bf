//! TLS for the gRPC and HTTP listeners, with optional client certificates.
//!
//! Both use tokio-rustls, with the handshake under the connection limits
//! of [`crate::connections`]. HTTP is served here, by hyper, so that a
//! handler can see the client's certificate ([`ClientCert`]) and
//! authenticate with it; gRPC reads it from tonic's connection info.

use std::{
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, time::Instant};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::TlsArgs,
    connections::{Gate, Slot, closed},
    metrics as m,
};

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

/// The time limits of an HTTP listener's connections.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// From the accept to the first request, TLS handshake included.
    pub handshake: Duration,
    /// For a request's headers (HTTP/1), once begun or once the previous
    /// answer ended.
    pub header_read: Duration,
    /// With no request in flight.
    pub idle: Duration,
}

impl HttpTimeouts {
    pub fn from_config(c: &crate::config::ConnectionArgs) -> Self {
        Self {
            handshake: c.handshake_timeout,
            header_read: c.header_read_timeout,
            idle: c.idle_timeout,
        }
    }
}

/// Serves `app` on `listener`, over TLS when `tls` is given, each
/// connection under `gate` and `timeouts`, until `shutdown`; then lets the
/// requests in flight finish.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    gate: Gate,
    timeouts: HttpTimeouts,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer, slot) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = gate.accept(&listener) => c,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let deadline = Instant::now() + timeouts.handshake;
            let Some(acceptor) = acceptor else {
                serve_connection(tcp, None, app, slot, deadline, timeouts, shutdown).await;
                return;
            };
            let stream = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    closed(slot.listener(), m::CLOSED_HANDSHAKE);
                    return;
                }
            };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| ClientCert(Arc::new(c.to_vec())));
            serve_connection(stream, cert, app, slot, deadline, timeouts, shutdown).await;
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Requests in flight on one connection, and since when it has had none.
struct Activity {
    started: AtomicU64,
    in_flight: AtomicUsize,
    idle_since: std::sync::Mutex<Instant>,
    /// Told when a request starts or ends, so that the deadlines are recomputed.
    changed: tokio::sync::Notify,
}

/// One request in flight: dropped with its answer's body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.started.fetch_add(1, Ordering::Relaxed);
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        a.changed.notify_one();
        Self(Arc::clone(a))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1
            && let Ok(mut t) = self.0.idle_since.lock()
        {
            *t = Instant::now();
        }
        self.0.changed.notify_one();
    }
}

/// An answer's body that keeps its request counted in flight until it is
/// sent or dropped (a live feed is in flight for as long as it lasts).
struct Tracked {
    body: axum::body::Body,
    _in_flight: InFlight,
}

impl axum::body::HttpBody for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves one connection: closed when no first request came by
/// `deadline`, when a request's headers are slower than the header
/// timeout (hyper's), or when it had no request in flight for the idle
/// timeout (gracefully: an HTTP/2 client gets a GOAWAY).
async fn serve_connection<IO>(
    io: IO,
    cert: Option<ClientCert>,
    app: Router,
    slot: Slot,
    deadline: Instant,
    timeouts: HttpTimeouts,
    shutdown: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let listener = slot.listener();
    let activity = Arc::new(Activity {
        started: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        idle_since: std::sync::Mutex::new(Instant::now()),
        changed: tokio::sync::Notify::new(),
    });
    let service = {
        let activity = Arc::clone(&activity);
        tower::service_fn(move |mut req: axum::extract::Request<_>| {
            if let Some(c) = &cert {
                req.extensions_mut().insert(c.clone());
            }
            let in_flight = InFlight::new(&activity);
            let answer = tower::Service::call(&mut app.clone(), req);
            async move {
                let resp = answer.await?;
                Ok::<_, std::convert::Infallible>(resp.map(|body| {
                    axum::body::Body::new(Tracked {
                        body,
                        _in_flight: in_flight,
                    })
                }))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Dead peers are noticed, and their connections freed.
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut stopping = false;
    let result = loop {
        let started = activity.started.load(Ordering::Relaxed) > 0;
        let busy = activity.in_flight.load(Ordering::Relaxed) > 0;
        let check = if stopping {
            // Past a graceful close, as long again to finish, then dropped.
            Instant::now() + timeouts.idle
        } else if !started {
            deadline
        } else if busy {
            Instant::now() + timeouts.idle
        } else {
            activity
                .idle_since
                .lock()
                .map_or_else(|_| Instant::now(), |t| *t)
                + timeouts.idle
        };
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = activity.changed.notified() => {}
            _ = shutdown.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(check) => {
                if stopping {
                    return;
                }
                if activity.started.load(Ordering::Relaxed) == 0 {
                    closed(listener, m::CLOSED_HANDSHAKE);
                    return;
                }
                if activity.in_flight.load(Ordering::Relaxed) == 0
                    && activity.idle_since.lock().map_or(true, |t| t.elapsed() >= timeouts.idle)
                {
                    closed(listener, m::CLOSED_IDLE);
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    };
    if let Err(e) = result {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            closed(listener, m::CLOSED_HEADER);
        }
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
    drop(slot);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the HTTP and metrics ports accept has TCP_NODELAY.
    #[tokio::test]
    async fn connections_are_accepted_with_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _, _slot) = Gate::new("test", 1).accept(&listener).await;
        assert!(tcp.nodelay().unwrap());
    }
}
