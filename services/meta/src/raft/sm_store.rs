//! The [`StateMachine`] as openraft's state machine, with snapshots as files.
//!
//! Committed entries are applied in the batches openraft hands over, in one redb transaction
//! that also records the last applied log ID and the membership, fsynced every 64th apply or
//! once a second (the log holds every entry durably; a crash rewinds the state to its last
//! fsynced apply and openraft re-applies the rest) and always before a snapshot lets openraft
//! purge the log. A snapshot is the
//! state streamed by [`StateMachine::export`] into `snapshots/<id>.snap` (from one read
//! transaction, so it is consistent while writes go on); the newest one is remembered in the
//! state itself and older files are removed. A received snapshot is copied to its own file,
//! fsynced, and imported in one transaction.

use std::io::{BufReader, BufWriter, Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{NodeId, Response, TypeConfig, sto_err};
use crate::command::CommandOutput;
use crate::state_machine::StateMachine;

pub(crate) const LAST_APPLIED: &str = "raft.last_applied";
pub(crate) const MEMBERSHIP: &str = "raft.membership";
const CURRENT_SNAPSHOT: &str = "raft.snapshot";

type Result<T> = std::result::Result<T, StorageError<NodeId>>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: Meta,
    file: PathBuf,
}

#[derive(Clone)]
pub struct SmStore {
    sm: Arc<StateMachine>,
    dir: PathBuf,
    changes: Option<tokio::sync::broadcast::Sender<super::Change>>,
    /// Held while the current-snapshot pointer is read and moved: a build and an install
    /// finishing at once must not interleave there.
    pointer: Arc<std::sync::Mutex<()>>,
}

/// Longest snapshot ID accepted from a peer (ours are about 40 characters).
const MAX_SNAPSHOT_ID: usize = 200;

impl SmStore {
    pub async fn open(sm: Arc<StateMachine>, dir: PathBuf) -> std::result::Result<Self, crate::error::StorageError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| crate::error::StorageError::Database(format!("{}: {e}", dir.display())))?;
        Ok(Self { sm, dir, changes: None, pointer: Default::default() })
    }

    /// Publishes every applied change to a mutable fact on `changes`.
    pub fn with_changes(mut self, changes: tokio::sync::broadcast::Sender<super::Change>) -> Self {
        self.changes = Some(changes);
        self
    }

    fn json<T: Serialize>(v: &T, subject: ErrorSubject<NodeId>) -> Result<Vec<u8>> {
        serde_json::to_vec(v).map_err(|e| sto_err(subject, ErrorVerb::Write, e))
    }

    fn read_extra<T: for<'de> Deserialize<'de>>(
        sm: &StateMachine,
        key: &str,
    ) -> std::result::Result<Option<T>, String> {
        match sm.extra(key).map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| e.to_string()),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
        f: impl FnOnce(&StateMachine, &Pointer) -> std::result::Result<T, String> + Send + 'static,
    ) -> Result<T> {
        let (sm, pointer) = (self.sm.clone(), Pointer { dir: self.dir.clone(), lock: self.pointer.clone() });
        match tokio::task::spawn_blocking(move || f(&sm, &pointer)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(sto_err(subject, verb, e)),
            Err(e) => Err(sto_err(subject, verb, e)),
        }
    }
}

/// The records of the state, written to `out` by [`StateMachine::export`], with the raft
/// position and membership they correspond to (read in the same transaction).
pub(crate) struct ExportedAt {
    pub records: u64,
    pub last_log_id: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, openraft::BasicNode>,
    /// The state digest ([`StateMachine::digest`]) of the records, if asked.
    pub digest: Option<[u8; 32]>,
}

/// Exports `sm`'s records to `out`; see [`ExportedAt`].
pub(crate) fn export_at_position(
    sm: &StateMachine,
    out: &mut impl Write,
    with_digest: bool,
) -> std::result::Result<ExportedAt, crate::error::StorageError> {
    let crate::state_machine::Exported { records, extras, digest } =
        sm.export(out, &[LAST_APPLIED, MEMBERSHIP], with_digest)?;
    fn parse<T: for<'de> Deserialize<'de>>(
        b: &Option<Vec<u8>>,
    ) -> std::result::Result<Option<T>, crate::error::StorageError> {
        let parsed = b.as_deref().map(serde_json::from_slice).transpose();
        parsed.map_err(|e| crate::error::StorageError::Corrupt { table: "raft extras", detail: e.to_string() })
    }
    let last_log_id = parse::<Option<LogId<NodeId>>>(&extras[0])?.flatten();
    let membership = parse(&extras[1])?.unwrap_or_default();
    Ok(ExportedAt { records, last_log_id, membership, digest })
}

