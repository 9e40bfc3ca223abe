//! The metadata service replicated with openraft.
//!
//! - [`log_store::LogStore`]: the raft log, vote and commit index in redb; every append is
//!   fsynced (on a blocking thread) before openraft is told it is durable.
//! - [`sm_store::SmStore`]: the [`crate::StateMachine`] as openraft's state machine; applies
//!   committed entries in batches (fsynced now and then: the log is durable), builds snapshots by streaming the
//!   state to a file, and installs received ones.
//! - [`network`]: raft RPCs to peers over tonic gRPC, one cached channel per peer, a deadline
//!   on every call.
//! - [`service`]: the gRPC servers for raft traffic and for cluster membership.
//!
//! `mxcas serve` runs this as a one-node cluster; `mxcas meta` runs one node of a larger one.

// openraft's error types are large by design; boxing them here would only add noise.
#![allow(clippy::result_large_err)]

pub mod backup;
pub mod log_store;
pub mod network;
pub mod service;
pub mod sm_store;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use openraft::BasicNode;
use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandOutput};
use crate::error::{CommandError, StorageError};
use crate::state_machine::StateMachine;

pub type NodeId = u64;

/// What applying one log entry produced: the command's own outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(pub Result<CommandOutput, CommandError>);

openraft::declare_raft_types!(
    /// openraft types of the mxcas metadata service.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = tokio::fs::File,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// Raft timing and log-compaction settings (`[raft]` of a metadata node's config).
#[derive(Clone, Debug)]
pub struct RaftSettings {
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_every: u64,
    /// Also build one once this many bytes of log entries were appended since the last one
    /// (entries are batches of up to 256 commands, so a count alone bounds the log poorly);
    /// 0: by count only.
    pub snapshot_log_bytes: u64,
    /// Log entries kept after a snapshot (for followers slightly behind).
    pub keep_after_snapshot: u64,
    /// Deadline of one raft RPC to a peer.
    pub rpc_timeout: Duration,
    /// Local address for outgoing raft connections (default: chosen by the OS).
    pub bind_outgoing: Option<std::net::IpAddr>,
    /// A leader that has not heard from a majority for this long refuses writes at once
    /// (and abandons waiting ones) instead of letting them hang until quorum returns.
    pub quorum_lease: Duration,
    /// Mutual TLS for raft RPCs to peers (`None`: plain HTTP/2).
    pub tls: Option<crate::tls::Tls>,
    /// Least leader time between two reclaim-generation advances, whatever sweepers ask: an
    /// upload has about this long between starting and committing before its objects must
    /// be copied. The service's setting, not a caller's.
    pub reclaim_interval: Duration,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(500),
            election_timeout_max: Duration::from_millis(1000),
            snapshot_every: 10_000,
            snapshot_log_bytes: 64 << 20,
            keep_after_snapshot: 1_000,
            rpc_timeout: Duration::from_secs(3),
            bind_outgoing: None,
            quorum_lease: Duration::from_secs(2),
            tls: None,
            reclaim_interval: Duration::from_secs(600),
        }
    }
}

/// A change to a mutable fact, as this node applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub index: u64,
    /// Every change the entry at `index` made (empty: a watermark, every change up to
    /// `index` has been published).
    pub what: Vec<crate::command::Changed>,
    /// The state was replaced by an installed snapshot at `index`: watchers must resync.
    pub resync: bool,
}

/// A running raft node and the state machine it drives.
#[derive(Clone)]
pub struct RaftNode {
    pub id: NodeId,
    pub raft: Raft,
    pub sm: Arc<StateMachine>,
    /// Changes as they are applied (a bounded buffer: slow watchers see `Lagged`).
    pub changes: tokio::sync::broadcast::Sender<Change>,
    /// `Some(ms)` while this node leads but has not heard from a majority for `ms` (more than
    /// the quorum lease); `None` otherwise.
    pub quorum_lost: tokio::sync::watch::Receiver<Option<u64>>,
    /// A handle on the log store raft owns (for status reads).
    pub log: log_store::LogStore,
    /// The node's directory (stores, snapshots, temporary exports).
    pub dir: std::path::PathBuf,
    /// See [`RaftSettings::reclaim_interval`].
    pub reclaim_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("raft: {0}")]
    Raft(String),
}

