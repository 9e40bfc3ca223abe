//! The gRPC face of the metadata service (`mxcas.meta.v1.Meta`).
//!
//! Writes are proposed to raft and answered once committed and applied (fsync on a majority,
//! then on this node's state machine); a follower answers `UNAVAILABLE` with the leader's
//! address in the `x-mxcas-leader` metadata so clients retry there.
//!
//! The read contract: every read an edge makes (media, content, references, generations) is
//! linearizable. It is answered by the leader after a read-index round (openraft's
//! `ensure_linearizable`: a heartbeat to a majority confirms the leadership, then the local
//! state is read once it has applied up to the commit index), so an isolated or lagging node
//! serves no reads at all. Read-index rounds are batched ([`ReadIndex`]): every read waits for
//! one round that started after it arrived, so a burst of reads costs one quorum round. What an
//! edge may serve without asking is its own cache (ready records, for at most
//! `[cache] media_ttl`), which the change feed ([`Meta::watch_changes`], leader only, resumable
//! from a log index) keeps current. `Status` is a node's own view, for operators. Errors map
//! to statuses in [`crate::pb`].

use std::sync::Arc;

use mxcas_proto::meta as pb;
use mxcas_proto::meta::meta_server::{Meta, MetaServer};
use tonic::{Request, Response, Status};

use openraft::BasicNode;
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};

use crate::claims::{Claim, Claims};
use crate::command::{Command, CommandOutput};
use crate::error::StorageError;
use crate::model::{ContentRecord, MediaKey, ThumbnailRecord};
use crate::pb::{LEADER_METADATA, cid_from_wire, status_from_command_error, status_from_storage_error};
use crate::raft::{NodeId, RaftNode};
use crate::state_machine::StateMachine;

/// Longest a read-index round may take before the read is refused as unavailable (a leader
/// cut off from its majority cannot confirm its leadership).
const READ_INDEX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the change feed proves the leader still leads (an ALIVE message).
const FEED_ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Changes read from the recorded history per step while a watcher catches up.
const FEED_REPLAY_BATCH: usize = 10_000;

/// Most commands in one raft entry (about 150 bytes each in the log, postcard: an entry stays
/// under 64 KiB, so replication calls of a few entries fit in a heartbeat interval).
const MAX_BATCH: usize = 256;

/// Writes waiting for a batch, at most; more are refused at once as overload (clients back
/// off and retry elsewhere) instead of queueing past their deadlines.
const MAX_QUEUED_WRITES: usize = 16_384;

/// Raft entries of batched writes proposed and not yet applied, at most. While they are in
/// flight, new writes queue and form the next batch: under load a batch holds every write
/// that arrived during one replication round. openraft 0.9 appends (and fsyncs) each proposed
/// entry on its own, so more entries in flight mean more fsyncs for the same writes; two let
/// one entry's append overlap the other's replication and apply (measured: 4 was no faster
/// than 2, and 1 lost the overlap).
const WRITES_IN_FLIGHT: usize = 2;

type WriteReply = tokio::sync::oneshot::Sender<Result<CommandOutput, Status>>;

/// Batches writes: concurrent commands become one raft entry ([`Command::Batch`]), so one log
/// append (fsync on a majority) and one apply transaction serve many uploads. Each command
/// keeps its own outcome; time is stamped once per entry, by this (leader) node.
#[derive(Clone)]
struct Writes {
    tx: tokio::sync::mpsc::Sender<(Command, WriteReply)>,
}

impl Writes {
    fn start(node: &RaftNode) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Command, WriteReply)>(MAX_QUEUED_WRITES);
        let node = node.clone();
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(WRITES_IN_FLIGHT));
            let clock = Arc::new(LeaderClock::default());
            while let Some(first) = rx.recv().await {
                // Wait for a slot before taking the queue: writes arriving meanwhile join.
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                // A caller that gave up (its deadline passed while queued) is not proposed.
                let mut batch: Vec<_> = Some(first).into_iter().filter(|(_, r)| !r.is_closed()).collect();
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(w) if w.1.is_closed() => {}
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let (node, clock) = (node.clone(), clock.clone());
                tokio::spawn(async move {
                    propose(&node, &clock, batch).await;
                    drop(slot);
                });
            }
        });
        Self { tx }
    }

    async fn submit(&self, cmd: Command) -> Result<CommandOutput, Status> {
        let answer = self.submit_all(vec![cmd]).await?.pop();
        answer.unwrap_or_else(|| Err(Status::internal("a write went unanswered")))
    }

    /// Submits every command of `cmds` or, when the queue cannot take them all, none (so a
    /// call refused as overloaded had no effect); answers each in order.
    async fn submit_all(&self, cmds: Vec<Command>) -> Result<Vec<Result<CommandOutput, Status>>, Status> {
        use tokio::sync::mpsc::error::TrySendError;
        let permits = match self.tx.try_reserve_many(cmds.len()) {
            Ok(p) => p,
            Err(TrySendError::Full(())) => {
                return Err(Status::unavailable(
                    "metadata leader overloaded: too many writes queued; retry with backoff",
                ));
            }
            Err(TrySendError::Closed(())) => return Err(Status::unavailable("metadata node stopping")),
        };
        let answers: Vec<_> = permits
            .zip(cmds)
            .map(|(permit, cmd)| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                permit.send((cmd, tx));
                rx
            })
            .collect();
        Ok(futures::future::join_all(
            answers
                .into_iter()
                .map(|rx| async move { rx.await.map_err(|_| Status::unavailable("metadata node stopping"))? }),
        )
        .await)
    }
}

