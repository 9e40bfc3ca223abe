//! The metadata state machine, persisted in redb.
//!
//! [`StateMachine::apply_batch`] applies commands in one write transaction and commits it
//! durably (fsync) before returning, recording the index of the last applied command so a
//! restart knows where it stands. Each command checks all its preconditions before writing, so
//! a rejected command leaves no trace. [`Writer`] funnels commands from many callers into
//! batches (group commit): under load one fsync covers many uploads.

use std::path::Path;
use std::sync::Arc;

use cid::Cid;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, oneshot};

use crate::command::{Command, CommandOutput, CommitOutcome};
use crate::error::{CommandError, StorageError};
use crate::model::{ContentRecord, MediaKey, MediaRecord, MediaState};

/// (server_name, media_id) → postcard(MediaRecord)
const MEDIA: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("media");
/// binary CID → postcard(ContentRecord)
const CONTENT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("content");
/// (user_id, server_name, media_id) → expires_at_ms, for every pending reservation
const PENDING: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("pending");
/// upload_id → postcard((now_ms, CommitOutcome)): answers to retried commits
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
/// bookkeeping: "last_applied"
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// How long a commit's answer is kept for retries of the same `upload_id`.
const UPLOAD_RECORD_TTL_MS: u64 = 24 * 60 * 60 * 1000;

type Applied = Result<CommandOutput, CommandError>;

pub struct StateMachine {
    db: Database,
}

impl StateMachine {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(MEDIA)?;
        txn.open_table(CONTENT)?;
        txn.open_table(PENDING)?;
        txn.open_table(UPLOADS)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(Self { db })
    }

    /// Index of the last applied command (0 for a new database).
    pub fn last_applied(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get("last_applied")?.map(|v| v.value()).unwrap_or(0))
    }

    /// Applies `(index, command)` pairs in order, in one durable transaction.
    pub fn apply_batch(&self, entries: &[(u64, Command)]) -> Result<Vec<Applied>, StorageError> {
        let txn = self.db.begin_write()?;
        let mut results = Vec::with_capacity(entries.len());
        {
            let mut tables = Tables {
                media: txn.open_table(MEDIA)?,
                content: txn.open_table(CONTENT)?,
                pending: txn.open_table(PENDING)?,
                uploads: txn.open_table(UPLOADS)?,
            };
            for (_, cmd) in entries {
                results.push(tables.apply(cmd)?);
            }
            if let Some((index, _)) = entries.last() {
                txn.open_table(META)?.insert("last_applied", *index)?;
            }
        }
        txn.commit()?;
        Ok(results)
    }

    pub fn get_media(&self, key: &MediaKey) -> Result<Option<MediaRecord>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MEDIA)?;
        let found = table.get((key.server_name.as_str(), key.media_id.as_str()))?;
        found.map(|v| decode("media", v.value())).transpose()
    }

    pub fn get_content(&self, cid: &Cid) -> Result<Option<ContentRecord>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONTENT)?;
        let found = table.get(cid.to_bytes().as_slice())?;
        found.map(|v| decode("content", v.value())).transpose()
    }

    /// Number of (media, content) records.
    pub fn counts(&self) -> Result<(u64, u64), StorageError> {
        let txn = self.db.begin_read()?;
        Ok((txn.open_table(MEDIA)?.len()?, txn.open_table(CONTENT)?.len()?))
    }

    /// Every blob key the metadata references (for the orphan sweeper and tests).
    pub fn referenced_keys(&self) -> Result<Vec<String>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONTENT)?;
        let mut keys = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            let content: ContentRecord = decode("content", v.value())?;
            keys.push(content.blob_key);
            keys.extend(content.index_key);
        }
        Ok(keys)
    }
}

struct Tables<'txn> {
    media: redb::Table<'txn, (&'static str, &'static str), &'static [u8]>,
    content: redb::Table<'txn, &'static [u8], &'static [u8]>,
    pending: redb::Table<'txn, (&'static str, &'static str, &'static str), u64>,
    uploads: redb::Table<'txn, &'static str, &'static [u8]>,
}