impl RaftNode {
    /// Opens (or creates) the node's stores under `dir` and starts raft, talking to peers
    /// over gRPC.
    pub async fn start(id: NodeId, dir: &Path, settings: &RaftSettings) -> Result<Self, StartError> {
        let network = network::Network::new(settings.rpc_timeout, settings.bind_outgoing, settings.tls.clone());
        Self::start_with_network(id, dir, settings, network).await
    }

    /// Like [`Self::start`] with another transport (tests route messages in memory).
    pub async fn start_with_network<N: openraft::network::RaftNetworkFactory<TypeConfig>>(
        id: NodeId,
        dir: &Path,
        settings: &RaftSettings,
        network: N,
    ) -> Result<Self, StartError> {
        // openraft sends heartbeats on its tick (every 1.5 heartbeat intervals): a shorter
        // lease would lapse between two heartbeats of a healthy cluster.
        if settings.quorum_lease < settings.heartbeat_interval * 3 {
            return Err(StartError::Raft(format!(
                "quorum_lease ({:?}) must be at least 3x heartbeat_interval ({:?})",
                settings.quorum_lease, settings.heartbeat_interval
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| StorageError::Database(format!("{}: {e}", dir.display())))?;
        let config = openraft::Config {
            cluster_name: "mxcas-meta".into(),
            heartbeat_interval: settings.heartbeat_interval.as_millis() as u64,
            election_timeout_min: settings.election_timeout_min.as_millis() as u64,
            election_timeout_max: settings.election_timeout_max.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
            max_in_snapshot_log_to_keep: settings.keep_after_snapshot,
            install_snapshot_timeout: settings.rpc_timeout.as_millis() as u64 * 4,
            // Entries are batches of up to 256 commands (~128 KiB): a replication call of a
            // few of them must finish within one heartbeat interval.
            max_payload_entries: 16,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| StartError::Raft(e.to_string()))?);
        let sm = Arc::new(StateMachine::open(&dir.join("state.redb"))?);
        let log = log_store::LogStore::open(&dir.join("log.redb"))?;
        let (changes, _) = tokio::sync::broadcast::channel(4096);
        let sm_store = sm_store::SmStore::open(sm.clone(), dir.join("snapshots")).await?.with_changes(changes.clone());
        let raft =
            Raft::new(id, config, network, log.clone(), sm_store).await.map_err(|e| StartError::Raft(e.to_string()))?;
        let quorum_lost = watch_quorum(&raft, settings.quorum_lease);
        if settings.snapshot_log_bytes > 0 {
            snapshot_by_size(&raft, &log, settings.snapshot_log_bytes);
        }
        let reclaim_interval = settings.reclaim_interval;
        Ok(Self { id, raft, sm, changes, quorum_lost, log, dir: dir.to_owned(), reclaim_interval })
    }

    /// Makes `members` the first voters of a new cluster; a no-op when this node already
    /// belongs to one.
    pub async fn initialize(&self, members: BTreeMap<NodeId, BasicNode>) -> Result<(), StartError> {
        if self.raft.is_initialized().await.map_err(|e| StartError::Raft(e.to_string()))? {
            return Ok(());
        }
        self.raft.initialize(members).await.map_err(|e| StartError::Raft(e.to_string()))
    }

    /// Waits until this node sees a leader (or `timeout` passes).
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, StartError> {
        let m = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        m.current_leader.ok_or_else(|| StartError::Raft("no leader".into()))
    }
}

/// Follows the leader's "last heard from a majority" age and flags when it passes `lease`.
/// openraft recomputes the age whenever it reports metrics (at least every tick, 1.5
/// heartbeat intervals); this also re-checks every quarter lease, so a leader that has never
/// been acknowledged (cut off right after its election: openraft reports no age at all) is
/// caught once it has led for a lease. One task per node, shared by every waiting write.
fn watch_quorum(raft: &Raft, lease: Duration) -> tokio::sync::watch::Receiver<Option<u64>> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let mut metrics = raft.metrics();
    let lease_ms = lease.as_millis() as u64;
    tokio::spawn(async move {
        // When this node became leader in its current term.
        let mut leading_since: Option<(u64, tokio::time::Instant)> = None;
        loop {
            let lost = {
                let m = metrics.borrow_and_update();
                if m.state == openraft::ServerState::Leader {
                    let term = m.current_term;
                    let since = match leading_since {
                        Some((t, at)) if t == term => at,
                        _ => leading_since.insert((term, tokio::time::Instant::now())).1,
                    };
                    // Never acknowledged: as old as the leadership itself.
                    let age = m.millis_since_quorum_ack.unwrap_or(since.elapsed().as_millis() as u64);
                    (age > lease_ms).then_some(age)
                } else {
                    leading_since = None;
                    None
                }
            };
            tx.send_if_modified(|v| {
                let changed = v.is_some() != lost.is_some();
                *v = lost;
                changed
            });
            if let Ok(Err(_)) = tokio::time::timeout(lease / 4, metrics.changed()).await {
                return; // raft stopped
            }
        }
    });
    rx
}

/// How often the log is checked against [`RaftSettings::snapshot_log_bytes`].
const SNAPSHOT_SIZE_CHECK: Duration = Duration::from_secs(1);

/// Triggers a snapshot whenever `limit` bytes of entries were appended to the log since the
/// last snapshot this node built or installed (counted from this process's start). Triggering
/// is all it does: openraft builds the snapshot and purges the log as it does by count.
fn snapshot_by_size(raft: &Raft, log: &log_store::LogStore, limit: u64) {
    let (raft, log) = (raft.clone(), log.clone());
    tokio::spawn(async move {
        let mut metrics = raft.metrics();
        let mut last_snapshot = metrics.borrow().snapshot;
        // Appended bytes when the last snapshot was seen (or asked for).
        let mut base = log.appended_bytes();
        loop {
            if let Ok(Err(_)) = tokio::time::timeout(SNAPSHOT_SIZE_CHECK, metrics.changed()).await {
                return; // raft stopped
            }
            let snapshot = metrics.borrow_and_update().snapshot;
            let appended = log.appended_bytes();
            if snapshot != last_snapshot {
                last_snapshot = snapshot;
                base = appended;
            } else if appended.saturating_sub(base) >= limit {
                tracing::info!(bytes = appended - base, "log grew past snapshot_log_bytes: building a snapshot");
                // Asked once per `limit` bytes: a failed build is retried after as many more.
                base = appended;
                if raft.trigger().snapshot().await.is_err() {
                    return;
                }
            }
        }
    });
}

fn sto_err(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    e: impl std::fmt::Display,
) -> openraft::StorageError<NodeId> {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}

/// Reservations expired per raft entry: one entry stays small however many expire at once.
const EXPIRE_BATCH: u32 = 1000;

/// Expires unused reservations, from the leader only (one proposer for the whole cluster,
/// whatever the number of edges), in batches of [`EXPIRE_BATCH`] read from the expiry index,
/// stamped with the leader's clock. Runs until `cancel`.
pub async fn expire_reservations(node: RaftNode, every: Duration, cancel: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if node.raft.metrics().borrow().state != openraft::ServerState::Leader {
            continue;
        }
        // Nothing due (read from the index on this node): no raft write at all.
        match node.sm.next_expiry() {
            Ok(Some(at)) if at <= crate::server::now_ms() => {}
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the reservation expiry index");
                continue;
            }
        }
        loop {
            let mut cmd = Command::Expire { now_ms: 0, limit: EXPIRE_BATCH };
            cmd.stamp(crate::server::now_ms());
            let removed = tokio::select! {
                _ = cancel.cancelled() => return,
                r = node.raft.client_write(cmd) => match r.map(|r| r.data.0) {
                    Ok(Ok(CommandOutput::Expired { removed })) => removed,
                    Ok(other) => {
                        tracing::warn!(outcome = ?other, "unexpected answer to reservation expiry");
                        break;
                    }
                    // Lost leadership or stopping: the next leader takes over.
                    Err(e) => {
                        tracing::debug!(error = %e, "reservation expiry not applied");
                        break;
                    }
                },
            };
            if removed > 0 {
                tracing::info!(removed, "expired unused media reservations");
            }
            if removed < EXPIRE_BATCH as u64 {
                break;
            }
        }
    }
}