/// The time a leader stamps on its writes: its wall clock, but never before the state's
/// clock and never running more than twice as fast as real (monotonic) time since its last
/// stamp. A clock stepped far forward (a bad RTC at boot, an NTP step) is caught up on
/// gradually instead of expiring every reservation at once; one behind the state's clock
/// holds time still until it catches up. Re-anchored on the state's clock in each new term.
#[derive(Default)]
struct LeaderClock {
    last: std::sync::Mutex<Option<(u64, u64, std::time::Instant)>>,
}

impl LeaderClock {
    fn stamp(&self, node: &RaftNode) -> u64 {
        let wall = now_ms();
        let term = node.raft.metrics().borrow().current_term;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = match *last {
            Some((t, prev, at)) if t == term => clamp_stamp(prev, at.elapsed().as_millis() as u64, wall),
            // A new term (or the first write): anchor on the replicated clock. A state that
            // never saw a time (a new cluster) takes the wall clock as it is.
            _ => match node.sm.clock() {
                Ok(0) | Err(_) => wall,
                Ok(state) => wall.min(state.saturating_add(1_000)).max(state),
            },
        };
        *last = Some((term, stamp, std::time::Instant::now()));
        stamp
    }
}

/// The next stamp after `prev`, `elapsed_ms` of monotonic time later, with the wall clock at
/// `wall`: the wall clock, kept within `[prev, prev + 2 × elapsed]`.
fn clamp_stamp(prev: u64, elapsed_ms: u64, wall: u64) -> u64 {
    wall.min(prev.saturating_add(2 * elapsed_ms + 1)).max(prev)
}

fn not_leader(m: &openraft::RaftMetrics<NodeId, BasicNode>) -> Status {
    let leader_node = m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).cloned());
    forward(&ForwardToLeader { leader_id: m.current_leader, leader_node })
}

/// Proposes `batch` as one raft entry and answers each command, unless this node leads
/// without a majority: then the writes are refused (or stop being waited for) as soon as the
/// quorum lease runs out, so clients fail over or give up instead of hanging. A write
/// abandoned this way may still commit once a majority returns; retrying it gets the same
/// answer (commands are idempotent by what they say), and an abandoned reservation holds its
/// slot until it expires.
async fn propose(node: &RaftNode, clock: &LeaderClock, batch: Vec<(Command, WriteReply)>) {
    let now = clock.stamp(node);
    let (mut cmds, replies): (Vec<Command>, Vec<WriteReply>) = batch.into_iter().unzip();
    cmds.iter_mut().for_each(|c| c.stamp(now));
    let single = cmds.len() == 1;
    let entry = if single { cmds.remove(0) } else { Command::Batch(cmds) };
    let mut quorum_lost = node.quorum_lost.clone();
    let outcome = if let Some(ms) = *quorum_lost.borrow_and_update() {
        Err(no_quorum(ms))
    } else {
        let mut metrics = node.raft.metrics();
        tokio::select! {
            resp = node.raft.client_write(entry) => resp.map(|r| r.data.0).map_err(raft_write_status),
            lost = quorum_lost.wait_for(Option::is_some) => Err(match lost.ok().and_then(|v| *v) {
                Some(ms) => no_quorum(ms),
                None => Status::unavailable("metadata node stopped"),
            }),
            // Stepped down while the entry was in flight: it commits through the new leader
            // or never, and the callers retry there (the same commit gets the same answer)
            // instead of holding one of this node's write slots until it is decided.
            stepped_down = metrics.wait_for(|m| m.state != openraft::ServerState::Leader) => Err(match stepped_down {
                Ok(m) => not_leader(&m),
                Err(_) => Status::unavailable("metadata node stopped"),
            }),
        }
    };
    let answer = |r: Result<CommandOutput, crate::error::CommandError>| r.map_err(|e| status_from_command_error(&e));
    match outcome {
        Ok(Ok(CommandOutput::Batch(outcomes))) if !single && outcomes.len() == replies.len() => {
            for (reply, o) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(answer(o));
            }
        }
        Ok(result) if single => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(answer(result));
            }
        }
        Ok(other) => {
            let status = Status::internal(format!("state machine answered a batch with {other:?}"));
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}

