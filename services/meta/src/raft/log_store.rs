//! The raft log in redb: entries by index, plus the vote, the committed log ID and the last
//! purged log ID. Every mutation is one write transaction on a blocking thread, committed with
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

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn open(path: &Path) -> std::result::Result<Self, crate::error::StorageError> {
        // The log is written and read near its end; a small cache suffices.
        let db = Database::builder().set_cache_size(32 << 20).create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(STATE)?;
        txn.commit()?;
        Ok(Self { db: Arc::new(db) })
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
                out.push(decode("raft log", v.value())?);
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
                table
                    .last()?
                    .map(|(_, v)| decode::<Entry<TypeConfig>>("raft log", v.value()).map(|e| e.log_id))
                    .transpose()
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
            let bytes = serde_json::to_vec(&e).map_err(|err| sto_err(ErrorSubject::Logs, ErrorVerb::Write, err))?;
            encoded.push((e.log_id.index, bytes));
        }
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