impl Tables<'_> {
    fn apply(&mut self, cmd: &Command) -> Result<Applied, StorageError> {
        match cmd {
            Command::CreatePending { media, user_id, now_ms, expires_at_ms, max_pending_per_user } => {
                self.create_pending(media, user_id, *now_ms, *expires_at_ms, *max_pending_per_user)
            }
            Command::CommitUpload {
                upload_id,
                server_name,
                media_id,
                user_id,
                now_ms,
                content,
                content_type,
                filename,
            } => {
                if let Some(v) = self.uploads.get(upload_id.as_str())? {
                    let (_, outcome): (u64, CommitOutcome) = decode("uploads", v.value())?;
                    return Ok(Ok(CommandOutput::Committed(outcome)));
                }
                let result = self.commit_upload(
                    server_name,
                    media_id.as_deref(),
                    user_id,
                    *now_ms,
                    content,
                    content_type,
                    filename.as_deref(),
                )?;
                if let Ok(outcome) = &result {
                    self.uploads.insert(upload_id.as_str(), encode(&(*now_ms, outcome))?.as_slice())?;
                }
                Ok(result.map(CommandOutput::Committed))
            }
            Command::ExpirePending { now_ms } => self.expire(*now_ms),
        }
    }

    fn get_media(&self, server: &str, media_id: &str) -> Result<Option<MediaRecord>, StorageError> {
        let found = self.media.get((server, media_id))?;
        found.map(|v| decode("media", v.value())).transpose()
    }

    fn put_media(&mut self, record: &MediaRecord) -> Result<(), StorageError> {
        let key = (record.key.server_name.as_str(), record.key.media_id.as_str());
        self.media.insert(key, encode(record)?.as_slice())?;
        Ok(())
    }

    fn create_pending(
        &mut self,
        media: &MediaKey,
        user_id: &str,
        now_ms: u64,
        expires_at_ms: u64,
        max_pending: u32,
    ) -> Result<Applied, StorageError> {
        if media.server_name.is_empty() || media.media_id.is_empty() || user_id.is_empty() {
            return Ok(Err(CommandError::InvalidArgument("empty server name, media ID or user".into())));
        }
        if self.get_media(&media.server_name, &media.media_id)?.is_some() {
            return Ok(Err(CommandError::AlreadyExists));
        }
        let mut live = 0u32;
        for entry in self.pending.range((user_id, "", "")..)? {
            let (k, v) = entry?;
            if k.value().0 != user_id {
                break;
            }
            if v.value() > now_ms {
                live += 1;
            }
        }
        if live >= max_pending {
            return Ok(Err(CommandError::PendingLimit { limit: max_pending }));
        }
        let record = MediaRecord {
            key: media.clone(),
            uploader: user_id.to_owned(),
            created_at_ms: now_ms,
            state: MediaState::Pending { expires_at_ms },
        };
        self.put_media(&record)?;
        self.pending.insert((user_id, media.server_name.as_str(), media.media_id.as_str()), expires_at_ms)?;
        Ok(Ok(CommandOutput::Pending(record)))
    }

    #[allow(clippy::too_many_arguments)]
    fn commit_upload(
        &mut self,
        server_name: &str,
        media_id: Option<&str>,
        user_id: &str,
        now_ms: u64,
        content: &ContentRecord,
        content_type: &str,
        filename: Option<&str>,
    ) -> Result<Result<CommitOutcome, CommandError>, StorageError> {
        if server_name.is_empty() || user_id.is_empty() || content.blob_key.is_empty() {
            return Ok(Err(CommandError::InvalidArgument("empty server name, user or blob key".into())));
        }
        let cid_string = content.cid.to_string();
        let media_id = media_id.unwrap_or(&cid_string);
        let existing = self.get_media(server_name, media_id)?;
        let created_at_ms = match &existing {
            // A synchronous upload of bytes this server already has: same mxc, nothing new.
            Some(record @ MediaRecord { state: MediaState::Ready { cid, .. }, .. })
                if media_id == cid_string && *cid == content.cid =>
            {
                let stored = self.get_content(&content.cid)?.ok_or(StorageError::Corrupt {
                    table: "content",
                    detail: format!("{} references missing content {cid}", record.key),
                })?;
                let deduplicated = stored.blob_key != content.blob_key;
                return Ok(Ok(CommitOutcome { media: record.clone(), content: stored, deduplicated }));
            }
            Some(MediaRecord { state: MediaState::Ready { .. }, .. }) => {
                return Ok(Err(CommandError::AlreadyExists));
            }
            Some(MediaRecord { state: MediaState::Pending { expires_at_ms }, uploader, created_at_ms, .. }) => {
                if uploader != user_id {
                    return Ok(Err(CommandError::PermissionDenied));
                }
                if *expires_at_ms <= now_ms {
                    return Ok(Err(CommandError::NotFound));
                }
                self.pending.remove((user_id, server_name, media_id))?;
                *created_at_ms
            }
            None if media_id == cid_string => now_ms,
            None => return Ok(Err(CommandError::NotFound)),
        };

        let (stored, deduplicated) = match self.get_content(&content.cid)? {
            Some(mut stored) => {
                stored.refcount += 1;
                let dedup = stored.blob_key != content.blob_key;
                (stored, dedup)
            }
            None => (ContentRecord { refcount: 1, created_at_ms: now_ms, ..content.clone() }, false),
        };
        self.content.insert(stored.cid.to_bytes().as_slice(), encode(&stored)?.as_slice())?;
        let media = MediaRecord {
            key: MediaKey::new(server_name, media_id),
            uploader: user_id.to_owned(),
            created_at_ms,
            state: MediaState::Ready {
                cid: content.cid,
                content_type: content_type.to_owned(),
                filename: filename.map(str::to_owned),
                uploaded_at_ms: now_ms,
            },
        };
        self.put_media(&media)?;
        Ok(Ok(CommitOutcome { media, content: stored, deduplicated }))
    }

    fn get_content(&self, cid: &Cid) -> Result<Option<ContentRecord>, StorageError> {
        let found = self.content.get(cid.to_bytes().as_slice())?;
        found.map(|v| decode("content", v.value())).transpose()
    }

    fn expire(&mut self, now_ms: u64) -> Result<Applied, StorageError> {
        let mut expired = Vec::new();
        for entry in self.pending.iter()? {
            let (k, v) = entry?;
            if v.value() <= now_ms {
                let (user, server, media) = k.value();
                expired.push((user.to_owned(), server.to_owned(), media.to_owned()));
            }
        }
        for (user, server, media) in &expired {
            self.pending.remove((user.as_str(), server.as_str(), media.as_str()))?;
            self.media.remove((server.as_str(), media.as_str()))?;
        }
        let mut stale = Vec::new();
        for entry in self.uploads.iter()? {
            let (k, v) = entry?;
            let (at, _): (u64, CommitOutcome) = decode("uploads", v.value())?;
            if at.saturating_add(UPLOAD_RECORD_TTL_MS) <= now_ms {
                stale.push(k.value().to_owned());
            }
        }
        for id in &stale {
            self.uploads.remove(id.as_str())?;
        }
        Ok(Ok(CommandOutput::Expired { removed: expired.len() as u64 }))
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_stdvec(value).map_err(|e| StorageError::Database(format!("cannot encode record: {e}")))
}

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt { table, detail: e.to_string() })
}

