//! Upstream HTTP/2: a pool of h2c connections that grows past one connection's stream limit.
//!
//! One HTTP/2 connection carries at most the streams its server allows
//! (`SETTINGS_MAX_CONCURRENT_STREAMS`, often 100); past that, hyper queues requests inside the
//! connection, behind streams that may never end (a client that never finishes its body). The
//! pool puts a request on the oldest connection with a free stream and opens another when all
//! are full, up to `--upstream-h2-max-connections`; past that, a request waits for a stream to
//! be given back (bounded by `--upstream-timeout`). A stream counts as taken until both the
//! request body and the response body are done with it, as in HTTP/2 itself. A new connection
//! takes up to 100 requests before its server's limit is known; a server allowing fewer
//! queues the rest on that connection (hyper does) while later requests go elsewhere.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

use super::body::{BoxError, RequestBody};

/// Streams assumed on a new connection until its server's SETTINGS arrive: the least RFC 9113
/// §6.5.2 recommends a server allow.
const INITIAL_STREAMS: usize = 100;
/// A connection with no stream for this long is closed (the legacy pool's idle timeout).
const IDLE: Duration = Duration::from_secs(60);
/// Tries per request when a connection closes between being picked and taking the request.
const SEND_ATTEMPTS: usize = 3;

/// Why a request got no response from the pooled connections.
#[derive(Debug)]
pub(super) enum H2Error {
    /// No connection could be opened (refused, timed out, handshake failed).
    Connect(Arc<str>),
    /// The connection or the stream failed.
    Request(hyper::Error),
}

/// Sends requests over the pool; the connector's type is erased behind it.
pub(crate) trait SendH2: Send + Sync {
    fn send(&self, req: Request<RequestBody>) -> H2Future<'_>;
}

pub(crate) type H2Future<'a> =
    Pin<Box<dyn Future<Output = Result<(Response<Incoming>, Arc<Stream>), H2Error>> + Send + 'a>>;

/// h2c connections to one upstream, opened through `connector`.
pub(super) struct H2Pool<C> {
    connector: C,
    uri: Uri,
    builder: http2::Builder<TokioExecutor>,
    shared: Arc<Shared>,
}

struct Shared {
    max_connections: usize,
    conns: Mutex<Conns>,
    /// A stream was given back, or a connection went away or raised its limit.
    freed: Notify,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    /// Oldest first: requests fill the oldest connections, so the newest idle out.
    entries: Vec<Entry>,
}

struct Entry {
    id: u64,
    state: watch::Receiver<State>,
    /// The server's current stream limit, kept up to date by the connection's task.
    max_streams: Arc<AtomicUsize>,
    in_flight: usize,
    idle_since: Instant,
}

#[derive(Clone)]
enum State {
    Connecting,
    Ready(http2::SendRequest<RequestBody>),
    Failed(Arc<str>),
}

impl Entry {
    fn usable(&self, now: Instant) -> bool {
        let open = match &*self.state.borrow() {
            State::Connecting => true,
            State::Ready(send) => !send.is_closed(),
            State::Failed(_) => false,
        };
        open && (self.in_flight > 0 || now.duration_since(self.idle_since) < IDLE)
    }
}

/// One stream taken on a pooled connection, given back when the last holder drops it (the
/// request body and the response body each hold it).
pub(crate) struct Stream {
    shared: Arc<Shared>,
    conn: u64,
}

impl Drop for Stream {
    fn drop(&mut self) {
        {
            let mut conns = self.shared.conns.lock().expect("pool lock");
            if let Some(e) = conns.entries.iter_mut().find(|e| e.id == self.conn) {
                e.in_flight -= 1;
                if e.in_flight == 0 {
                    e.idle_since = Instant::now();
                }
            }
        }
        self.shared.freed.notify_one();
    }
}

impl Shared {
    /// The connection `id` ended or never opened: waiters may open another.
    fn forget(&self, id: u64) {
        self.conns
            .lock()
            .expect("pool lock")
            .entries
            .retain(|e| e.id != id);
        self.freed.notify_waiters();
    }
}

