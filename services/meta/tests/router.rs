//! Three metadata nodes in one process, with their real redb stores, over an in-memory
//! router that can drop or delay every message between two nodes: leader failover, no
//! split brain, convergence, and identical applied state on every node.

#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mxcas_meta::command::{Command, CommandOutput};
use mxcas_meta::model::ContentRecord;
use mxcas_meta::raft::{BasicNode, NodeId, RaftNode, RaftSettings, TypeConfig};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

#[derive(Default)]
struct RouterState {
    nodes: HashMap<NodeId, mxcas_meta::raft::Raft>,
    /// (from, to) pairs whose messages are dropped.
    cut: HashSet<(NodeId, NodeId)>,
    delay: Duration,
}

#[derive(Clone, Default)]
struct Router(Arc<Mutex<RouterState>>);

#[derive(Debug, thiserror::Error)]
#[error("link {0} -> {1} is cut")]
struct Cut(NodeId, NodeId);

impl Router {
    fn isolate(&self, id: NodeId, all: &[NodeId]) {
        let mut s = self.0.lock().expect("router");
        for other in all.iter().filter(|o| **o != id) {
            s.cut.insert((id, *other));
            s.cut.insert((*other, id));
        }
    }

    fn heal(&self) {
        self.0.lock().expect("router").cut.clear();
    }

    fn set_delay(&self, d: Duration) {
        self.0.lock().expect("router").delay = d;
    }

