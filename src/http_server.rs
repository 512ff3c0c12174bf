//! The HTTP server of the HTTP and metrics listeners, by hyper: each
//! connection under the listener's bound, over TLS when it is on, with the
//! client's certificate handed to the handlers ([`ClientCert`]), closed
//! when its handshake, a request's headers or an idle spell take too long,
//! and drained on shutdown.

use std::{
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
use tokio_rustls::{TlsAcceptor, rustls};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    connections::{Gate, Slot, closed},
    metrics::{CLOSED_HANDSHAKE, CLOSED_HEADER, CLOSED_IDLE},
    tls::ClientCert,
};

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
                    closed(slot.listener(), CLOSED_HANDSHAKE);
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
                    closed(listener, CLOSED_HANDSHAKE);
                    return;
                }
                if activity.in_flight.load(Ordering::Relaxed) == 0
                    && activity.idle_since.lock().map_or(true, |t| t.elapsed() >= timeouts.idle)
                {
                    closed(listener, CLOSED_IDLE);
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
            closed(listener, CLOSED_HEADER);
        }
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
    drop(slot);
}