/// Batches read-index rounds: a read joins the next round to start, and each round answers
/// every read that was waiting when it started.
#[derive(Clone)]
struct ReadIndex {
    tx: tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<Result<(), Status>>>,
}

impl ReadIndex {
    fn start(node: &RaftNode) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<Result<(), Status>>>();
        let raft = node.raft.clone();
        let quorum_lost = node.quorum_lost.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut waiting = vec![first];
                while let Ok(more) = rx.try_recv() {
                    waiting.push(more);
                }
                let result = if let Some(ms) = *quorum_lost.borrow() {
                    Err(no_quorum(ms))
                } else {
                    match tokio::time::timeout(READ_INDEX_TIMEOUT, raft.ensure_linearizable()).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(raft_read_status(e)),
                        Err(_) => Err(Status::unavailable(format!(
                            "this metadata node could not confirm its leadership within {READ_INDEX_TIMEOUT:?}"
                        ))),
                    }
                };
                for w in waiting {
                    let _ = w.send(result.clone());
                }
            }
        });
        Self { tx }
    }

    /// Returns once this node is confirmed leader and has applied everything committed before
    /// the call.
    async fn confirm(&self) -> Result<(), Status> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(tx).map_err(|_| Status::unavailable("metadata node stopping"))?;
        rx.await.map_err(|_| Status::unavailable("metadata node stopping"))?
    }
}

#[derive(Clone)]
pub struct MetaService {
    node_id: u64,
    sm: Arc<StateMachine>,
    node: RaftNode,
    read_index: ReadIndex,
    writes: Writes,
    /// The last state digest and the applied index it was computed at: a digest reads the
    /// whole state, so it is computed once per state, by one caller at a time.
    digest: Arc<tokio::sync::Mutex<Option<DigestAt>>>,
    /// Which edge is making which unrecorded thumbnail (advice only, see [`crate::claims`]).
    claims: Arc<std::sync::Mutex<Claims<(cid::Cid, crate::model::ThumbnailSpec)>>>,
    /// Which edge is fetching which remote media (advice only, see [`crate::claims`]).
    fetch_claims: Arc<std::sync::Mutex<Claims<String>>>,
}

/// A state digest and the applied index it was computed at.
type DigestAt = (u64, [u8; 32]);

/// `UNAVAILABLE`, naming the leader (when known) for the client to retry there.
fn forward(f: &ForwardToLeader<NodeId, BasicNode>) -> Status {
    let mut status = Status::unavailable(match &f.leader_id {
        Some(id) => format!("this metadata node is not the leader; node {id} is"),
        None => "this metadata node is not the leader and knows of none (election in progress)".to_owned(),
    });
    if let Some(node) = &f.leader_node
        && let Ok(v) = node.addr.parse()
    {
        status.metadata_mut().insert(LEADER_METADATA, v);
    }
    status
}

fn no_quorum(ms: u64) -> Status {
    Status::unavailable(format!("metadata cluster has no quorum: the leader has not heard from a majority for {ms} ms"))
}

fn raft_write_status(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => forward(&f),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => Status::failed_precondition(e.to_string()),
        RaftError::Fatal(f) => {
            tracing::error!(error = %f, "raft stopped");
            Status::unavailable(format!("metadata node stopped: {f}"))
        }
    }
}

fn raft_read_status(e: RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => forward(&f),
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
            Status::unavailable(format!("metadata cluster has no quorum: {q}"))
        }
        RaftError::Fatal(f) => Status::unavailable(format!("metadata node stopped: {f}")),
    }
}

impl MetaService {
    pub fn new(node: RaftNode) -> Self {
        let read_index = ReadIndex::start(&node);
        let writes = Writes::start(&node);
        Self {
            node_id: node.id,
            sm: node.sm.clone(),
            node,
            read_index,
            writes,
            digest: Default::default(),
            claims: Default::default(),
            fetch_claims: Default::default(),
        }
    }

    /// The tonic service to mount on a server.
    pub fn into_server(self) -> MetaServer<Self> {
        MetaServer::new(self)
    }

    /// False once raft stopped (a storage failure is fatal): the node must not get traffic.
    pub fn is_healthy(&self) -> bool {
        self.node.raft.metrics().borrow().running_state.is_ok()
    }

