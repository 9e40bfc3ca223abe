//! The raft log in redb: entries by index (postcard), plus the vote, the committed log ID and
//! the last purged log ID (JSON). Every mutation is one write transaction on a blocking thread, committed with
//! fsync before openraft hears it is done — except the committed log ID, a restart hint that
//! becomes durable with the next append (see [`LogStore::save_committed`]).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{NodeId, TypeConfig, sto_err};
use crate::error::StorageError as DbError;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

/// The first byte of an entry stored as postcard. Older versions stored JSON, whose first
/// byte is always `{`: such entries are still read, until they are purged.
const POSTCARD_ENTRY: u8 = 0;

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// Bytes of entries appended since this process opened the log.
    appended: Arc<std::sync::atomic::AtomicU64>,
}

impl LogStore {
    pub fn open(path: &Path) -> std::result::Result<Self, crate::error::StorageError> {
        // The log is written and read near its end; a small cache suffices.
        let db = Database::builder().set_cache_size(32 << 20).create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(STATE)?;
        txn.commit()?;
        Ok(Self { db: Arc::new(db), appended: Arc::default() })
    }

    /// Bytes of entries appended since this process opened the log (encoded, as stored).
    pub fn appended_bytes(&self) -> u64 {
        self.appended.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
        f: impl FnOnce(&Database) -> std::result::Result<T, DbError> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || f(&db)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(sto_err(subject, verb, e)),
            Err(e) => Err(sto_err(subject, verb, e)),
        }
    }

    async fn get_state<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>> {
        self.blocking(subject, ErrorVerb::Read, move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(STATE)?;
            table.get(key)?.map(|v| decode("raft state", v.value())).transpose()
        })
        .await
    }

    /// The last committed log index this node has recorded (for status reports).
    pub async fn committed_index(&self) -> Option<u64> {
        let committed = self.get_state::<Option<LogId<NodeId>>>("committed", ErrorSubject::Store).await;
        committed.ok().flatten().flatten().map(|l| l.index)
    }

    /// Writes one state value; fsynced unless `durable` is false (then it becomes durable with
    /// the next fsynced transaction, and a crash may roll it back to an older value).
    async fn set_state<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: &T,
        subject: ErrorSubject<NodeId>,
        durable: bool,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| sto_err(subject.clone(), ErrorVerb::Write, e))?;
        self.blocking(subject, ErrorVerb::Write, move |db| {
            let mut txn = db.begin_write()?;
            if !durable {
                txn.set_durability(redb::Durability::None)?;
            }
            txn.open_table(STATE)?.insert(key, bytes.as_slice())?;
            Ok(txn.commit()?)
        })
        .await
    }
}

fn decode<T: serde::de::DeserializeOwned>(table: &'static str, bytes: &[u8]) -> std::result::Result<T, DbError> {
    serde_json::from_slice(bytes).map_err(|e| DbError::Corrupt { table, detail: e.to_string() })
}

/// An entry as stored: [`POSTCARD_ENTRY`], then postcard.
fn encode_entry(entry: &Entry<TypeConfig>) -> std::result::Result<Vec<u8>, DbError> {
    postcard::to_extend(entry, vec![POSTCARD_ENTRY])
        .map_err(|e| DbError::Database(format!("cannot encode a raft entry: {e}")))
}

fn decode_entry(bytes: &[u8]) -> std::result::Result<Entry<TypeConfig>, DbError> {
    let corrupt = |detail: String| DbError::Corrupt { table: "raft log", detail };
    match bytes.split_first() {
        Some((&POSTCARD_ENTRY, rest)) => {
            super::network::decode(mxcas_proto::meta::Encoding::Postcard, rest).map_err(corrupt)
        }
        Some((b'{', _)) => serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string())),
        Some((other, _)) => Err(corrupt(format!(
            "entry in an unknown encoding (first byte {other:#04x}): written by a newer mxcas? Run that version, or \
             start this node with an empty data directory and let it catch up"
        ))),
        None => Err(corrupt("empty entry".into())),
    }
}