    /// The target's raft handle, after the link's delay, unless the link is cut.
    async fn route(&self, from: NodeId, to: NodeId) -> Result<mxcas_meta::raft::Raft, Unreachable> {
        let (target, delay) = {
            let s = self.0.lock().expect("router");
            if s.cut.contains(&(from, to)) {
                return Err(Unreachable::new(&Cut(from, to)));
            }
            (s.nodes.get(&to).cloned(), s.delay)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        target.ok_or_else(|| Unreachable::new(&Cut(from, to)))
    }
}

struct Conn {
    from: NodeId,
    to: NodeId,
    router: Router,
}

struct Factory {
    from: NodeId,
    router: Router,
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Conn;
    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Conn {
        Conn { from: self.from, to: target, router: self.router.clone() }
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let raft = self.router.route(self.from, self.to).await.map_err(RPCError::Unreachable)?;
        raft.append_entries(req).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        let raft = self.router.route(self.from, self.to).await.map_err(RPCError::Unreachable)?;
        raft.install_snapshot(req).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let raft = self.router.route(self.from, self.to).await.map_err(RPCError::Unreachable)?;
        raft.vote(req).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}

fn upload(n: u64) -> Command {
    let cid = cid::Cid::new_v1(0x55, multihash::Multihash::<64>::wrap(0x12, &n.to_le_bytes()).expect("fits"));
    Command::CommitUpload {
        server_name: "hs".into(),
        media_id: None,
        user_id: "@a:hs".into(),
        now_ms: n,
        content: ContentRecord {
            cid,
            size: 8,
            chunk_size: 1 << 20,
            blob_key: mxcas_meta::model::blob_key::new(1, &n.to_string()),
            index_key: None,
            refcount: 0,
            created_at_ms: n,
            lost: false,
        },
        content_type: "application/octet-stream".into(),
        filename: None,
        lost_key: None,
    }
}

async fn leader_among(nodes: &[RaftNode], ids: &[NodeId]) -> Option<NodeId> {
    let mut votes: BTreeMap<NodeId, usize> = BTreeMap::new();
    for n in nodes.iter().filter(|n| ids.contains(&n.id)) {
        if let Some(l) = n.raft.metrics().borrow().current_leader {
            *votes.entry(l).or_default() += 1;
        }
    }
    votes.into_iter().find(|(l, v)| *v == ids.len() && ids.contains(l)).map(|(l, _)| l)
}

async fn wait_leader(nodes: &[RaftNode], ids: &[NodeId]) -> NodeId {
    for _ in 0..200 {
        if let Some(l) = leader_among(nodes, ids).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader among {ids:?}");
}

async fn write(nodes: &[RaftNode], leader: NodeId, n: u64) {
    let node = nodes.iter().find(|x| x.id == leader).expect("leader exists");
    let resp = node.raft.client_write(upload(n)).await.expect("write commits");
    assert!(matches!(resp.data.0, Ok(CommandOutput::Committed(_))));
}

/// Nodes `ids` over `router`, initialized as one cluster.
async fn start_cluster(router: &Router, settings: &RaftSettings, ids: &[NodeId]) -> (tempfile::TempDir, Vec<RaftNode>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = Vec::new();
    for &id in ids {
        let net = Factory { from: id, router: router.clone() };
        let node = RaftNode::start_with_network(id, &dir.path().join(format!("n{id}")), settings, net)
            .await
            .expect("node starts");
        router.0.lock().expect("router").nodes.insert(id, node.raft.clone());
        nodes.push(node);
    }
    let members: BTreeMap<NodeId, BasicNode> =
        ids.iter().map(|i| (*i, BasicNode { addr: format!("node{i}") })).collect();
    nodes[0].initialize(members).await.expect("init");
    (dir, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_compacted_by_size_as_well_as_by_count() {
    let router = Router::default();
    // By count, no snapshot would be due for a million entries; by size, after 16 KiB.
    let settings = RaftSettings {
        snapshot_every: 1_000_000,
        snapshot_log_bytes: 16 << 10,
        keep_after_snapshot: 5,
        ..RaftSettings::default()
    };
    let ids = [1u64, 2, 3];
    let (_dir, nodes) = start_cluster(&router, &settings, &ids).await;
    let leader = wait_leader(&nodes, &ids).await;
    for n in 0..200 {
        write(&nodes, leader, n).await;
    }
    let appended = nodes[(leader - 1) as usize].log.appended_bytes();
    assert!(appended > 16 << 10, "200 commits appended only {appended} bytes");
    for node in &nodes {
        let m = node
            .raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.snapshot.is_some() && m.purged.is_some(), "a snapshot by size, and the log purged")
            .await
            .unwrap_or_else(|e| panic!("node {}: {e}", node.id));
        assert!(m.snapshot.is_some_and(|s| s.index > 5), "node {}: {:?}", node.id, m.snapshot);
    }
    for n in &nodes {
        let _ = n.raft.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_partition_and_delays_converge_without_split_brain() {
    let router = Router::default();
    let settings = RaftSettings { snapshot_every: 30, keep_after_snapshot: 5, ..RaftSettings::default() };
    let ids = [1u64, 2, 3];
    let (_dir, nodes) = start_cluster(&router, &settings, &ids).await;
    let leader = wait_leader(&nodes, &ids).await;
    for n in 0..20 {
        write(&nodes, leader, n).await;
    }

    // Cut the leader off: the other two elect a new leader and keep committing.
    router.isolate(leader, &ids);
    let rest: Vec<NodeId> = ids.iter().copied().filter(|i| *i != leader).collect();
    let new = wait_leader(&nodes, &rest).await;
    assert_ne!(new, leader);
    let isolated_applied = nodes[(leader - 1) as usize].sm.last_applied().expect("read");
    // The isolated node cannot commit anything of its own.
    let stale = nodes[(leader - 1) as usize].raft.clone();
    let attempt = tokio::time::timeout(Duration::from_secs(2), stale.client_write(upload(999))).await;
    assert!(!matches!(attempt, Ok(Ok(_))), "an isolated leader committed a write: split brain");
    for n in 20..60 {
        write(&nodes, new, n).await;
    }
    assert_eq!(nodes[(leader - 1) as usize].sm.last_applied().expect("read"), isolated_applied);

    // Slow links, then heal: everyone converges (the old leader by snapshot: the log it
    // missed has been compacted) to exactly the same state.
    router.set_delay(Duration::from_millis(20));
    router.heal();
    for n in 60..70 {
        let l = wait_leader(&nodes, &ids).await;
        write(&nodes, l, n).await;
    }
    router.set_delay(Duration::ZERO);
    let mut digests = Vec::new();
    for _ in 0..200 {
        digests = nodes.iter().map(|n| (n.sm.last_applied().expect("read"), n.sm.digest().expect("digest"))).collect();
        if digests.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "replicas differ: {digests:?}");
    assert_eq!(nodes[0].sm.counts().expect("counts").0, 70, "every committed write, and only those");
    for n in &nodes {
        let _ = n.raft.shutdown().await;
    }
}
