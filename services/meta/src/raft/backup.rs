//! Backups of the metadata state (`mxcas admin snapshot export|import`).
//!
//! A backup file is `mxcas-backup 1\n`, one line of JSON ([`BackupHeader`]: where the state
//! came from, its raft position, record count, the sha2-256 of the records' bytes and the
//! state digest), then the records exactly as [`StateMachine::export`] writes them. The state
//! digest is the one `Status` reports, so a restored cluster can be compared with the backup.
//! Backups of earlier versions hold the records in the canonical form, whose bytes' sha2-256
//! is the state digest, and have no separate `state_digest`.
//!
//! Import is offline and works like etcd's snapshot restore: run it once per member of the new
//! cluster, with the same backup and the same member list, into empty data directories, then
//! start the nodes. Each one comes up with the state applied up to the backup's log position
//! and the new membership, so they elect a leader among themselves without `cluster init`
//! (openraft purges the empty log up to that position and builds a snapshot on start).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Seek, Write};
use std::path::Path;

use openraft::storage::RaftLogStorage;
use openraft::{BasicNode, LogId, Membership, StoredMembership, Vote};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::NodeId;
use super::log_store::LogStore;
use super::sm_store::{ExportedAt, export_at_position, import_at_position};
use crate::state_machine::{Hashing, StateMachine};

const MAGIC: &[u8] = b"mxcas-backup 1\n";

/// What a backup holds, before its records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupHeader {
    /// The node the backup was taken from.
    pub node_id: NodeId,
    /// The last log entry applied to the state (the backup's raft position).
    pub last_log_id: Option<LogId<NodeId>>,
    /// Membership at that point (informational: import sets the new cluster's).
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub records: u64,
    /// Hex sha2-256 of the records' bytes as they follow the header.
    pub sha256: String,
    /// Hex state digest of the records, as `mxcas admin`'s status reports it; absent in
    /// backups of earlier versions, where it is `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_digest: Option<String>,
    pub created_at_ms: u64,
}

impl BackupHeader {
    /// The state digest the backup's records have (see [`BackupHeader::state_digest`]).
    pub fn state_digest(&self) -> &str {
        self.state_digest.as_deref().unwrap_or(&self.sha256)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Storage(#[from] crate::error::StorageError),
}

fn io(what: &str, e: impl std::fmt::Display) -> BackupError {
    BackupError::Io(format!("{what}: {e}"))
}

/// Lower-case hex, as digests are shown to operators (`Status`, backup headers).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the records of `sm`'s current state to `out` (from one read transaction) and returns
/// the header describing them. Blocking.
pub fn export_records(sm: &StateMachine, node_id: NodeId, out: impl Write) -> Result<BackupHeader, BackupError> {
    let mut w = Hashing::new(std::io::BufWriter::new(out));
    let ExportedAt { records, last_log_id, membership, digest } = export_at_position(sm, &mut w, true)?;
    w.flush().map_err(|e| io("writing the backup", e))?;
    let created_at_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    Ok(BackupHeader {
        node_id,
        last_log_id,
        membership,
        records,
        sha256: hex(&w.hash.finalize()),
        state_digest: digest.map(|d| hex(&d)),
        created_at_ms,
    })
}

/// The first bytes of a backup file, header included.
pub fn encode_header(header: &BackupHeader) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    // A header always serializes (plain data); the fallback keeps this infallible.
    out.extend(serde_json::to_vec(header).unwrap_or_default());
    out.push(b'\n');
    out
}

/// Reads and checks a backup's header; leaves `r` at the first record.
pub fn read_header(r: &mut impl BufRead) -> Result<BackupHeader, BackupError> {
    let mut magic = vec![0u8; MAGIC.len()];
    r.read_exact(&mut magic).map_err(|e| BackupError::Invalid(format!("not an mxcas backup (too short: {e})")))?;
    if magic != MAGIC {
        return Err(BackupError::Invalid("not an mxcas backup (it must start with \"mxcas-backup 1\")".into()));
    }
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| BackupError::Invalid(format!("unreadable backup header: {e}")))?;
    serde_json::from_str(line.trim_end()).map_err(|e| BackupError::Invalid(format!("malformed backup header: {e}")))
}

/// What an import did.
#[derive(Debug)]
pub struct Restored {
    pub header: BackupHeader,
    pub records: u64,
}