impl<C> H2Pool<C>
where
    C: tower::Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    pub(super) fn new(
        connector: C,
        authority: http::uri::Authority,
        max_connections: usize,
    ) -> Self {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_max_send_streams(INITIAL_STREAMS);
        H2Pool {
            connector,
            uri: Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query("/")
                .build()
                .expect("an authority makes a URI"),
            builder,
            shared: Arc::new(Shared {
                max_connections: max_connections.max(1),
                conns: Mutex::new(Conns::default()),
                freed: Notify::new(),
            }),
        }
    }

    /// A free stream: on the oldest connection that has one, else on a new connection, else
    /// the first one given back.
    async fn acquire(&self) -> Result<(http2::SendRequest<RequestBody>, Arc<Stream>), H2Error> {
        loop {
            // Registered before looking, so a stream given back in between is not missed.
            let freed = self.shared.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let Some((mut state, stream)) = self.take() else {
                freed.await;
                continue;
            };
            let ready = state
                .wait_for(|s| !matches!(s, State::Connecting))
                .await
                .map(|s| s.clone());
            return match ready {
                Ok(State::Ready(send)) => Ok((send, stream)),
                Ok(State::Failed(e)) => Err(H2Error::Connect(e)),
                _ => Err(H2Error::Connect("the connection task ended".into())),
            };
        }
    }

    fn take(&self) -> Option<(watch::Receiver<State>, Arc<Stream>)> {
        let mut conns = self.shared.conns.lock().expect("pool lock");
        let now = Instant::now();
        conns.entries.retain(|e| e.usable(now));
        let stream = |id| {
            Arc::new(Stream {
                shared: self.shared.clone(),
                conn: id,
            })
        };
        if let Some(e) = conns
            .entries
            .iter_mut()
            .find(|e| e.in_flight < e.max_streams.load(Ordering::Relaxed))
        {
            e.in_flight += 1;
            return Some((e.state.clone(), stream(e.id)));
        }
        if conns.entries.len() >= self.shared.max_connections {
            return None;
        }
        let id = conns.next_id;
        conns.next_id += 1;
        let (state, max_streams) = self.open(id);
        conns.entries.push(Entry {
            id,
            state: state.clone(),
            max_streams,
            in_flight: 1,
            idle_since: now,
        });
        Some((state, stream(id)))
    }

    /// Opens connection `id` in a task of its own (a request that gives up waiting must not
    /// abandon the others waiting on the same connection), then drives it.
    fn open(&self, id: u64) -> (watch::Receiver<State>, Arc<AtomicUsize>) {
        let (tx, rx) = watch::channel(State::Connecting);
        let max_streams = Arc::new(AtomicUsize::new(INITIAL_STREAMS));
        let connector = self.connector.clone();
        let uri = self.uri.clone();
        let builder = self.builder.clone();
        let shared = self.shared.clone();
        let limit = max_streams.clone();
        tokio::spawn(async move {
            let handshake = async {
                let io = connector
                    .oneshot(uri)
                    .await
                    .map_err(|e| super::error_chain(&*e.into()))?;
                builder
                    .handshake(io)
                    .await
                    .map_err(|e| super::error_chain(&e))
            };
            let conn = match handshake.await {
                Ok((send, conn)) => {
                    let _ = tx.send(State::Ready(send));
                    conn
                }
                Err(e) => {
                    let _ = tx.send(State::Failed(e.into()));
                    shared.forget(id);
                    return;
                }
            };
            // The value stays readable; dropping the sender lets the connection close once
            // the pool and every request have let go of it.
            drop(tx);
            tokio::pin!(conn);
            let ended = std::future::poll_fn(|cx| {
                let polled = conn.as_mut().poll(cx);
                let now = conn.current_max_send_streams();
                if limit.swap(now, Ordering::Relaxed) < now {
                    shared.freed.notify_waiters();
                }
                polled
            })
            .await;
            if let Err(e) = ended {
                tracing::debug!(error = %e, "upstream h2 connection ended with an error");
            }
            shared.forget(id);
        });
        (rx, max_streams)
    }

    async fn send_on_pool(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Arc<Stream>), H2Error> {
        let mut attempt = 1;
        loop {
            let (mut send, stream) = self.acquire().await?;
            req.body_mut().hold(stream.clone());
            match send.try_send_request(req).await {
                Ok(resp) => return Ok((resp, stream)),
                // The connection closed before it took the request: another one may.
                Err(mut e) => match e.take_message() {
                    Some(back) if attempt < SEND_ATTEMPTS => req = back,
                    _ => return Err(H2Error::Request(e.into_error())),
                },
            }
            attempt += 1;
        }
    }
}

impl<C> SendH2 for H2Pool<C>
where
    C: tower::Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    fn send(&self, req: Request<RequestBody>) -> H2Future<'_> {
        Box::pin(self.send_on_pool(req))
    }
}
