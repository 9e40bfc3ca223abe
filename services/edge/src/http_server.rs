//! The media API's HTTP/1.1 server: hyper, with the limits a public server needs.
//!
//! - `header_read_timeout`: a connection must deliver a request's headers within this time
//!   after it opens or after its previous response. That covers half-open connections, slowly
//!   dripped headers and idle keep-alive connections alike; such a connection is closed.
//! - `max_connections`: beyond this many open connections, new ones wait in the kernel's
//!   accept queue until one closes. They are not refused, and the open ones keep being served.
//!
//! Slow request *bodies* are bounded per upload (`[media] upload_idle_timeout`,
//! `min_upload_rate`). Slow *readers* of downloads hold at most one block in memory each,
//! because the body is produced block by block as the socket accepts it.

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
    /// Most connections open at once; more wait to be accepted. Default 4096.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(10), max_connections: 4096 }
    }
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.header_read_timeout.is_zero() || self.max_connections == 0 {
            return Err("http.header_read_timeout and http.max_connections must be above 0".into());
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
        let (cancel, timeout) = (cancel.clone(), config.header_read_timeout);
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(timeout);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
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
    connections.close();
    connections.wait().await;
}