    /// Proposes `cmd` (batched with concurrent writes, see [`Writes`] and [`propose`]) and
    /// waits for its outcome.
    async fn apply(&self, cmd: Command) -> Result<CommandOutput, Status> {
        if let Some(ms) = *self.node.quorum_lost.borrow() {
            return Err(no_quorum(ms));
        }
        self.writes.submit(cmd).await
    }

    /// Reads after confirming, through the leader's read index, that this node's state is
    /// current (linearizable).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateMachine) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, Status> {
        self.read_index.confirm().await?;
        self.read_local(f).await
    }

    /// Reads this node's state as it is (operators' status only).
    async fn read_local<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateMachine) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, Status> {
        let sm = self.sm.clone();
        tokio::task::spawn_blocking(move || f(&sm))
            .await
            .map_err(|e| Status::internal(format!("read task failed: {e}")))?
            .map_err(|e| status_from_storage_error(&e))
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A feed message that carries no change: RESYNC or ALIVE at `index`.
fn marker(kind: pb::change::Kind, index: u64) -> pb::Change {
    pb::Change { kind: kind as i32, index, media: None, cid: Vec::new() }
}

fn change_to_wire(index: u64, what: &crate::command::Changed) -> pb::Change {
    use crate::command::Changed;
    match what {
        Changed::Ready(key) => {
            pb::Change { kind: pb::change::Kind::Ready as i32, index, media: Some(key.into()), cid: Vec::new() }
        }
        Changed::Content(cid) => {
            pb::Change { kind: pb::change::Kind::Content as i32, index, media: None, cid: cid.to_bytes() }
        }
    }
}

/// Sends the recorded changes after `*last` (moving `*last` on), first a RESYNC when some are
/// no longer recorded (or, when `first`, if the watcher is too far behind). Errs when the
/// watcher is gone.
async fn replay(
    sm: &Arc<StateMachine>,
    tx: &tokio::sync::mpsc::Sender<Result<pb::Change, Status>>,
    last: &mut u64,
) -> Result<(), ()> {
    let mut first = true;
    loop {
        let (sm2, after) = (sm.clone(), *last);
        let read = tokio::task::spawn_blocking(move || sm2.changes_since(after, FEED_REPLAY_BATCH)).await;
        let (complete, batch) = match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return tx.send(Err(status_from_storage_error(&e))).await.map_err(|_| ()).and(Err(())),
            Err(e) => return tx.send(Err(Status::internal(e.to_string()))).await.map_err(|_| ()).and(Err(())),
        };
        if std::mem::take(&mut first) && !complete {
            tx.send(Ok(marker(pb::change::Kind::Resync, after))).await.map_err(|_| ())?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        for (index, what) in batch {
            *last = (*last).max(index);
            tx.send(Ok(change_to_wire(index, &what))).await.map_err(|_| ())?;
        }
    }
}

/// Commits one call of `CommitUploads` may carry.
const MAX_COMMITS_PER_CALL: usize = 1024;

fn commit_command(r: pb::CommitUploadRequest) -> Result<Command, Status> {
    let media = required(r.media, "media")?;
    let content = ContentRecord::try_from(required(r.content, "content")?)?;
    let (user, tenant) = (r.user_id.clone(), media.server_name.clone());
    let commit = Command::CommitUpload {
        server_name: media.server_name,
        media_id: Some(media.media_id).filter(|m| !m.is_empty()),
        user_id: r.user_id,
        now_ms: 0,
        content: ContentRecord { refcount: 0, created_at_ms: 0, lost: false, ..content },
        content_type: r.content_type,
        filename: r.filename,
        lost_key: r.lost_key,
    };
    Ok(match r.quota {
        Some(q) => Command::Limited { quota: q.into(), user, tenant, command: Box::new(commit) },
        None => commit,
    })
}

fn committed(out: CommandOutput) -> Result<pb::CommitUploadResponse, Status> {
    match out {
        CommandOutput::Committed(o) => Ok(pb::CommitUploadResponse {
            media: Some((&o.media).into()),
            content: Some((&o.content).into()),
            deduplicated: o.deduplicated,
            generation: o.generation,
        }),
        other => Err(unexpected(other)),
    }
}

fn required<T>(field: Option<T>, name: &str) -> Result<T, Status> {
    field.ok_or_else(|| Status::invalid_argument(format!("missing field {name}")))
}

fn unexpected(out: CommandOutput) -> Status {
    Status::internal(format!("state machine answered with the wrong output: {out:?}"))
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn create_pending(
        &self,
        req: Request<pb::CreatePendingRequest>,
    ) -> Result<Response<pb::CreatePendingResponse>, Status> {
        let r = req.into_inner();
        let media: MediaKey = required(r.media, "media")?.into();
        let (user, tenant) = (r.user_id.clone(), media.server_name.clone());
        let cmd = Command::CreatePending {
            media,
            user_id: r.user_id,
            now_ms: 0,
            ttl_ms: r.ttl_ms,
            max_pending_per_user: r.max_pending_per_user,
        };
        let cmd = match r.quota {
            Some(q) => Command::Limited { quota: q.into(), user, tenant, command: Box::new(cmd) },
            None => cmd,
        };
        match self.apply(cmd).await? {
            CommandOutput::Pending(media) => {
                Ok(Response::new(pb::CreatePendingResponse { media: Some((&media).into()) }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn commit_upload(
        &self,
        req: Request<pb::CommitUploadRequest>,
    ) -> Result<Response<pb::CommitUploadResponse>, Status> {
        let cmd = commit_command(req.into_inner())?;
        committed(self.apply(cmd).await?).map(Response::new)
    }

    async fn commit_uploads(
        &self,
        req: Request<pb::CommitUploadsRequest>,
    ) -> Result<Response<pb::CommitUploadsResponse>, Status> {
        let commits = req.into_inner().commits;
        if commits.len() > MAX_COMMITS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} commits in one call; at most {MAX_COMMITS_PER_CALL}",
                commits.len()
            )));
        }
        // Malformed commits are answered on their own; the others are submitted together (all
        // or none), so they join the same raft entries.
        let (mut valid, mut malformed) = (Vec::new(), Vec::new());
        for commit in commits {
            match commit_command(commit) {
                Ok(cmd) => {
                    valid.push(cmd);
                    malformed.push(None);
                }
                Err(status) => malformed.push(Some(status)),
            }
        }
        let mut answers = if valid.is_empty() {
            Vec::new().into_iter()
        } else {
            if let Some(ms) = *self.node.quorum_lost.borrow() {
                return Err(no_quorum(ms));
            }
            self.writes.submit_all(valid).await?.into_iter()
        };
        let unanswered = || Err(Status::internal("a commit went unanswered"));
        let outcomes: Vec<Result<pb::CommitUploadResponse, Status>> = malformed
            .into_iter()
            .map(|m| match m {
                None => answers.next().unwrap_or_else(unanswered).and_then(committed),
                Some(status) => Err(status),
            })
            .collect();
        // Taken but not decided here (this node stepped down, lost its quorum, or is stopping):
        // the whole call is retried, at the leader named if any; commits that did get through
        // answer the same again.
        let refused: Vec<&Status> =
            outcomes.iter().filter_map(|o| o.as_ref().err()).filter(|s| s.code() == tonic::Code::Unavailable).collect();
        if let Some(first) = refused.first() {
            let redirect = refused.iter().find(|s| s.metadata().contains_key(LEADER_METADATA));
            return Err((*redirect.unwrap_or(first)).clone());
        }
        let results = outcomes
            .into_iter()
            .map(|o| pb::CommitResult {
                result: Some(match o {
                    Ok(c) => pb::commit_result::Result::Committed(c),
                    Err(s) => pb::commit_result::Result::Failed(pb::CommitFailure {
                        code: s.code() as i32,
                        message: s.message().to_owned(),
                    }),
                }),
            })
            .collect();
        Ok(Response::new(pb::CommitUploadsResponse { results }))
    }

    async fn begin_sweep(&self, req: Request<pb::BeginSweepRequest>) -> Result<Response<pb::Generations>, Status> {
        // The interval is the service's: a caller asking for less cannot shorten the window
        // uploads have to commit in.
        let min_interval_ms = req.into_inner().min_interval_ms.max(self.node.reclaim_interval.as_millis() as u64);
        match self.apply(Command::BeginSweep { now_ms: 0, min_interval_ms }).await? {
            CommandOutput::Sweep(g) => Ok(Response::new(g.into())),
            other => Err(unexpected(other)),
        }
    }

    async fn get_generations(
        &self,
        _req: Request<pb::GetGenerationsRequest>,
    ) -> Result<Response<pb::Generations>, Status> {
        let g = self.read(|sm| sm.generations()).await?;
        Ok(Response::new(g.into()))
    }

    async fn register_store(
        &self,
        req: Request<pb::RegisterStoreRequest>,
    ) -> Result<Response<pb::RegisterStoreResponse>, Status> {
        let id = req.into_inner().store_id;
        match self.apply(Command::RegisterStore { id }).await? {
            CommandOutput::StoreId(store_id) => Ok(Response::new(pb::RegisterStoreResponse { store_id })),
            other => Err(unexpected(other)),
        }
    }

    async fn report_lost(
        &self,
        req: Request<pb::ReportLostRequest>,
    ) -> Result<Response<pb::ReportLostResponse>, Status> {
        let r = req.into_inner();
        let cid = cid_from_wire(&r.cid)?;
        match self.apply(Command::ReportLost { cid, blob_key: r.blob_key }).await? {
            CommandOutput::Lost { marked } => Ok(Response::new(pb::ReportLostResponse { marked })),
            other => Err(unexpected(other)),
        }
    }

    async fn get_media(&self, req: Request<pb::GetMediaRequest>) -> Result<Response<pb::GetMediaResponse>, Status> {
        let key: MediaKey = required(req.into_inner().media, "media")?.into();
        let (media, content) = self
            .read(move |sm| {
                let media = sm.get_media(&key)?;
                let content = match media.as_ref().and_then(|m| m.cid()) {
                    Some(cid) => sm.get_content(cid)?,
                    None => None,
                };
                Ok((media, content))
            })
            .await?;
        Ok(Response::new(pb::GetMediaResponse {
            media: media.as_ref().map(Into::into),
            content: content.as_ref().map(Into::into),
        }))
    }

    async fn get_content(
        &self,
        req: Request<pb::GetContentRequest>,
    ) -> Result<Response<pb::GetContentResponse>, Status> {
        let cid = cid_from_wire(&req.into_inner().cid)?;
        let content = self.read(move |sm| sm.get_content(&cid)).await?;
        Ok(Response::new(pb::GetContentResponse { content: content.as_ref().map(Into::into) }))
    }

    async fn index_blocks(
        &self,
        req: Request<pb::IndexBlocksRequest>,
    ) -> Result<Response<pb::IndexBlocksResponse>, Status> {
        let r = req.into_inner();
        let root = cid_from_wire(&r.root)?;
        if r.blocks.len() > crate::command::MAX_BLOCKS_PER_INDEX {
            return Err(Status::invalid_argument(format!(
                "{} blocks in one call (at most {}): send them in several",
                r.blocks.len(),
                crate::command::MAX_BLOCKS_PER_INDEX
            )));
        }
        let blocks = r.blocks.iter().map(|b| cid_from_wire(b)).collect::<Result<Vec<_>, _>>()?;
        match self.apply(Command::IndexBlocks { root, blocks }).await? {
            CommandOutput::Indexed { added } => Ok(Response::new(pb::IndexBlocksResponse { added })),
            other => Err(unexpected(other)),
        }
    }

    async fn find_block(&self, req: Request<pb::FindBlockRequest>) -> Result<Response<pb::FindBlockResponse>, Status> {
        let cid = cid_from_wire(&req.into_inner().cid)?;
        let roots = self.read(move |sm| sm.block_roots(&cid)).await?;
        Ok(Response::new(pb::FindBlockResponse { roots: roots.iter().map(|c| c.to_bytes()).collect() }))
    }

    async fn commit_thumbnail(
        &self,
        req: Request<pb::CommitThumbnailRequest>,
    ) -> Result<Response<pb::CommitThumbnailResponse>, Status> {
        let r = req.into_inner();
        let t = ThumbnailRecord::try_from(required(r.thumbnail, "thumbnail")?)?;
        let content = ContentRecord::try_from(required(r.content, "content")?)?;
        if content.cid != t.cid {
            return Err(Status::invalid_argument("the thumbnail's CID is not its content's"));
        }
        let cmd = Command::CommitThumbnail {
            source: t.source,
            spec: t.spec,
            now_ms: 0,
            content: ContentRecord { refcount: 0, created_at_ms: 0, lost: false, ..content },
            content_type: t.content_type,
            width: t.width,
            height: t.height,
            animated: t.animated,
            lost_key: r.lost_key,
        };
        let key = (t.source, t.spec);
        let outcome = self.apply(cmd).await?;
        self.claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recorded(&key);
        match outcome {
            CommandOutput::Thumbnail(o) => Ok(Response::new(pb::CommitThumbnailResponse {
                thumbnail: Some((&o.thumbnail).into()),
                content: Some((&o.content).into()),
                deduplicated: o.deduplicated,
                generation: o.generation,
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn get_thumbnails(
        &self,
        req: Request<pb::GetThumbnailsRequest>,
    ) -> Result<Response<pb::GetThumbnailsResponse>, Status> {
        let source = cid_from_wire(&req.into_inner().source)?;
        let found = self.read(move |sm| sm.thumbnails(&source)).await?;
        let thumbnails = found
            .iter()
            .map(|(t, c)| pb::RecordedThumbnail { thumbnail: Some(t.into()), content: c.as_ref().map(Into::into) })
            .collect();
        Ok(Response::new(pb::GetThumbnailsResponse { thumbnails }))
    }

    async fn claim_thumbnail(
        &self,
        req: Request<pb::ClaimThumbnailRequest>,
    ) -> Result<Response<pb::ClaimThumbnailResponse>, Status> {
        let r = req.into_inner();
        let source = cid_from_wire(&r.source)?;
        let spec = crate::model::ThumbnailSpec::try_from(required(r.spec, "spec")?)?;
        if r.claimant.is_empty() || r.claimant.len() > 256 {
            return Err(Status::invalid_argument("claimant must be 1 to 256 bytes"));
        }
        // Only the leader arbitrates (a follower answers with a redirect).
        self.read_index.confirm().await?;
        let key = (source, spec);
        let mut claims = self.claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.release {
            claims.release(&key, &r.claimant);
            return Ok(Response::new(pb::ClaimThumbnailResponse { granted: true, held_for_ms: 0 }));
        }
        let lease = std::time::Duration::from_millis(r.lease_ms);
        let (granted, held_for_ms) = on_wire(claims.claim(key, &r.claimant, lease, std::time::Instant::now()));
        Ok(Response::new(pb::ClaimThumbnailResponse { granted, held_for_ms }))
    }

    async fn claim_fetch(
        &self,
        req: Request<pb::ClaimFetchRequest>,
    ) -> Result<Response<pb::ClaimFetchResponse>, Status> {
        let r = req.into_inner();
        // `mxc://` + a server name (255 at most) + `/` + a media ID (255 at most).
        if r.media.is_empty() || r.media.len() > 600 {
            return Err(Status::invalid_argument("media must be 1 to 600 bytes"));
        }
        if r.claimant.is_empty() || r.claimant.len() > 256 {
            return Err(Status::invalid_argument("claimant must be 1 to 256 bytes"));
        }
        // Only the leader arbitrates (a follower answers with a redirect).
        self.read_index.confirm().await?;
        let mut claims = self.fetch_claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.release {
            claims.release(&r.media, &r.claimant);
            return Ok(Response::new(pb::ClaimFetchResponse { granted: true, held_for_ms: 0 }));
        }
        let lease = std::time::Duration::from_millis(r.lease_ms);
        let (granted, held_for_ms) = on_wire(claims.claim(r.media, &r.claimant, lease, std::time::Instant::now()));
        Ok(Response::new(pb::ClaimFetchResponse { granted, held_for_ms }))
    }

    async fn get_usage(&self, req: Request<pb::GetUsageRequest>) -> Result<Response<pb::GetUsageResponse>, Status> {
        let r = req.into_inner();
        let now = now_ms();
        let (u, t) = self.read(move |sm| sm.usage(&r.user_id, &r.tenant, r.period_ms, now.max(sm.clock()?))).await?;
        let wire = |u: crate::model::Usage| Some(pb::Usage { bytes: u.bytes, files: u.files });
        Ok(Response::new(pb::GetUsageResponse { user: wire(u), tenant: wire(t) }))
    }

    async fn referenced(
        &self,
        req: Request<pb::ReferencedRequest>,
    ) -> Result<Response<pb::ReferencedResponse>, Status> {
        let keys = req.into_inner().keys;
        if keys.len() > 10_000 {
            return Err(Status::invalid_argument("at most 10000 keys per call"));
        }
        let referenced = self.read(move |sm| sm.referenced(&keys)).await?;
        Ok(Response::new(pb::ReferencedResponse { referenced }))
    }

    type WatchChangesStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Change, Status>> + Send + 'static>>;

    async fn watch_changes(
        &self,
        req: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        // Only the leader can prove its feed is current (a follower would redirect here).
        self.read_index.confirm().await?;
        let mut after = req.into_inner().after_index;
        // Subscribe before reading the history, so nothing falls between the two.
        let mut live = self.node.changes.subscribe();
        let (sm, read_index) = (self.sm.clone(), self.read_index.clone());
        let applied = sm.last_applied().map_err(|e| status_from_storage_error(&e))?;
        if after == 0 {
            after = applied;
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::Change, Status>>(1024);
        tokio::spawn(async move {
            let mut last = after;
            // A position past this state's end comes from another history (a cluster restored
            // from a backup): everything the watcher holds may be stale.
            if after > applied {
                if tx.send(Ok(marker(pb::change::Kind::Resync, applied))).await.is_err() {
                    return;
                }
                last = applied;
            }
            if replay(&sm, &tx, &mut last).await.is_err() {
                return;
            }
            let mut alive = tokio::time::interval(FEED_ALIVE_EVERY);
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    item = live.recv() => match item {
                        // This node installed a snapshot: the changes it replaced are unknown.
                        Ok(c) if c.resync => {
                            last = c.index;
                            if tx.send(Ok(marker(pb::change::Kind::Resync, c.index))).await.is_err() {
                                return;
                            }
                        }
                        Ok(c) if c.index <= last => {}
                        Ok(c) => {
                            last = c.index;
                            for what in &c.what {
                                if tx.send(Ok(change_to_wire(c.index, what))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        // Fell behind the live feed: catch up from the recorded history.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            if replay(&sm, &tx, &mut last).await.is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = alive.tick() => {
                        let msg = match read_index.confirm().await {
                            Ok(()) => Ok(marker(pb::change::Kind::Alive, last)),
                            // No longer (provably) the leader: end the feed; the watcher
                            // resumes from `last` elsewhere.
                            Err(status) => Err(status),
                        };
                        let end = msg.is_err();
                        if tx.send(msg).await.is_err() || end {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let want_digest = req.into_inner().digest;
        let node_id = self.node_id;
        // The node's own view, without a leader round trip: operators ask every node.
        let (last_applied, (media_count, content_count)) =
            self.read_local(move |sm| Ok((sm.last_applied()?, sm.counts()?))).await?;
        let state_digest = if want_digest {
            // One full read at a time, and none again until the state changes: any metadata
            // client may ask, so asking must not be a way to load the node.
            let Ok(mut cached) = self.digest.try_lock() else {
                return Err(Status::resource_exhausted("a state digest is being computed; ask again shortly"));
            };
            let (at, digest) = match *cached {
                Some((at, d)) if at == self.sm.last_applied().map_err(|e| status_from_storage_error(&e))? => (at, d),
                _ => self.read_local(|sm| sm.digest_at()).await?,
            };
            *cached = Some((at, digest));
            crate::raft::backup::hex(&digest)
        } else {
            String::new()
        };
        Ok(Response::new(pb::StatusResponse { node_id, last_applied, media_count, content_count, state_digest }))
    }
}

/// A claim's answer as the claim responses carry it: (granted, held for ms, at least 1).
fn on_wire(claim: Claim) -> (bool, u64) {
    match claim {
        Claim::Granted => (true, 0),
        Claim::Held(left) => (false, u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::{Command, Writes, clamp_stamp};

    #[tokio::test]
    async fn a_call_that_does_not_fit_the_queue_is_refused_whole_and_queues_nothing() {
        // A queue of 4 that nothing drains: the leader's proposer is busy.
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let writes = std::sync::Arc::new(Writes { tx });
        let expire = |n: u64| Command::Expire { now_ms: n, limit: 1 };
        let first = tokio::spawn({
            let writes = writes.clone();
            async move { writes.submit_all(vec![expire(1), expire(2), expire(3)]).await.map(|a| a.len()) }
        });
        while rx.len() < 3 {
            tokio::task::yield_now().await;
        }
        // Two more do not fit in the one slot left: neither is queued.
        let refused = writes.submit_all(vec![expire(4), expire(5)]).await.expect_err("overloaded");
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(refused.message().contains("overloaded"), "{}", refused.message());
        assert_eq!(rx.len(), 3, "a refused call queued part of itself");
        // One does.
        let second = tokio::spawn({
            let writes = writes.clone();
            async move { writes.submit_all(vec![expire(6)]).await.map(|a| a.len()) }
        });
        let mut queued = Vec::new();
        for _ in 0..4 {
            let (cmd, reply) = rx.recv().await.expect("queued");
            let Command::Expire { now_ms, .. } = cmd else { panic!("{cmd:?}") };
            queued.push(now_ms);
            let _ = reply.send(Ok(crate::command::CommandOutput::Expired { removed: 0 }));
        }
        assert_eq!(queued, vec![1, 2, 3, 6]);
        assert_eq!(first.await.expect("join").expect("answered"), 3);
        assert_eq!(second.await.expect("join").expect("answered"), 1);
    }

    #[test]
    fn a_leader_clock_never_goes_back_nor_jumps_ahead() {
        // In step with real time: the wall clock.
        assert_eq!(clamp_stamp(1_000, 10, 1_010), 1_010);
        // Stepped back an hour: time holds still rather than going back.
        assert_eq!(clamp_stamp(10_000_000, 10, 6_400_000), 10_000_000);
        // Stepped forward a day: at most twice real time, so reservations expire on schedule
        // instead of all at once.
        assert_eq!(clamp_stamp(1_000, 10, 1_000 + 86_400_000), 1_021);
        // Catching up over many stamps at twice the real rate.
        let (mut t, wall) = (0u64, 100u64);
        for _ in 0..10 {
            t = clamp_stamp(t, 5, wall);
        }
        assert_eq!(t, wall);
    }
}
