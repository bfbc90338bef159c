//! Listeners: accept connections (HTTP/1.1 and h2c on one port), serve them, and shut down
//! gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Proxy;
use crate::config::settings::Settings;

/// Connection settings for the data-plane listener.
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    /// A client must send its request headers (and a connection its first bytes) within this.
    pub header_read_timeout: Duration,
    /// In-flight requests get this long after the listener closes.
    pub shutdown_grace: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Streams one HTTP/2 connection may have open at once: what one client can hold of the
    /// upstream's streams.
    pub max_concurrent_streams: u32,
}

impl ListenerLimits {
    pub fn from_settings(settings: &Settings) -> Self {
        ListenerLimits {
            header_read_timeout: settings.header_read_timeout,
            shutdown_grace: settings.shutdown_grace,
            max_connections: settings.max_connections,
            max_concurrent_streams: settings.max_concurrent_streams,
        }
    }
}

/// Largest request head (HTTP/1) or header list (HTTP/2) accepted; past it, 431.
const MAX_HEADER_BYTES: usize = 64 << 10;

fn builder(limits: ListenerLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(limits.max_concurrent_streams);
    b
}

/// Serves the proxy on single connections, HTTP/1.1 or h2c, with the listener's limits.
pub struct Connections {
    builder: auto::Builder<TokioExecutor>,
    proxy: Arc<Proxy>,
}

impl Connections {
    pub fn new(proxy: Arc<Proxy>, limits: ListenerLimits) -> Self {
        Connections {
            builder: builder(limits),
            proxy,
        }
    }

    /// Serves `io`, a connection from `client`, until it closes or `watcher`'s graceful
    /// shutdown ends it.
    pub async fn serve<I>(&self, io: I, client: SocketAddr, watcher: Watcher)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.proxy.clone();
        let service = service_fn(move |req: Request<Incoming>| proxy.clone().handle(req, client));
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(error = %e, %client, "connection ended with an error");
        }
    }
}

/// Serves each listener with its proxy until `shutdown` resolves, then waits up to the grace
/// period for in-flight requests on all of them; then cuts what is left and returns once every
/// connection is gone (their records are handed to the tee by then). One call for every port:
/// the tee is told to mark records cut only once every port's grace is over.
pub async fn serve(
    ports: Vec<(TcpListener, Arc<Proxy>)>,
    limits: ListenerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let tasks = TaskTracker::new();
    let cut = CancellationToken::new();
    let stop = CancellationToken::new();
    let mut tees = Vec::new();
    let accepting = futures_util::future::join_all(ports.into_iter().map(|(listener, proxy)| {
        tees.push(proxy.tee.clone());
        let connections = Arc::new(Connections::new(proxy, limits));
        accept(
            listener,
            connections,
            limits,
            &graceful,
            &tasks,
            &cut,
            &stop,
        )
    }));
    tokio::join!(
        async {
            shutdown.await;
            stop.cancel();
        },
        accepting
    );
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over: closing connections with requests in flight");
    }
    for tee in tees {
        tee.cut_in_flight();
    }
    cut.cancel();
    tasks.close();
    tasks.wait().await;
}

/// One port's accept loop, until `stop`: each connection served on its own task, at most
/// `--max-connections` at once.
async fn accept(
    listener: TcpListener,
    connections: Arc<Connections>,
    limits: ListenerLimits,
    graceful: &GracefulShutdown,
    tasks: &TaskTracker,
    cut: &CancellationToken,
    stop: &CancellationToken,
) {
    // At the limit, stop accepting: new connections wait in the kernel's backlog instead of
    // taking file descriptors and memory here.
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = stop.cancelled() => break,
        };
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let connections = connections.clone();
        let watcher = graceful.watcher();
        let cut = cut.clone();
        tasks.spawn(cut.run_until_cancelled_owned(async move {
            let _slot = permit;
            // hyper's header-read timeout starts after it has read the first bytes (to tell
            // HTTP/1 from HTTP/2); a connection that sends nothing at all is cut here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(limits.header_read_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            connections.serve(stream, client, watcher).await;
        }));
    }
}

/// Connections the kernel queues while every `--max-connections` slot is taken (std's
/// default is 128, too few for a burst of reconnecting clients; nginx uses 511).
const LISTEN_BACKLOG: u32 = 1024;

/// Binds, with a message that names the address when it fails.
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}"))
    })
}
