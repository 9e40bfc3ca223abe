//! Starting a metadata node: raft over redb, and one gRPC server carrying the metadata API,
//! raft traffic and cluster administration.

use std::net::SocketAddr;

use anyhow::Context;
use mxcas_meta::raft::RaftNode;
use mxcas_meta::raft::service::{ClusterService, RaftService};
use mxcas_meta::server::MetaService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;

use crate::config::Config;

pub struct MetaNode {
    pub node: RaftNode,
    pub addr: SocketAddr,
    /// The address other nodes and edges use.
    pub advertise: String,
}

/// Binds `[meta] listen`, starts raft on `<data_dir>/meta` and serves until `cancel`.
pub async fn start(config: &Config, cancel: CancellationToken, tracker: &TaskTracker) -> anyhow::Result<MetaNode> {
    let min_log = bytesize::ByteSize::mib(1);
    anyhow::ensure!(
        config.meta.snapshot_log_bytes.as_u64() == 0 || config.meta.snapshot_log_bytes >= min_log,
        "[meta] snapshot_log_bytes = {} would rebuild the whole-state snapshot almost constantly; \
         set at least {min_log} (or 0: by snapshot_every only)",
        config.meta.snapshot_log_bytes
    );
    let listener = tokio::net::TcpListener::bind(config.meta.listen)
        .await
        .with_context(|| format!("cannot listen on {} (meta.listen)", config.meta.listen))?;
    let addr = listener.local_addr()?;
    let advertise = config.meta.advertise.clone().unwrap_or_else(|| addr.to_string());
    let dir = config.data_dir.join("meta");
    let tls = config.tls()?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        tls.check_own_certificate().map_err(anyhow::Error::msg)?;
        server = server.tls_config(tls.server()).context("[tls]: cannot set up the gRPC server")?;
        if !tls.restricts_nodes() {
            tracing::warn!(
                "[tls] node_names is empty: any certificate from the CA, an edge's included, may speak raft \
                 and administer the cluster; list the metadata nodes' certificate names there"
            );
        }
    }
    // Raft and cluster administration: metadata nodes (and operators holding a node's
    // certificate) only, when [tls] node_names says who they are.
    let node_guard = tls.clone();
    let nodes_only = move |req: tonic::Request<()>| -> Result<tonic::Request<()>, tonic::Status> {
        match &node_guard {
            Some(tls) => tls.check_node_peer(&req).map(|()| req),
            None => Ok(req),
        }
    };
    let node = RaftNode::start(config.meta.node_id, &dir, &config.meta.raft_settings(tls))
        .await
        .with_context(|| format!("cannot start the metadata node in {}", dir.display()))?;

    let meta = MetaService::new(node.clone());
    let raft = RaftService::new(node.raft.clone());
    let cluster = ClusterService::new(&node);
    let raft_handle = node.raft.clone();
    let c = cancel.clone();
    tracker.spawn(async move {
        // Without TCP_NODELAY every gRPC answer (headers, data, trailers) waits out Nagle's
        // algorithm against the peer's delayed ACK: ~40 ms per raft round trip.
        let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
            s
        });
        let served = server
            .add_service(meta.into_server())
            .add_service(InterceptedService::new(raft.into_server(), nodes_only.clone()))
            .add_service(InterceptedService::new(cluster.into_server(), nodes_only))
            .serve_with_incoming_shutdown(incoming, c.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metadata gRPC server failed");
        }
        if let Err(e) = raft_handle.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
    });
    tracker.spawn(mxcas_meta::raft::expire_reservations(
        node.clone(),
        std::time::Duration::from_secs(10),
        cancel.clone(),
    ));
    Ok(MetaNode { node, addr, advertise })
}
