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

/// How entries are encoded, recorded under this key in `STATE`. Logs written before it was
/// recorded hold JSON entries and are converted when opened.
const LOG_FORMAT: &str = "log_format";
const POSTCARD: &[u8] = b"postcard";

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
        {
            let mut log = txn.open_table(LOG)?;
            let mut state = txn.open_table(STATE)?;
            let format = state.get(LOG_FORMAT)?.map(|v| v.value().to_vec());
            match format.as_deref() {
                Some(POSTCARD) => {}
                Some(other) => {
                    return Err(DbError::Database(format!(
                        "{} holds a raft log in format {:?}; this mxcas reads {:?}. Run the mxcas version that \
                         wrote it, or start this node with an empty data directory and let it catch up",
                        path.display(),
                        String::from_utf8_lossy(other),
                        String::from_utf8_lossy(POSTCARD)
                    )));
                }
                None => {
                    let mut converted = Vec::new();
                    for item in log.iter()? {
                        let (index, v) = item?;
                        let entry: Entry<TypeConfig> = serde_json::from_slice(v.value())
                            .map_err(|e| DbError::Corrupt { table: "raft log", detail: e.to_string() })?;
                        converted.push((index.value(), encode_entry(&entry)?));
                    }
                    if !converted.is_empty() {
                        tracing::info!(entries = converted.len(), "converting the raft log from JSON to postcard");
                    }
                    for (index, bytes) in &converted {
                        log.insert(*index, bytes.as_slice())?;
                    }
                    state.insert(LOG_FORMAT, POSTCARD)?;
                }
            }
        }
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

fn encode_entry(entry: &Entry<TypeConfig>) -> std::result::Result<Vec<u8>, DbError> {
    postcard::to_stdvec(entry).map_err(|e| DbError::Database(format!("cannot encode a raft entry: {e}")))
}

fn decode_entry(bytes: &[u8]) -> std::result::Result<Entry<TypeConfig>, DbError> {
    postcard::from_bytes(bytes).map_err(|e| DbError::Corrupt { table: "raft log", detail: e.to_string() })
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
        self.appended.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
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
            Ok(()) => callback.log_io_completed(Ok(())),
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
    async fn a_json_log_of_an_older_version_is_converted_when_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        {
            // What an older version wrote: JSON entries and no format marker.
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("txn");
            {
                let mut log = txn.open_table(LOG).expect("log");
                for i in 1..=3 {
                    log.insert(i, serde_json::to_vec(&entry(i)).expect("json").as_slice()).expect("insert");
                }
                txn.open_table(STATE).expect("state");
            }
            txn.commit().expect("commit");
        }
        let mut store = LogStore::open(&path).expect("opens and converts");
        let read = store.try_get_log_entries(1..=3).await.expect("reads");
        assert_eq!(format!("{read:?}"), format!("{:?}", (1..=3).map(entry).collect::<Vec<_>>()));
        assert_eq!(store.get_log_state().await.expect("state").last_log_id.map(|l| l.index), Some(3));
        drop(store);

        // Converted once: the marker is recorded and the entries are postcard now.
        let db = Database::create(&path).expect("reopen");
        let txn = db.begin_read().expect("txn");
        let state = txn.open_table(STATE).expect("state");
        assert_eq!(state.get(LOG_FORMAT).expect("get").expect("marker").value(), POSTCARD);
        let log = txn.open_table(LOG).expect("log");
        let first = log.get(1).expect("get").expect("entry");
        assert_eq!(format!("{:?}", decode_entry(first.value()).expect("postcard")), format!("{:?}", entry(1)));
    }

    #[test]
    fn a_log_in_an_unknown_format_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        {
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("txn");
            txn.open_table(STATE).expect("state").insert(LOG_FORMAT, b"cbor".as_slice()).expect("insert");
            txn.commit().expect("commit");
        }
        let err = LogStore::open(&path).err().expect("refused").to_string();
        assert!(err.contains("\"cbor\"") && err.contains("empty data directory"), "{err}");
    }
}
