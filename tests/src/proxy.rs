//! A TCP proxy in front of one metadata node, able to cut the links from chosen source
//! addresses. Each metadata node under test makes its outgoing raft connections from its own
//! loopback address (127.0.0.x, `[meta] bind_outgoing`), so the proxy knows which node every
//! connection comes from and can partition single links; cutting a link also severs its
//! connections that are already open.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Default)]
struct State {
    target: Option<SocketAddr>,
    blocked: HashSet<IpAddr>,
    conns: Vec<(IpAddr, AbortHandle)>,
    /// Added to every read forwarded in either direction.
    delay: std::time::Duration,
}

pub struct LinkProxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: AbortHandle,
}

/// Copies one direction, sleeping the configured delay before forwarding each read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    st: Arc<Mutex<State>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = st.lock().map(|s| s.delay).unwrap_or_default();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl LinkProxy {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state: Arc<Mutex<State>> = Arc::default();
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, peer)) = listener.accept().await else { continue };
                let (target, blocked) = {
                    let s = st.lock().expect("proxy state");
                    (s.target, s.blocked.contains(&peer.ip()))
                };
                let Some(target) = target.filter(|_| !blocked) else {
                    drop(inbound);
                    continue;
                };
                let st2 = st.clone();
                let task = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::join!(pump(ri, wo, st2.clone()), pump(ro, wi, st2));
                    }
                });
                let mut s = st.lock().expect("proxy state");
                s.conns.retain(|(_, h)| !h.is_finished());
                s.conns.push((peer.ip(), task.abort_handle()));
            }
        })
        .abort_handle();
        Ok(Self { addr, state, accept })
    }

    /// Where connections go (a restarted node may listen elsewhere).
    pub fn set_target(&self, target: SocketAddr) {
        self.state.lock().expect("proxy state").target = Some(target);
    }

    /// Cuts the link from `source`: open connections are closed, new ones refused.
    pub fn block(&self, source: IpAddr) {
        let mut s = self.state.lock().expect("proxy state");
        s.blocked.insert(source);
        for (ip, h) in &s.conns {
            if *ip == source {
                h.abort();
            }
        }
    }

    /// Delays everything this proxy forwards by `delay` per read (both directions).
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.state.lock().expect("proxy state").delay = delay;
    }

    pub fn unblock_all(&self) {
        self.state.lock().expect("proxy state").blocked.clear();
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(s) = self.state.lock() {
            for (_, h) in &s.conns {
                h.abort();
            }
        }
    }
}