/// Replaces `sm`'s state with the records in `input` (as [`export_at_position`] wrote them),
/// recording them as applied up to `last_log_id` under `membership`, in one transaction.
pub(crate) fn import_at_position(
    sm: &StateMachine,
    input: &mut impl std::io::Read,
    last_log_id: Option<LogId<NodeId>>,
    membership: &StoredMembership<NodeId, openraft::BasicNode>,
) -> std::result::Result<u64, crate::error::StorageError> {
    let json = |v: serde_json::Result<Vec<u8>>| v.map_err(|e| crate::error::StorageError::Database(e.to_string()));
    let extras =
        [(LAST_APPLIED, json(serde_json::to_vec(&last_log_id))?), (MEMBERSHIP, json(serde_json::to_vec(membership))?)];
    sm.import(input, &extras)
}

/// The snapshot directory and the lock on the current-snapshot pointer.
struct Pointer {
    dir: PathBuf,
    lock: Arc<std::sync::Mutex<()>>,
}

/// Writes the state to a new snapshot file and records it as the current snapshot (unless a
/// newer one was installed meanwhile). Returns the snapshot's metadata and file.
fn build(sm: &StateMachine, pointer: &Pointer) -> std::result::Result<(Meta, std::fs::File), String> {
    let dir = &pointer.dir;
    let tmp = dir.join(format!("building-{}.tmp", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut w = BufWriter::new(file);
    let ExportedAt { records, last_log_id, membership: last_membership, .. } =
        export_at_position(sm, &mut w, false).map_err(|e| e.to_string())?;
    let file = w.into_inner().map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())?;
    // raft purges the log up to this snapshot once it is built: every apply it holds (and
    // any since) must be durable first, or a crash would need purged entries to catch up.
    sm.flush().map_err(|e| e.to_string())?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    let snapshot_id = match &last_log_id {
        Some(l) => format!("{}-{}-{stamp}", l.leader_id.term, l.index),
        None => format!("0-0-{stamp}"),
    };
    let meta = Meta { last_log_id, last_membership, snapshot_id };
    let path = dir.join(format!("{}.snap", meta.snapshot_id));
    std::fs::rename(&tmp, &path).map_err(|e| e.to_string())?;
    // Opened before it can be superseded (and deleted) by an install finishing meanwhile.
    let handle = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if remember(sm, pointer, &meta, &path)? {
        tracing::info!(snapshot = %meta.snapshot_id, records, "built snapshot");
        Ok((meta, handle))
    } else {
        // An installed snapshot is newer than this build: serve that one.
        let _held = pointer.lock.lock().map_err(|_| "snapshot pointer lock poisoned".to_owned())?;
        let current = current(sm)?.ok_or("current snapshot vanished")?;
        tracing::info!(snapshot = %meta.snapshot_id, newer = %current.meta.snapshot_id, "built snapshot superseded");
        let handle = std::fs::File::open(&current.file).map_err(|e| format!("{}: {e}", current.file.display()))?;
        Ok((current.meta, handle))
    }
}

fn current(sm: &StateMachine) -> std::result::Result<Option<StoredSnapshot>, String> {
    SmStore::read_extra(sm, CURRENT_SNAPSHOT)
}

/// Records `path` as the current snapshot and removes older snapshot files, unless the
/// current one is newer (a build that finished after an install): then `path` is removed and
/// the pointer stays. The pointer only ever moves forward. Returns whether it moved.
fn remember(
    sm: &StateMachine,
    pointer: &Pointer,
    meta: &Meta,
    path: &std::path::Path,
) -> std::result::Result<bool, String> {
    let _held = pointer.lock.lock().map_err(|_| "snapshot pointer lock poisoned".to_owned())?;
    remember_locked(sm, pointer, meta, path)
}

/// [`remember`] with the pointer lock already held.
fn remember_locked(
    sm: &StateMachine,
    pointer: &Pointer,
    meta: &Meta,
    path: &std::path::Path,
) -> std::result::Result<bool, String> {
    if let Ok(d) = std::fs::File::open(&pointer.dir) {
        let _ = d.sync_all();
    }
    if let Some(cur) = current(sm)?
        && cur.meta.last_log_id > meta.last_log_id
    {
        if cur.file != path {
            let _ = std::fs::remove_file(path);
        }
        return Ok(false);
    }
    let stored = StoredSnapshot { meta: meta.clone(), file: path.to_owned() };
    let bytes = serde_json::to_vec(&stored).map_err(|e| e.to_string())?;
    sm.apply_entries(&[], &[(CURRENT_SNAPSHOT, bytes)]).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(&pointer.dir).map_err(|e| e.to_string())?.flatten() {
        let p = entry.path();
        if p != path && p.extension().is_some_and(|x| x == "snap") {
            let _ = std::fs::remove_file(&p);
        }
    }
    Ok(true)
}

/// The file a snapshot received from a peer is kept in: named from its log position and a
/// local stamp, never from the peer-supplied snapshot ID.
fn installed_path(dir: &std::path::Path, meta: &Meta) -> PathBuf {
    let (term, index) = meta.last_log_id.map(|l| (l.leader_id.term, l.index)).unwrap_or((0, 0));
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    dir.join(format!("installed-{term}-{index}-{stamp}.snap"))
}

impl RaftSnapshotBuilder<TypeConfig> for SmStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let (meta, file) = self.blocking(ErrorSubject::StateMachine, ErrorVerb::Write, build).await?;
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) })
    }
}

