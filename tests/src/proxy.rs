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
}

pub struct LinkProxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: AbortHandle,
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
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let mut inbound = inbound;
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
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
