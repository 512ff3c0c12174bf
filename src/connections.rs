//! Connections: how many each listener holds, and how long one may take to
//! start. Every connection is a file descriptor, taken before the client
//! has said who it is; without these bounds one client that opens
//! connections and sends nothing could take every descriptor of the
//! process, and with them the database pool, the metrics address and the
//! health checks.
//!
//! Over a listener's bound a new connection is accepted and closed at once,
//! rather than left unaccepted: the client learns at once that it was
//! refused, instead of waiting in the kernel's backlog behind the very
//! connections that hold the slots, and the backlog keeps draining, so a
//! slot that frees goes to whoever comes next.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::{
    config::ServeConfig,
    metrics::{CLOSED_HANDSHAKE, CLOSED_TOO_MANY, CONNECTIONS_CLOSED, OPEN_CONNECTIONS},
};

/// Descriptors kept beside the listeners' and the pool's: the listeners
/// themselves, stdio, the runtime's epoll and signal pipes, the storage
/// job's own database connections, a DNS lookup.
pub const FD_MARGIN: u64 = 64;

/// The HTTP/2 client preface (24 bytes) and the header of the SETTINGS
/// frame that must follow it (9): a gRPC connection has begun once it sent them.
const PREFACE_BYTES: usize = 24 + 9;

/// Why locus will not start with the file limit it has.
#[derive(Debug, thiserror::Error)]
pub enum FileLimitError {
    #[error("cannot read or raise the open-file limit (RLIMIT_NOFILE): {0}")]
    Rlimit(#[from] nix::Error),
    #[error(
        "the open-file limit is {limit} (hard limit {hard}), and the configured connections need {need}: \
         --max-connections-grpc {grpc} + --max-connections-http {http} + --max-connections-metrics {metrics} \
         + --db-pool-size {pool} + {margin} for locus itself. Raise the limit (ulimit -n, LimitNOFILE=, \
         docker --ulimit nofile=) or lower those flags"
    )]
    TooLow {
        limit: u64,
        hard: u64,
        need: u64,
        grpc: usize,
        http: usize,
        metrics: usize,
        pool: u32,
        margin: u64,
    },
}

/// Raises the soft open-file limit to the hard one, and checks that every
/// connection the listeners may hold, the database pool and a margin fit
/// in it. Streams ride on gRPC connections and take no descriptor of their
/// own. Returns the limit in effect.
pub fn fit_file_limit(config: &ServeConfig) -> Result<u64, FileLimitError> {
    let (limit, hard) = raise_file_limit()?;
    let c = &config.connections;
    let need = c.total() + u64::from(config.db_pool_size) + FD_MARGIN;
    if need > limit {
        return Err(FileLimitError::TooLow {
            limit,
            hard,
            need,
            grpc: c.max_connections_grpc,
            http: c.max_connections_http,
            metrics: c.max_connections_metrics,
            pool: config.db_pool_size,
            margin: FD_MARGIN,
        });
    }
    Ok(limit)
}

/// Raises the soft open-file limit to the hard one where it may: the
/// limit in effect, and the hard one.
pub fn raise_file_limit() -> Result<(u64, u64), nix::Error> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok((soft, hard));
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => Ok((hard, hard)),
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            Ok((soft, hard))
        }
    }
}

/// A listener's bound on open connections.
#[derive(Clone)]
pub struct Gate {
    listener: &'static str,
    slots: Arc<Semaphore>,
}