/// Restores `backup` into the empty metadata directory `dir` as node `node_id` of a new
/// cluster whose voters are `members`. Checks the records against the header's sha2-256
/// before writing anything, and the imported state against it after.
pub async fn import(
    backup: &Path,
    dir: &Path,
    node_id: NodeId,
    members: BTreeMap<NodeId, BasicNode>,
) -> Result<Restored, BackupError> {
    if !members.contains_key(&node_id) {
        return Err(BackupError::Invalid(format!("node {node_id} is not among the members given")));
    }
    let occupied = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(&dir.display().to_string(), e)),
    };
    if occupied {
        return Err(BackupError::Invalid(format!(
            "{} is not empty (it may hold a metadata node); import into an empty directory",
            dir.display()
        )));
    }
    let file = std::fs::File::open(backup).map_err(|e| io(&backup.display().to_string(), e))?;
    let mut reader = BufReader::new(file);
    let header = read_header(&mut reader)?;
    let Some(last) = header.last_log_id else {
        return Err(BackupError::Invalid("the backup is of an empty, never-initialized node".into()));
    };

    // First pass: the records must be exactly what the header says.
    let start = reader.stream_position().map_err(|e| io("reading the backup", e))?;
    let mut hashing = Hashing::new(std::io::sink());
    std::io::copy(&mut reader, &mut hashing).map_err(|e| io("reading the backup", e))?;
    let actual = hex(&hashing.hash.finalize());
    if actual != header.sha256 {
        return Err(BackupError::Invalid(format!(
            "the backup is corrupt: its records hash to {actual}, its header says {}",
            header.sha256
        )));
    }
    reader.seek(std::io::SeekFrom::Start(start)).map_err(|e| io("reading the backup", e))?;

    // Everything is built in a staging directory and renamed into place only when complete
    // (state checked, vote written), so an interrupted import leaves no half-restored node.
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "meta".into());
    let staging = dir.with_file_name(format!(".{name}.importing"));
    let _ = std::fs::remove_dir_all(&staging); // a previous interrupted attempt
    std::fs::create_dir_all(&staging).map_err(|e| io(&staging.display().to_string(), e))?;
    let placed = match build(&staging, &mut reader, &header, last, node_id, members).await {
        Ok(records) => move_into_place(&staging, dir).map(|()| records),
        Err(e) => Err(e),
    };
    match placed {
        Ok(records) => Ok(Restored { header, records }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn fsync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(&format!("fsync {}", dir.display()), e))
}

/// Moves the finished node from `staging` to `dir`, durably: into `dir` file by file when it
/// exists (empty, perhaps a mount point), else by renaming the directory.
fn move_into_place(staging: &Path, dir: &Path) -> Result<(), BackupError> {
    fsync_dir(staging)?;
    let moving = |e| io(&format!("moving {} into {}", staging.display(), dir.display()), e);
    if dir.exists() {
        for entry in std::fs::read_dir(staging).map_err(moving)? {
            let entry = entry.map_err(moving)?;
            std::fs::rename(entry.path(), dir.join(entry.file_name())).map_err(moving)?;
        }
        fsync_dir(dir)?;
        std::fs::remove_dir(staging).map_err(moving)?;
    } else {
        std::fs::rename(staging, dir).map_err(moving)?;
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => fsync_dir(parent),
        None => Ok(()),
    }
}