fn bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(x) => *x,
        Bound::Excluded(x) => x + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(x) => Some(x + 1),
        Bound::Excluded(x) => Some(*x),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let (start, end) = bounds(&range);
        self.blocking(ErrorSubject::Logs, ErrorVerb::Read, move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(LOG)?;
            let iter = match end {
                Some(end) => table.range(start..end),
                None => table.range(start..),
            }?;
            let mut out = Vec::new();
            for item in iter {
                let (_, v) = item?;
                out.push(decode_entry(v.value())?);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = self.get_state("last_purged", ErrorSubject::Store).await?;
        let last = self
            .blocking(ErrorSubject::Logs, ErrorVerb::Read, |db| {
                let txn = db.begin_read()?;
                let table = txn.open_table(LOG)?;
                table.last()?.map(|(_, v)| decode_entry(v.value()).map(|e| e.log_id)).transpose()
            })
            .await?;
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.or(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        self.set_state("vote", vote, ErrorSubject::Vote, true).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        self.get_state("vote", ErrorSubject::Vote).await
    }

    /// openraft calls this on every commit, inside its core loop, before applying: an fsync
    /// here would stall the whole node once per batch. The committed index is only a hint
    /// for restarts (openraft works without it, re-learning it from the leader), so it is
    /// written without an fsync and becomes durable with the next log append.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        self.set_state("committed", &committed, ErrorSubject::Store, false).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self.get_state::<Option<LogId<NodeId>>>("committed", ErrorSubject::Store).await?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for e in entries {
            let bytes = encode_entry(&e).map_err(|err| sto_err(ErrorSubject::Logs, ErrorVerb::Write, err))?;
            encoded.push((e.log_id.index, bytes));
        }
        let bytes: usize = encoded.iter().map(|(_, b)| b.len()).sum();
        let result = self
            .blocking(ErrorSubject::Logs, ErrorVerb::Write, move |db| {
                let txn = db.begin_write()?;
                {
                    let mut table = txn.open_table(LOG)?;
                    for (index, bytes) in &encoded {
                        table.insert(*index, bytes.as_slice())?;
                    }
                }
                Ok(txn.commit()?)
            })
            .await;
        match &result {
            Ok(()) => {
                self.appended.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
                callback.log_io_completed(Ok(()))
            }
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        self.blocking(ErrorSubject::Logs, ErrorVerb::Delete, move |db| {
            let txn = db.begin_write()?;
            txn.open_table(LOG)?.retain_in(log_id.index.., |_, _| false)?;
            Ok(txn.commit()?)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let purged = serde_json::to_vec(&log_id).map_err(|e| sto_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        self.blocking(ErrorSubject::Logs, ErrorVerb::Delete, move |db| {
            let txn = db.begin_write()?;
            txn.open_table(STATE)?.insert("last_purged", purged.as_slice())?;
            txn.open_table(LOG)?.retain_in(..=log_id.index, |_, _| false)?;
            Ok(txn.commit()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::Command;

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::Expire { now_ms: index, limit: 10 }),
        }
    }

    #[tokio::test]
    async fn entries_an_older_version_wrote_as_json_are_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        {
            // What an older version wrote: JSON entries.
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("txn");
            {
                let mut log = txn.open_table(LOG).expect("log");
                for i in 1..=3 {
                    log.insert(i, serde_json::to_vec(&entry(i)).expect("json").as_slice()).expect("insert");
                }
            }
            txn.commit().expect("commit");
        }
        {
            // And after them, entries this version appended (as `append` encodes them).
            let db = Database::create(&path).expect("reopen");
            let txn = db.begin_write().expect("txn");
            {
                let mut log = txn.open_table(LOG).expect("log");
                for i in 4..=5 {
                    log.insert(i, encode_entry(&entry(i)).expect("encodes").as_slice()).expect("insert");
                }
            }
            txn.commit().expect("commit");
        }
        let mut store = LogStore::open(&path).expect("opens");
        assert_eq!(store.get_log_state().await.expect("state").last_log_id.map(|l| l.index), Some(5));
        let read = store.try_get_log_entries(1..=5).await.expect("reads");
        assert_eq!(format!("{read:?}"), format!("{:?}", (1..=5).map(entry).collect::<Vec<_>>()));
        drop(store);
        let db = Database::create(&path).expect("reopen");
        let txn = db.begin_read().expect("txn");
        let log = txn.open_table(LOG).expect("log");
        assert_eq!(log.get(1).expect("get").expect("entry").value()[0], b'{');
        assert_eq!(log.get(4).expect("get").expect("entry").value()[0], POSTCARD_ENTRY);
    }

    #[test]
    fn an_entry_in_an_unknown_encoding_or_with_trailing_bytes_is_corrupt() {
        let mut bytes = encode_entry(&entry(7)).expect("encodes");
        assert_eq!(format!("{:?}", decode_entry(&bytes).expect("decodes")), format!("{:?}", entry(7)));
        bytes.push(0);
        assert!(decode_entry(&bytes).is_err(), "trailing bytes");
        bytes[0] = 0x07;
        let err = decode_entry(&bytes).expect_err("unknown tag").to_string();
        assert!(err.contains("unknown encoding") && err.contains("empty data directory"), "{err}");
        assert!(decode_entry(&[]).is_err());
    }

    /// The log's bytes for an entry never change silently: postcard is positional, so a
    /// reordered or inserted field or variant of a command (or of openraft's entry) would
    /// change what stored entries mean. Changing these bytes needs a new entry encoding.
    #[test]
    fn the_stored_form_of_an_entry_is_fixed() {
        let digest = [7u8; 32];
        let cid = cid::Cid::new_v1(0x55, cid::multihash::Multihash::<64>::wrap(0x12, &digest).expect("fits"));
        let commit = Command::CommitUpload {
            server_name: "hs".into(),
            media_id: Some("m".into()),
            user_id: "@u:hs".into(),
            now_ms: 5,
            content: crate::ContentRecord {
                cid,
                size: 3,
                chunk_size: 1 << 20,
                blob_key: "blobs/000000000001/k".into(),
                index_key: Some("i".into()),
                refcount: 1,
                created_at_ms: 2,
                lost: false,
            },
            content_type: "text/plain".into(),
            filename: None,
            lost_key: Some("l".into()),
        };
        let e = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), 9),
            payload: EntryPayload::Normal(Command::Batch(vec![commit, Command::RegisterStore { id: 3 }])),
        };
        let hex: String = encode_entry(&e).expect("encodes").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN_ENTRY);
    }

    #[test]
    fn the_stored_form_of_every_other_entry_is_fixed() {
        let media = crate::MediaKey::new("hs", "m");
        let cid = cid::Cid::new_v1(0x55, cid::multihash::Multihash::<64>::wrap(0x12, &[9u8; 32]).expect("fits"));
        let commands = vec![
            Command::CreatePending { media, user_id: "@u:hs".into(), now_ms: 1, ttl_ms: 2, max_pending_per_user: 3 },
            Command::Expire { now_ms: 4, limit: 5 },
            Command::BeginSweep { now_ms: 6, min_interval_ms: 7 },
            Command::ReportLost { cid, blob_key: "blobs/000000000002/k".into() },
        ];
        let nodes = [(1, openraft::BasicNode::new("a:1")), (2, openraft::BasicNode::new("b:2"))];
        let nodes: std::collections::BTreeMap<NodeId, openraft::BasicNode> = nodes.into_iter().collect();
        let membership = openraft::Membership::new(vec![[1, 2].into()], nodes);
        let leader = CommittedLeaderId::new(3, 2);
        let entries = [
            Entry::<TypeConfig> { log_id: LogId::new(leader, 10), payload: EntryPayload::Blank },
            Entry { log_id: LogId::new(leader, 11), payload: EntryPayload::Membership(membership) },
            Entry { log_id: LogId::new(leader, 12), payload: EntryPayload::Normal(Command::Batch(commands)) },
        ];
        let hex: Vec<String> = entries
            .iter()
            .map(|e| encode_entry(e).expect("encodes").iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        assert_eq!(hex, GOLDEN_OTHERS);
    }

    /// The commands added with thumbnails and quotas, pinned the same way.
    #[test]
    fn the_stored_form_of_thumbnail_and_quota_commands_is_fixed() {
        use crate::model::{Quota, ThumbnailMethod, ThumbnailSpec};
        let cid = cid::Cid::new_v1(0x55, cid::multihash::Multihash::<64>::wrap(0x12, &[5u8; 32]).expect("fits"));
        let content = crate::ContentRecord {
            cid,
            size: 3,
            chunk_size: 1 << 20,
            blob_key: "blobs/000000000001/t".into(),
            index_key: None,
            refcount: 0,
            created_at_ms: 0,
            lost: false,
        };
        let commands = vec![
            Command::CommitThumbnail {
                source: cid,
                spec: ThumbnailSpec { width: 96, height: 96, method: ThumbnailMethod::Crop, animated: true },
                now_ms: 1,
                content,
                content_type: "image/gif".into(),
                width: 96,
                height: 90,
                animated: true,
                lost_key: None,
            },
            Command::Limited {
                quota: Quota { period_ms: 2, user_bytes: 3, user_files: 4, tenant_bytes: 5, tenant_files: 6 },
                user: "@u:hs".into(),
                tenant: "hs".into(),
                command: Box::new(Command::Expire { now_ms: 7, limit: 8 }),
            },
        ];
        let e = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(4, 1), 13),
            payload: EntryPayload::Normal(Command::Batch(commands)),
        };
        let hex: String = encode_entry(&e).expect("encodes").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN_THUMBNAIL_AND_QUOTA);
    }

    const GOLDEN_THUMBNAIL_AND_QUOTA: &str = "0004010d01050207240155122005050505050505050505050505050505050505050505050505050505050505056060000101240155122005050505050505050505050505050505050505050505050505050505050505050380804014626c6f62732f3030303030303030303030312f740000000009696d6167652f676966605a01000802030405060540753a6873026873020708";

    const GOLDEN_OTHERS: [&str; 3] = [
        "0003020a00",
        "0003020b0201020102020103613a310203623a32",
        "0003020c01050400026873016d0540753a6873010203020405030607062401551220090909090909090909090909090909090909090909090909090909090909090914626c6f62732f3030303030303030303030322f6b",
    ];

    const GOLDEN_ENTRY: &str = "000201090105020102687301016d0540753a687305240155122007070707070707070707070707070707070707070707070707070707070707070380804014626c6f62732f3030303030303030303030312f6b0101690102000a746578742f706c61696e0001016c0403";
}
