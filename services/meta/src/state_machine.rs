//! The metadata state machine, persisted in redb.
//!
//! [`StateMachine::apply_batch`] applies commands in one write transaction and commits it
//! durably (fsync) before returning, recording the index of the last applied command so a
//! restart knows where it stands. Each command checks all its preconditions before writing, so
//! a rejected command leaves no trace. Raft drives it ([`crate::raft`]): committed log entries
//! arrive in batches, so under load one fsync covers many uploads (group commit), and the raft
//! bookkeeping (last applied log ID, membership) is written in the same transaction.
//! [`StateMachine::export`] / [`StateMachine::import`] stream the whole state for snapshots.

use cid::Cid;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};
use std::path::Path;

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
/// (committed_at_ms, upload_id) → (): `UPLOADS` by age, so expiry reads only what expires
const UPLOADS_BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("uploads_by_time");
/// blob-store object key → binary CID, for every object a content record references
const BLOB_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("blob_keys");
/// bookkeeping: "last_applied"
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// opaque values the raft layer stores with the state (last applied log ID, membership)
const EXTRA: TableDefinition<&str, &[u8]> = TableDefinition::new("extra");

/// redb page cache of the state database.
const STATE_CACHE_BYTES: usize = 128 << 20;

/// How long a commit's answer is kept for retries of the same `upload_id`.
const UPLOAD_RECORD_TTL_MS: u64 = 24 * 60 * 60 * 1000;

type Applied = Result<CommandOutput, CommandError>;

pub struct StateMachine {
    db: Database,
}