impl Gate {
    /// `listener` names it in metrics: `grpc`, `http` or `metrics`.
    pub fn new(listener: &'static str, max: usize) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    pub fn listener(&self) -> &'static str {
        self.listener
    }

    /// A slot for a new connection, or `None` (counted) when all are taken.
    pub fn admit(&self) -> Option<Slot> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => {
                metrics::gauge!(OPEN_CONNECTIONS, "listener" => self.listener).increment(1.0);
                Some(Slot {
                    listener: self.listener,
                    _permit: permit,
                })
            }
            Err(_) => {
                closed(self.listener, CLOSED_TOO_MANY);
                None
            }
        }
    }

    /// The next connection with a slot, TCP_NODELAY set (without it a small
    /// answer can wait for the peer's delayed ACK, about 40 ms). Those over
    /// the bound are closed at once; accept errors (out of descriptors)
    /// are waited out.
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, SocketAddr, Slot) {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    if let Some(slot) = self.admit() {
                        let _ = tcp.set_nodelay(true);
                        return (tcp, peer, slot);
                    }
                    drop(tcp);
                }
                Err(e) => {
                    tracing::warn!(listener = self.listener, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// One open connection's place under its listener's bound; freed on drop.
pub struct Slot {
    listener: &'static str,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    pub fn listener(&self) -> &'static str {
        self.listener
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_CONNECTIONS, "listener" => self.listener).decrement(1.0);
    }
}

/// Counts a connection closed (or refused) by a limit.
pub fn closed(listener: &'static str, reason: &'static str) {
    metrics::counter!(CONNECTIONS_CLOSED, "listener" => listener, "reason" => reason).increment(1);
}

/// A gRPC connection: holds its slot, and fails its reads once the
/// handshake deadline passes before the HTTP/2 preface has been read.
pub struct Guarded<T> {
    inner: T,
    slot: Slot,
    preface: Option<Preface>,
}

struct Preface {
    left: usize,
    deadline: Pin<Box<Sleep>>,
}

impl<T> Guarded<T> {
    fn new(inner: T, slot: Slot, deadline: Instant) -> Self {
        Self {
            inner,
            slot,
            preface: Some(Preface {
                left: PREFACE_BYTES,
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
            }),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(p) = &mut this.preface
            && p.deadline.as_mut().poll(cx).is_ready()
        {
            this.preface = None;
            closed(this.slot.listener, CLOSED_HANDSHAKE);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within the handshake timeout",
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(p) = &mut this.preface {
            p.left = p.left.saturating_sub(buf.filled().len() - before);
            if p.left == 0 {
                this.preface = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The gRPC server's connections from `listener`, each under `gate`, each
/// made into an `IO` by `upgrade` (a TLS handshake, or nothing) and handed
/// over once that is done; `upgrade` and the HTTP/2 preface must both be
/// done within `handshake` of the accept. Handshakes run side by side, so
/// a slow one delays no other. Ends when `shutdown` is cancelled.
pub fn grpc_incoming<IO, F, Fut>(
    listener: TcpListener,
    gate: Gate,
    handshake: Duration,
    upgrade: F,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<Guarded<IO>>>
where
    IO: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<IO>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let (tcp, peer, slot) = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = gate.accept(&listener) => c,
            };
            let deadline = Instant::now() + handshake;
            let upgrading = upgrade(tcp);
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout_at(deadline, upgrading).await {
                    Ok(Ok(io)) => {
                        let _ = tx.send(Ok(Guarded::new(io, slot, deadline))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => closed(slot.listener(), CLOSED_HANDSHAKE),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (listener.accept().await.unwrap().0, client)
    }

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

    /// Past the bound, admission fails; a slot freed is taken again.
    #[tokio::test]
    async fn a_gate_admits_up_to_its_bound() {
        let gate = Gate::new("test", 2);
        let a = gate.admit().unwrap();
        let _b = gate.admit().unwrap();
        assert!(gate.admit().is_none());
        drop(a);
        assert!(gate.admit().is_some());
    }

    /// A connection that sends part of the preface is failed at the
    /// deadline; one that sends all of it is read as usual afterwards.
    #[tokio::test(start_paused = true)]
    async fn reads_fail_when_the_preface_is_late() {
        let gate = Gate::new("test", 4);
        let (server, mut client) = pair().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut slow = Guarded::new(server, gate.admit().unwrap(), deadline);
        client.write_all(b"PRI * HTTP/2.0").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(slow.read(&mut buf).await.unwrap(), 14);
        let err = slow.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        let (server, mut client) = pair().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut good = Guarded::new(server, gate.admit().unwrap(), deadline);
        client.write_all(&[0u8; PREFACE_BYTES]).await.unwrap();
        let mut got = 0;
        while got < PREFACE_BYTES {
            got += good.read(&mut buf).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        client.write_all(b"later").await.unwrap();
        assert_eq!(good.read(&mut buf).await.unwrap(), 5);
    }
}