impl RaftStateMachine<TypeConfig> for SmStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, openraft::BasicNode>)> {
        self.blocking(ErrorSubject::StateMachine, ErrorVerb::Read, |sm, _| {
            let last: Option<Option<LogId<NodeId>>> = SmStore::read_extra(sm, LAST_APPLIED)?;
            let membership = SmStore::read_extra(sm, MEMBERSHIP)?.unwrap_or_default();
            Ok((last.flatten(), membership))
        })
        .await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else { return Ok(Vec::new()) };
        let mut extras = vec![(LAST_APPLIED, Self::json(&Some(last), ErrorSubject::StateMachine)?)];
        for e in &entries {
            if let EntryPayload::Membership(m) = &e.payload {
                let stored = StoredMembership::new(Some(e.log_id), m.clone());
                extras.retain(|(k, _)| *k != MEMBERSHIP);
                extras.push((MEMBERSHIP, Self::json(&stored, ErrorSubject::StateMachine)?));
            }
        }
        let responses = self
            .blocking(ErrorSubject::StateMachine, ErrorVerb::Write, move |sm, _| {
                let items: Vec<(u64, Option<&crate::command::Command>)> = entries
                    .iter()
                    .map(|e| match &e.payload {
                        EntryPayload::Normal(cmd) => (e.log_id.index, Some(cmd)),
                        _ => (e.log_id.index, None),
                    })
                    .collect();
                let (results, changes) =
                    sm.apply_entries_with_changes(&items, &extras, false).map_err(|e| e.to_string())?;
                let responses: Vec<Response> =
                    results.into_iter().map(|r| Response(r.unwrap_or(Ok(CommandOutput::Nothing)))).collect();
                Ok((responses, changes))
            })
            .await?;
        let (responses, changes) = responses;
        if let Some(feed) = &self.changes {
            // No receiver is fine: nobody watches.
            // One message per entry, with all its changes: a watcher never sees half an entry.
            let mut changes = changes.into_iter().peekable();
            while let Some((index, first)) = changes.next() {
                let mut what = vec![first];
                while let Some((_, c)) = changes.next_if(|(i, _)| *i == index) {
                    what.push(c);
                }
                let _ = feed.send(super::Change { index, what, resync: false });
            }
            let _ = feed.send(super::Change { index: last.index, what: Vec::new(), resync: false });
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>> {
        let path = self.dir.join(format!("incoming-{}.tmp", std::process::id()));
        let file = tokio::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| sto_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        // Unlinked at once: the handle keeps it alive, and nothing is left if we crash.
        let _ = std::fs::remove_file(&path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<tokio::fs::File>) -> Result<()> {
        let received = snapshot.into_std().await;
        let meta = meta.clone();
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        if meta.snapshot_id.len() > MAX_SNAPSHOT_ID || meta.snapshot_id.chars().any(|c| c.is_control()) {
            return Err(sto_err(subject, ErrorVerb::Write, "refusing a snapshot with a malformed ID"));
        }
        self.blocking(subject, ErrorVerb::Write, move |sm, pointer| {
            // Held from the copy to the pointer: a build finishing meanwhile must neither
            // delete this file nor move the pointer.
            let lock = pointer.lock.clone();
            let _held = lock.lock().map_err(|_| "snapshot pointer lock poisoned".to_owned())?;
            let mut received = received;
            received.rewind().map_err(|e| e.to_string())?;
            let path = installed_path(&pointer.dir, &meta);
            let mut copy = std::fs::File::create(&path).map_err(|e| e.to_string())?;
            std::io::copy(&mut received, &mut copy).map_err(|e| e.to_string())?;
            copy.flush().map_err(|e| e.to_string())?;
            copy.sync_all().map_err(|e| e.to_string())?;
            let mut reader = BufReader::new(std::fs::File::open(&path).map_err(|e| e.to_string())?);
            let records = import_at_position(sm, &mut reader, meta.last_log_id, &meta.last_membership)
                .map_err(|e| e.to_string())?;
            remember_locked(sm, pointer, &meta, &path)?;
            tracing::info!(snapshot = %meta.snapshot_id, records, "installed snapshot");
            Ok(meta.last_log_id.map(|l| l.index).unwrap_or(0))
        })
        .await
        .map(|index| {
            if let Some(feed) = &self.changes {
                let _ = feed.send(super::Change { index, what: Vec::new(), resync: true });
            }
        })
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        // The pointer is read and its file opened under the pointer lock: a build finishing
        // meanwhile moves the pointer and deletes the older file, which would otherwise go
        // between the two (and a missing snapshot stops replication to a lagging node for
        // good). Once open, the handle keeps the file alive whatever is deleted later.
        let opened = self
            .blocking(ErrorSubject::Snapshot(None), ErrorVerb::Read, |sm, pointer| {
                let _held = pointer.lock.lock().map_err(|_| "snapshot pointer lock poisoned".to_owned())?;
                let Some(stored) = current(sm)? else { return Ok(None) };
                match std::fs::File::open(&stored.file) {
                    Ok(file) => Ok(Some((stored.meta, file))),
                    Err(e) => {
                        tracing::warn!(file = %stored.file.display(), error = %e, "current snapshot file is missing");
                        Ok(None)
                    }
                }
            })
            .await?;
        Ok(opened.map(|(meta, file)| Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_at(index: u64, id: &str) -> Meta {
        Meta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index)),
            last_membership: StoredMembership::default(),
            snapshot_id: id.into(),
        }
    }

    #[test]
    fn the_current_snapshot_only_moves_forward() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm = StateMachine::open(&dir.path().join("s.redb")).expect("open");
        let pointer = Pointer { dir: dir.path().to_owned(), lock: Default::default() };
        let installed = dir.path().join("installed.snap");
        let built = dir.path().join("built.snap");
        std::fs::write(&installed, b"new").expect("write");
        std::fs::write(&built, b"old").expect("write");
        // An install at index 20 lands first; a build exported at index 10 finishes after it.
        assert!(remember(&sm, &pointer, &meta_at(20, "installed"), &installed).expect("remember"));
        assert!(!remember(&sm, &pointer, &meta_at(10, "built"), &built).expect("remember"));
        let cur = current(&sm).expect("read").expect("a current snapshot");
        assert_eq!(cur.file, installed);
        assert!(installed.exists(), "the installed snapshot must survive the late build");
        assert!(!built.exists(), "the superseded build is removed");
        // A newer one still moves it, and removes the older file.
        let newer = dir.path().join("newer.snap");
        std::fs::write(&newer, b"newer").expect("write");
        assert!(remember(&sm, &pointer, &meta_at(30, "newer"), &newer).expect("remember"));
        assert!(!installed.exists());
    }

    #[test]
    fn a_peer_chosen_snapshot_id_never_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = installed_path(dir.path(), &meta_at(7, "../../../etc/passwd"));
        assert_eq!(path.parent(), Some(dir.path()));
        let name = path.file_name().and_then(|n| n.to_str()).expect("a file name");
        assert!(name.starts_with("installed-1-7-") && name.ends_with(".snap"), "{name}");
    }
}