impl StateMachine {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        // redb's page cache would otherwise grow to 1 GiB; the working set of lookups is small.
        let db = Database::builder().set_cache_size(STATE_CACHE_BYTES).create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(MEDIA)?;
        txn.open_table(CONTENT)?;
        txn.open_table(PENDING)?;
        txn.open_table(UPLOADS)?;
        txn.open_table(UPLOADS_BY_TIME)?;
        txn.open_table(BLOB_KEYS)?;
        txn.open_table(META)?;
        txn.open_table(EXTRA)?;
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
        let entries: Vec<(u64, Option<&Command>)> = entries.iter().map(|(i, c)| (*i, Some(c))).collect();
        Ok(self.apply_entries(&entries, &[])?.into_iter().flatten().collect())
    }

    /// Applies log entries in order, in one durable transaction: `None` entries (raft's own,
    /// e.g. membership changes) only advance the index. `extras` are stored in the same
    /// transaction. Returns one result per entry (`None` for `None` entries).
    pub fn apply_entries(
        &self,
        entries: &[(u64, Option<&Command>)],
        extras: &[(&str, Vec<u8>)],
    ) -> Result<Vec<Option<Applied>>, StorageError> {
        let txn = self.db.begin_write()?;
        let mut results = Vec::with_capacity(entries.len());
        {
            let mut tables = Tables {
                media: txn.open_table(MEDIA)?,
                content: txn.open_table(CONTENT)?,
                pending: txn.open_table(PENDING)?,
                uploads: txn.open_table(UPLOADS)?,
                uploads_by_time: txn.open_table(UPLOADS_BY_TIME)?,
                blob_keys: txn.open_table(BLOB_KEYS)?,
            };
            for (_, cmd) in entries {
                results.push(match cmd {
                    Some(cmd) => Some(tables.apply(cmd)?),
                    None => None,
                });
            }
            if let Some((index, _)) = entries.last() {
                txn.open_table(META)?.insert("last_applied", *index)?;
            }
            let mut extra = txn.open_table(EXTRA)?;
            for (k, v) in extras {
                extra.insert(*k, v.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(results)
    }

    /// A value stored by [`Self::apply_entries`] or [`Self::import`].
    pub fn extra(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EXTRA)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Writes the whole state (every record, not the extras) to `out`, from one consistent
    /// read transaction, and returns `(records written, the extras named in extra_keys as of
    /// that same state)`.
    pub fn export(&self, out: &mut impl std::io::Write, extra_keys: &[&str]) -> Result<Exported, StorageError> {
        let txn = self.db.begin_read()?;
        let mut n = 0u64;
        let mut put = |rec: &SnapshotRecord| -> Result<(), StorageError> {
            write_record(out, rec)?;
            n += 1;
            Ok(())
        };
        for entry in txn.open_table(MEDIA)?.iter()? {
            let (k, v) = entry?;
            let (server, id) = k.value();
            put(&SnapshotRecord::Media { server: server.into(), id: id.into(), value: v.value().to_vec() })?;
        }
        for entry in txn.open_table(CONTENT)?.iter()? {
            let (k, v) = entry?;
            put(&SnapshotRecord::Content { cid: k.value().to_vec(), value: v.value().to_vec() })?;
        }
        for entry in txn.open_table(PENDING)?.iter()? {
            let (k, v) = entry?;
            let (user, server, id) = k.value();
            put(&SnapshotRecord::Pending {
                user: user.into(),
                server: server.into(),
                id: id.into(),
                expires_at_ms: v.value(),
            })?;
        }
        for entry in txn.open_table(UPLOADS)?.iter()? {
            let (k, v) = entry?;
            put(&SnapshotRecord::Upload { id: k.value().into(), value: v.value().to_vec() })?;
        }
        for entry in txn.open_table(META)?.iter()? {
            let (k, v) = entry?;
            put(&SnapshotRecord::Meta { key: k.value().into(), value: v.value() })?;
        }
        let records = n;
        write_record(out, &SnapshotRecord::End { records })?;
        let extra = txn.open_table(EXTRA)?;
        let extras = extra_keys
            .iter()
            .map(|k| extra.get(*k).map(|v| v.map(|v| v.value().to_vec())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((records, extras))
    }

    /// Replaces the whole state with what [`Self::export`] wrote, plus `extras`, in one
    /// durable transaction. A truncated or corrupt input changes nothing.
    pub fn import(&self, input: &mut impl std::io::Read, extras: &[(&str, Vec<u8>)]) -> Result<u64, StorageError> {
        let txn = self.db.begin_write()?;
        let mut count = 0u64;
        {
            let mut media = txn.open_table(MEDIA)?;
            let mut content = txn.open_table(CONTENT)?;
            let mut pending = txn.open_table(PENDING)?;
            let mut uploads = txn.open_table(UPLOADS)?;
            let mut uploads_by_time = txn.open_table(UPLOADS_BY_TIME)?;
            let mut blob_keys = txn.open_table(BLOB_KEYS)?;
            let mut meta = txn.open_table(META)?;
            media.retain(|_, _| false)?;
            content.retain(|_, _| false)?;
            pending.retain(|_, _| false)?;
            uploads.retain(|_, _| false)?;
            uploads_by_time.retain(|_, _| false)?;
            blob_keys.retain(|_, _| false)?;
            meta.retain(|_, _| false)?;
            let mut buf = Vec::new();
            loop {
                let mut len = [0u8; 4];
                input.read_exact(&mut len).map_err(|e| snapshot_err(format!("truncated snapshot: {e}")))?;
                buf.resize(u32::from_le_bytes(len) as usize, 0);
                input.read_exact(&mut buf).map_err(|e| snapshot_err(format!("truncated snapshot: {e}")))?;
                let rec: SnapshotRecord = decode("snapshot", &buf)?;
                match rec {
                    SnapshotRecord::Media { server, id, value } => {
                        media.insert((server.as_str(), id.as_str()), value.as_slice())?;
                    }
                    SnapshotRecord::Content { cid, value } => {
                        let record: ContentRecord = decode("snapshot", &value)?;
                        blob_keys.insert(record.blob_key.as_str(), cid.as_slice())?;
                        if let Some(idx) = &record.index_key {
                            blob_keys.insert(idx.as_str(), cid.as_slice())?;
                        }
                        content.insert(cid.as_slice(), value.as_slice())?;
                    }
                    SnapshotRecord::Pending { user, server, id, expires_at_ms } => {
                        pending.insert((user.as_str(), server.as_str(), id.as_str()), expires_at_ms)?;
                    }
                    SnapshotRecord::Upload { id, value } => {
                        let (at, _): (u64, CommitOutcome) = decode("snapshot", &value)?;
                        uploads.insert(id.as_str(), value.as_slice())?;
                        uploads_by_time.insert((at, id.as_str()), ())?;
                    }
                    SnapshotRecord::Meta { key, value } => {
                        meta.insert(key.as_str(), value)?;
                    }
                    SnapshotRecord::End { records } => {
                        if records != count {
                            return Err(snapshot_err(format!("snapshot has {count} records, trailer says {records}")));
                        }
                        break;
                    }
                }
                count += 1;
            }
            let mut extra = txn.open_table(EXTRA)?;
            for (k, v) in extras {
                extra.insert(*k, v.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(count)
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

    /// sha2-256 of [`Self::export`]'s output: equal on replicas with the same state.
    pub fn digest(&self) -> Result<[u8; 32], StorageError> {
        let mut w = Hashing::new(std::io::sink());
        self.export(&mut w, &[])?;
        Ok(sha2::Digest::finalize(w.hash).into())
    }

    /// For each object key, whether a content record references it.
    pub fn referenced(&self, keys: &[String]) -> Result<Vec<bool>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOB_KEYS)?;
        keys.iter().map(|k| Ok(table.get(k.as_str())?.is_some())).collect()
    }

    /// Every blob key the metadata references (tests).
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
    uploads_by_time: redb::Table<'txn, (u64, &'static str), ()>,
    blob_keys: redb::Table<'txn, &'static str, &'static [u8]>,
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
                    self.uploads_by_time.insert((*now_ms, upload_id.as_str()), ())?;
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
        // Synchronous uploads are named by their CID; an asynchronous one fills a reservation
        // (even if a client picked a reservation ID that looks like a CID).
        let is_sync = media_id.is_none();
        let media_id = media_id.unwrap_or(&cid_string);
        let existing = self.get_media(server_name, media_id)?;
        let created_at_ms = match &existing {
            // A synchronous upload of bytes this server already has: same mxc, nothing new.
            Some(record @ MediaRecord { state: MediaState::Ready { cid, .. }, .. })
                if is_sync && *cid == content.cid =>
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
            Some(MediaRecord { state: MediaState::Pending { .. }, .. }) if is_sync => {
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
            None if is_sync => now_ms,
            None => return Ok(Err(CommandError::NotFound)),
        };

        let (stored, deduplicated) = match self.get_content(&content.cid)? {
            Some(mut stored) => {
                stored.refcount += 1;
                let dedup = stored.blob_key != content.blob_key;
                (stored, dedup)
            }
            None => {
                let cid = content.cid.to_bytes();
                self.blob_keys.insert(content.blob_key.as_str(), cid.as_slice())?;
                if let Some(idx) = &content.index_key {
                    self.blob_keys.insert(idx.as_str(), cid.as_slice())?;
                }
                (ContentRecord { refcount: 1, created_at_ms: now_ms, ..content.clone() }, false)
            }
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
        let cutoff = now_ms.saturating_sub(UPLOAD_RECORD_TTL_MS);
        let mut stale = Vec::new();
        for entry in self.uploads_by_time.range(..(cutoff, ""))? {
            let (k, _) = entry?;
            let (at, id) = k.value();
            stale.push((at, id.to_owned()));
        }
        for (at, id) in &stale {
            self.uploads.remove(id.as_str())?;
            self.uploads_by_time.remove((*at, id.as_str()))?;
        }
        Ok(Ok(CommandOutput::Expired { removed: expired.len() as u64 }))
    }
}

/// A writer that hashes (sha2-256) everything written through it.
pub(crate) struct Hashing<W> {
    pub inner: W,
    pub hash: sha2::Sha256,
}

impl<W> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, hash: <sha2::Sha256 as sha2::Digest>::new() }
    }
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hash, &buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_stdvec(value).map_err(|e| StorageError::Database(format!("cannot encode record: {e}")))
}

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt { table, detail: e.to_string() })
}

/// One record of a state snapshot (see [`StateMachine::export`]).
#[derive(Serialize, serde::Deserialize)]
enum SnapshotRecord {
    Media {
        server: String,
        id: String,
        value: Vec<u8>,
    },
    Content {
        cid: Vec<u8>,
        value: Vec<u8>,
    },
    Pending {
        user: String,
        server: String,
        id: String,
        expires_at_ms: u64,
    },
    Upload {
        id: String,
        value: Vec<u8>,
    },
    Meta {
        key: String,
        value: u64,
    },
    /// Trailer: the number of records before it (detects truncation).
    End {
        records: u64,
    },
}

/// `(records written, requested extras)` of [`StateMachine::export`].
pub type Exported = (u64, Vec<Option<Vec<u8>>>);

fn write_record(out: &mut impl std::io::Write, rec: &SnapshotRecord) -> Result<(), StorageError> {
    let bytes = encode(rec)?;
    out.write_all(&(bytes.len() as u32).to_le_bytes()).map_err(io_err)?;
    out.write_all(&bytes).map_err(io_err)
}

fn io_err(e: std::io::Error) -> StorageError {
    StorageError::Database(format!("snapshot I/O: {e}"))
}

fn snapshot_err(detail: String) -> StorageError {
    StorageError::Corrupt { table: "snapshot", detail }
}

#[cfg(test)]
mod tests;
