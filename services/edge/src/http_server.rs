//! The media API's HTTP/1.1 server: hyper, with the limits a public server needs.
//!
//! - `header_read_timeout`: a connection must deliver a request's headers within this time
//!   after it opens or after its previous response. That covers half-open connections, slowly
//!   dripped headers and idle keep-alive connections alike; such a connection is closed.
//! - `write_timeout`: a response write that makes no progress for this long (a client that
//!   stopped reading, a zero window, pipelined requests never read) fails and the connection
//!   is closed, so a reader that never reads cannot hold its connection slot for ever.
//! - `max_connections`: beyond this many open connections, new ones wait in the kernel's
//!   accept queue until one closes. They are not refused, and the open ones keep being served.
//!   One source can still hold many slots with cheap requests every few seconds: behind a
//!   reverse proxy every client has the proxy's address, so a per-address cap belongs there.
//!
//! Slow request *bodies* are bounded per upload (`[media] upload_idle_timeout`,
//! `min_upload_rate`). Slow *readers* of downloads hold at most one block in memory each,
//! because the body is produced block by block as the socket accepts it; hyper's read buffer
//! is capped at 64 KiB per connection.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// `[http]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Time allowed for a request's headers, from a connection's opening or its previous
    /// response. Default 10s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A response write that makes no progress for this long closes the connection.
    /// Default 30s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Most connections open at once; more wait to be accepted. Default 4096.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_connections: 4096,
        }
    }
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.header_read_timeout.is_zero() || self.write_timeout.is_zero() || self.max_connections == 0 {
            return Err("http.header_read_timeout, http.write_timeout and http.max_connections must be above 0".into());
        }
        Ok(())
    }
}

/// Serves `app` on `listener` until `cancel` fires, then lets each connection finish the
/// request it is on and returns once all have closed.
pub async fn serve(listener: TcpListener, app: Router, config: HttpConfig, cancel: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let tcp = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                // A client that gave up before it was accepted: nothing to wait for.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let (cancel, timeout, write_timeout) = (cancel.clone(), config.header_read_timeout, config.write_timeout);
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            // Above the API's own limits (crate::api::MAX_HEADERS, MAX_HEADER_BYTES, MAX_URI),
            // so requests over those get its Matrix answer rather than hyper's bare one.
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .max_buf_size(64 * 1024)
                .max_headers(2 * crate::api::MAX_HEADERS);
            let conn = builder.serve_connection(TokioIo::new(WriteDeadline::new(tcp, write_timeout)), service);
            tokio::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    // Refuse new connections at once while the open ones finish (a load balancer fails over).
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// A stream whose writes fail with `TimedOut` once one has been pending, without progress,
/// for `limit`.
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Armed while a write or flush is pending; dropped on progress.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self { inner, limit, stalled: None }
    }

    /// After the inner write or flush returned `poll`: pending arms (or checks) the deadline,
    /// anything else disarms it.
    fn watch<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stalled.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing for the write timeout",
            )));
        }
        std::task::Poll::Pending
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