/// Writes the restored state and the vote into `dir`; returns the records imported.
async fn build(
    dir: &Path,
    reader: &mut impl std::io::Read,
    header: &BackupHeader,
    last: LogId<NodeId>,
    node_id: NodeId,
    members: BTreeMap<NodeId, BasicNode>,
) -> Result<u64, BackupError> {
    let voters: BTreeSet<NodeId> = members.keys().copied().collect();
    let membership = StoredMembership::new(Some(last), Membership::new(vec![voters], members));
    let sm = StateMachine::open(&dir.join("state.redb"))?;
    let records = import_at_position(&sm, reader, Some(last), &membership)?;
    let digest = hex(&sm.digest()?);
    let expected = header.state_digest();
    if digest != expected {
        return Err(BackupError::Invalid(format!("imported state hashes to {digest}, the backup to {expected}")));
    }
    // Edges may still hold objects of generations the old cluster issued after this backup
    // (and maybe sealed and swept): jump past all of them, so none can be committed here.
    sm.seal_for_restore()?;
    drop(sm);
    // The vote starts at the backup's term, so the new cluster's first election is past it
    // and every entry it appends has a higher term than the restored position.
    let mut log = LogStore::open(&dir.join("log.redb"))?;
    log.save_vote(&Vote::new(last.leader_id.term, node_id)).await.map_err(|e| io("writing the vote", e))?;
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::model::ContentRecord;
    use openraft::CommittedLeaderId;

    fn header() -> BackupHeader {
        BackupHeader {
            node_id: 2,
            last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 42)),
            membership: StoredMembership::default(),
            records: 7,
            sha256: "ab".repeat(32),
            state_digest: Some("cd".repeat(32)),
            created_at_ms: 1,
        }
    }

    #[test]
    fn header_round_trips_and_other_files_are_refused() {
        let bytes = encode_header(&header());
        let mut r = bytes.as_slice();
        assert_eq!(read_header(&mut r).expect("own header"), header());
        let err = read_header(&mut &b"PK\x03\x04 some zip file, not a backup"[..]).expect_err("zip");
        assert!(err.to_string().contains("not an mxcas backup"), "{err}");
        let err = read_header(&mut &b"mxcas-backup 1\n{\"node_id\":"[..]).expect_err("cut header");
        assert!(err.to_string().contains("malformed backup header"), "{err}");
    }

    /// A state with one upload, at raft position term 3 index 2, exported to a backup file.
    fn backup_file(dir: &Path) -> (std::path::PathBuf, String) {
        let sm = StateMachine::open(&dir.join("src.redb")).expect("open");
        let cid = cid::Cid::new_v1(0x55, multihash::Multihash::<64>::wrap(0x12, &[7; 32]).expect("digest"));
        let content = ContentRecord {
            cid,
            size: 5,
            chunk_size: 1 << 20,
            blob_key: crate::model::blob_key::new(1, "x"),
            index_key: None,
            refcount: 0,
            created_at_ms: 0,
            lost: false,
        };
        let cmd = Command::CommitUpload {
            server_name: "hs".into(),
            media_id: None,
            user_id: "@a:hs".into(),
            now_ms: 1,
            content,
            content_type: "text/plain".into(),
            filename: None,
            lost_key: None,
        };
        let last = Some(LogId::new(CommittedLeaderId::new(3, 1), 2));
        let extras = [(crate::raft::sm_store::LAST_APPLIED, serde_json::to_vec(&last).expect("json"))];
        sm.apply_entries(&[(2, Some(&cmd))], &extras).expect("apply");
        let path = dir.join("b.backup");
        let mut records = Vec::new();
        let header = export_records(&sm, 1, &mut records).expect("export");
        let mut file = encode_header(&header);
        file.extend(records);
        std::fs::write(&path, file).expect("write");
        (path, hex(&sm.digest().expect("digest")))
    }

    #[tokio::test]
    async fn a_backup_of_an_earlier_version_still_imports() {
        // Earlier versions wrote the canonical form and had no separate state digest.
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, digest) = backup_file(dir.path());
        let sm = StateMachine::open(&dir.path().join("src.redb")).expect("open");
        let mut records = Vec::new();
        sm.export_canonical(&mut records).expect("export");
        drop(sm);
        let mut header = read_header(&mut BufReader::new(std::fs::File::open(&path).expect("open"))).expect("header");
        header.sha256 = hex(&sha2::Sha256::digest(&records));
        header.state_digest = None;
        let mut file = encode_header(&header);
        assert!(!String::from_utf8_lossy(&file).contains("state_digest"), "old headers have none");
        file.extend(records);
        let old = dir.path().join("old.backup");
        std::fs::write(&old, file).expect("write");
        let restored = import(&old, &dir.path().join("n1"), 1, members()).await.expect("import");
        assert_eq!(restored.header.state_digest(), digest);
        assert_eq!(restored.records, restored.header.records);
    }

    fn members() -> BTreeMap<NodeId, BasicNode> {
        (1..=3).map(|i| (i, BasicNode { addr: format!("10.0.0.{i}:7100") })).collect()
    }

    #[tokio::test]
    async fn import_restores_the_exact_state_with_the_new_membership() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, digest) = backup_file(dir.path());
        let target = dir.path().join("n2");
        let restored = import(&path, &target, 2, members()).await.expect("import");
        assert_eq!(restored.header.state_digest(), digest);
        let sm = StateMachine::open(&target.join("state.redb")).expect("open restored");
        assert_eq!(sm.counts().expect("counts"), (1, 1), "same records");
        let g = sm.generations().expect("generations");
        assert!(g.sealed >= 10_000_000 && g.generation > g.sealed, "every older generation is sealed: {g:?}");
        let m: StoredMembership<NodeId, BasicNode> =
            serde_json::from_slice(&sm.extra(crate::raft::sm_store::MEMBERSHIP).expect("read").expect("membership"))
                .expect("parse");
        assert_eq!(m.membership().voter_ids().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(m.log_id().map(|l| l.index), Some(2), "membership sits at the backup's position");
        drop(sm);
        assert!(!dir.path().join(".n2.importing").exists(), "staging removed");
        // Once imported, the directory is taken.
        let err = import(&path, &target, 2, members()).await.expect_err("second import");
        assert!(err.to_string().contains("is not empty"), "{err}");
    }

    #[tokio::test]
    async fn import_fills_an_existing_empty_directory_such_as_a_mount_point() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, digest) = backup_file(dir.path());
        let target = dir.path().join("mounted");
        std::fs::create_dir(&target).expect("mkdir");
        import(&path, &target, 1, members()).await.expect("import into an empty directory");
        let sm = StateMachine::open(&target.join("state.redb")).expect("open restored");
        // Imported and checked against the backup's digest; then only the generations moved.
        assert_eq!(sm.counts().expect("counts"), (1, 1));
        assert!(!digest.is_empty());
        assert!(target.join("log.redb").exists(), "the vote's store is there too");
    }

    #[tokio::test]
    async fn import_refuses_a_node_outside_the_members_and_a_damaged_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _) = backup_file(dir.path());
        let err = import(&path, &dir.path().join("n9"), 9, members()).await.expect_err("not a member");
        assert!(err.to_string().contains("not among the members"), "{err}");
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        let target = dir.path().join("n1");
        let err = import(&path, &target, 1, members()).await.expect_err("damaged");
        assert!(err.to_string().contains("corrupt"), "{err}");
        assert!(!target.exists(), "nothing written for a damaged backup");
        assert!(!dir.path().join(".n1.importing").exists(), "no staging left behind");
    }
}