type Reply = oneshot::Sender<Result<Applied, StorageError>>;

/// Group commit: one thread owns the write side of the state machine and applies whatever
/// commands have queued up since its last fsync as one batch.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<(Command, Reply)>,
}

/// Most commands applied in one transaction.
const MAX_BATCH: usize = 512;

impl Writer {
    /// Starts the writer thread. It stops when every `Writer` handle is dropped, or for good
    /// after a storage error (every later submit then fails with [`StorageError::WriterStopped`]).
    pub fn spawn(sm: Arc<StateMachine>) -> Result<Self, StorageError> {
        let (tx, mut rx) = mpsc::channel::<(Command, Reply)>(4 * MAX_BATCH);
        let mut next_index = sm.last_applied()? + 1;
        std::thread::Builder::new()
            .name("mxcas-meta-writer".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(MAX_BATCH);
                while let Some(first) = rx.blocking_recv() {
                    batch.push(first);
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(next) => batch.push(next),
                            Err(_) => break,
                        }
                    }
                    let (cmds, replies): (Vec<_>, Vec<_>) = batch
                        .drain(..)
                        .enumerate()
                        .map(|(i, (cmd, reply))| ((next_index + i as u64, cmd), reply))
                        .unzip();
                    match sm.apply_batch(&cmds) {
                        Ok(results) => {
                            next_index += cmds.len() as u64;
                            tracing::debug!(batch = cmds.len(), last_applied = next_index - 1, "applied");
                            for (reply, result) in replies.into_iter().zip(results) {
                                let _ = reply.send(Ok(result));
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "metadata store failed; the writer stops");
                            for reply in replies {
                                let _ = reply.send(Err(StorageError::Database(e.to_string())));
                            }
                            return;
                        }
                    }
                }
            })
            .map_err(|e| StorageError::Database(format!("cannot start writer thread: {e}")))?;
        Ok(Self { tx })
    }

    /// Applies `cmd` and waits until its result is durable.
    pub async fn submit(&self, cmd: Command) -> Result<Applied, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((cmd, reply)).await.map_err(|_| StorageError::WriterStopped)?;
        rx.await.map_err(|_| StorageError::WriterStopped)?
    }

    /// True once the writer thread has stopped (after a storage error).
    pub fn is_stopped(&self) -> bool {
        self.tx.is_closed()
    }
}

#[cfg(test)]
mod tests;
