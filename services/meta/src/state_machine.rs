//! The metadata state machine, persisted in redb.
//!
//! [`StateMachine::apply_batch`] applies commands in one write transaction and commits it
//! durably (fsync) before returning, recording the index of the last applied command so a
//! restart knows where it stands. Each command checks all its preconditions before writing, so
//! a rejected command leaves no trace. Raft drives it ([`crate::raft`]) through
//! [`StateMachine::apply_entries_with_changes`]: committed log entries arrive in batches and
//! are fsynced only now and then, since the raft log already holds them durably, and the raft
//! bookkeeping (last applied log ID, membership) is written in the same transaction.
//! [`StateMachine::export`] / [`StateMachine::import`] stream the whole state for snapshots.

use cid::Cid;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};
use std::path::Path;

use crate::command::{Changed, Command, CommandOutput, CommitOutcome, Generations, ThumbnailOutcome};
use crate::error::{CommandError, StorageError};
use crate::model::{
    ContentRecord, MediaKey, MediaRecord, MediaState, Quota, QuotaScope, ThumbnailRecord, ThumbnailSpec, Usage,
    blob_key,
};

/// (server_name, media_id) → postcard(MediaRecord)
const MEDIA: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("media");
/// binary CID → postcard(ContentRecord)
const CONTENT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("content");
/// (user_id, server_name, media_id) → expires_at_ms, for every pending reservation
const PENDING: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("pending");
/// (expires_at_ms, server_name, media_id) → user_id: `PENDING` by expiry, so expiring reads
/// only what expires
const PENDING_BY_EXPIRY: TableDefinition<(u64, &str, &str), &str> = TableDefinition::new("pending_by_expiry");
/// (binary source CID, [`ThumbnailSpec::key`]) → postcard(ThumbnailRecord)
const THUMBNAILS: TableDefinition<(&[u8], &str), &[u8]> = TableDefinition::new("thumbnails");
/// `<window end ms, 16 hex digits>:<period ms, hex>:u:<user>` / `…:t:<server name>` →
/// postcard(Usage): uploads per quota window. Keys sort by when their window ends, so rows of
/// windows that are over come first and are pruned a few per quota command (see
/// [`USAGE_PRUNE_BATCH`]); quotas of different periods keep rows of their own.
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");
/// (block CID, root CID): the stored DAGs holding each block, for the trustless gateway.
/// Written by [`Command::IndexBlocks`]; content records are never removed, so neither are
/// these (removal of media will remove both).
const BLOCKS: TableDefinition<(&[u8], &[u8]), ()> = TableDefinition::new("blocks");
/// Most roots [`StateMachine::block_roots`] answers for one block.
pub const MAX_BLOCK_ROOTS: usize = 8;
/// Usage rows of past windows removed per quota command: more than the two it may add, so
/// past windows drain however many users once uploaded.
const USAGE_PRUNE_BATCH: usize = 8;
/// blob-store object key → binary CID, for every object a content record references
const BLOB_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("blob_keys");
/// object keys of unsealed generations that no commit may ever reference (released
/// duplicates); dropped once their generation is sealed, which refuses them anyway
const TOMBSTONES: TableDefinition<&str, ()> = TableDefinition::new("tombstones");
/// log index → postcard(Vec<Changed>): the recent changes, for watchers resuming from an index.
/// Not part of snapshots (a node that installed one answers older resumes with "resync").
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
/// bookkeeping: "last_applied", and the clock and reclaim generations (see [`META_KEYS`])
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// opaque values the raft layer stores with the state (last applied log ID, membership)
const EXTRA: TableDefinition<&str, &[u8]> = TableDefinition::new("extra");

/// The state machine's clock: the largest leader time any command carried.
const CLOCK: &str = "clock_ms";
/// The current reclaim generation (uploads name objects under it); 1 in a new state.
const GENERATION: &str = "generation";
/// Generations up to this one are sealed: no commit may name their objects.
const SEALED: &str = "sealed";
/// Leader time of the last generation advance.
const ADVANCED_AT: &str = "advanced_at_ms";
/// The blob store's identity, recorded once (see `Command::RegisterStore`).
const STORE_ID: &str = "store_id";
/// Version of this database's layout; a database without it predates the format.
const FORMAT: &str = "format";
/// The layout this build reads and writes.
const FORMAT_VERSION: u64 = 2;
/// How far a restore from a backup moves the reclaim generation on (see `import`): further
/// than any cluster gets (one advance per 10 minutes is 190 years), so every generation the
/// old cluster issued is sealed in the restored one.
const RESTORE_GENERATION_JUMP: u64 = 10_000_000;

/// Every change after this log index is recorded (later than an installed snapshot's position
/// and than the pruned history). This node's own bookkeeping: not in snapshots.
const CHANGES_FROM: &str = "changes_from";

/// Changes kept for resuming watchers: a watcher further behind resyncs.
pub const CHANGES_KEPT: u64 = 100_000;

/// redb page cache of the state database.
const STATE_CACHE_BYTES: usize = 128 << 20;

type Applied = Result<CommandOutput, CommandError>;

/// One result per entry (`None` for raft's own), and the changes made, by log index.
pub type AppliedWithChanges = (Vec<Option<Applied>>, Vec<(u64, Changed)>);

pub struct StateMachine {
    db: Database,
    /// When the last durable (fsynced) apply was, and how many applies since: see
    /// [`StateMachine::apply_entries_with_changes`].
    lazy: std::sync::Mutex<(std::time::Instant, u32)>,
}

/// Applies between two fsynced ones, at most (each one re-applied from the log after a crash).
const LAZY_APPLIES: u32 = 64;
/// Longest time between two fsynced applies.
const LAZY_FOR: std::time::Duration = std::time::Duration::from_secs(1);

impl StateMachine {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        // redb's page cache would otherwise grow to 1 GiB; the working set of lookups is small.
        let db = Database::builder().set_cache_size(STATE_CACHE_BYTES).create(path)?;
        {
            let txn = db.begin_read()?;
            let existing = match txn.open_table(META) {
                Ok(meta) => Some(meta.get(FORMAT)?.map(|v| v.value()).unwrap_or(1)),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            if let Some(found) = existing
                && found != FORMAT_VERSION
            {
                return Err(StorageError::Database(format!(
                    "{} holds metadata in format {found}; this mxcas reads format {FORMAT_VERSION} only. \
                     Run the mxcas version that wrote it, or start this node with an empty data directory \
                     and let it catch up from the cluster",
                    path.display()
                )));
            }
        }
        let txn = db.begin_write()?;
        txn.open_table(MEDIA)?;
        txn.open_table(CONTENT)?;
        txn.open_table(PENDING)?;
        txn.open_table(PENDING_BY_EXPIRY)?;
        txn.open_table(BLOB_KEYS)?;
        txn.open_table(TOMBSTONES)?;
        txn.open_table(CHANGES)?;
        txn.open_table(THUMBNAILS)?;
        txn.open_table(USAGE)?;
        txn.open_table(BLOCKS)?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(FORMAT, FORMAT_VERSION)?;
            // A state without change history yet has none of what it applied so far.
            if meta.get(CHANGES_FROM)?.is_none() {
                let applied = meta.get("last_applied")?.map(|v| v.value()).unwrap_or(0);
                meta.insert(CHANGES_FROM, applied)?;
            }
        }
        txn.open_table(EXTRA)?;
        txn.commit()?;
        Ok(Self { db, lazy: std::sync::Mutex::new((std::time::Instant::now(), 0)) })
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
        Ok(self.apply_entries_with_changes(entries, extras, true)?.0)
    }

    /// Makes every apply so far durable (one empty fsynced transaction): before a snapshot is
    /// built, so the log it lets raft purge is never needed to rebuild the state.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.begin_write()?.commit()?;
        if let Ok(mut lazy) = self.lazy.lock() {
            *lazy = (std::time::Instant::now(), 0);
        }
        Ok(())
    }

    /// Whether the next apply should be fsynced: the raft log already holds every applied
    /// entry durably on a majority, so the state only needs to be durable often enough to
    /// bound the replay after a crash (and always before the log is purged: [`Self::flush`]).
    fn durable_due(&self) -> bool {
        match self.lazy.lock() {
            Ok(mut lazy) => {
                lazy.1 += 1;
                if lazy.1 >= LAZY_APPLIES || lazy.0.elapsed() >= LAZY_FOR {
                    *lazy = (std::time::Instant::now(), 0);
                    true
                } else {
                    false
                }
            }
            Err(_) => true,
        }
    }

    /// [`Self::apply_entries`], also returning the changes to mutable facts the entries made
    /// (recorded in the same transaction, by log index). Unless `durable`, the transaction is
    /// fsynced only now and then (every [`LAZY_APPLIES`] applies or [`LAZY_FOR`]): for entries
    /// the raft log already holds durably, a crash only rewinds the state to its last fsynced
    /// apply, recorded position included, and raft applies the rest again from the log.
    pub fn apply_entries_with_changes(
        &self,
        entries: &[(u64, Option<&Command>)],
        extras: &[(&str, Vec<u8>)],
        durable: bool,
    ) -> Result<AppliedWithChanges, StorageError> {
        let mut txn = self.db.begin_write()?;
        if !durable && !self.durable_due() {
            txn.set_durability(redb::Durability::None)?;
        }
        let mut results = Vec::with_capacity(entries.len());
        let mut all_changes = Vec::new();
        {
            let mut tables = Tables {
                media: txn.open_table(MEDIA)?,
                content: txn.open_table(CONTENT)?,
                pending: txn.open_table(PENDING)?,
                pending_by_expiry: txn.open_table(PENDING_BY_EXPIRY)?,
                blob_keys: txn.open_table(BLOB_KEYS)?,
                tombstones: txn.open_table(TOMBSTONES)?,
                meta: txn.open_table(META)?,
                thumbnails: txn.open_table(THUMBNAILS)?,
                usage: txn.open_table(USAGE)?,
                blocks: txn.open_table(BLOCKS)?,
                changed: Vec::new(),
                generations: None,
                clock: None,
            };
            let mut changes = txn.open_table(CHANGES)?;
            for (index, cmd) in entries {
                results.push(match cmd {
                    Some(cmd) => Some(tables.apply(cmd)?),
                    None => None,
                });
                if !tables.changed.is_empty() {
                    let made: Vec<Changed> = std::mem::take(&mut tables.changed);
                    changes.insert(*index, encode(&made)?.as_slice())?;
                    all_changes.extend(made.into_iter().map(|c| (*index, c)));
                }
            }
            if let Some(now) = tables.clock {
                tables.meta.insert(CLOCK, now)?;
            }
            if let Some((index, _)) = entries.last() {
                tables.meta.insert("last_applied", *index)?;
                // Keep the changes of the last CHANGES_KEPT entries; every change after
                // CHANGES_FROM is recorded.
                let oldest_kept = index.saturating_sub(CHANGES_KEPT);
                if oldest_kept > 0 {
                    changes.retain_in(..oldest_kept, |_, _| false)?;
                    let from = tables.meta_value(CHANGES_FROM)?.unwrap_or(0).max(oldest_kept - 1);
                    tables.meta.insert(CHANGES_FROM, from)?;
                }
            }
            let mut extra = txn.open_table(EXTRA)?;
            for (k, v) in extras {
                extra.insert(*k, v.as_slice())?;
            }
        }
        txn.commit()?;
        Ok((results, all_changes))
    }

    /// The recorded changes after log index `after`, at most `limit`, and whether every change
    /// since `after` is still recorded (false: the caller missed some and must resync).
    pub fn changes_since(&self, after: u64, limit: usize) -> Result<(bool, Vec<(u64, Changed)>), StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CHANGES)?;
        // Recorded are the changes after CHANGES_FROM: not those pruned, nor those before an
        // installed snapshot.
        let since = txn.open_table(META)?.get(CHANGES_FROM)?.map(|v| v.value()).unwrap_or(0);
        let complete = after >= since;
        let mut out = Vec::new();
        for entry in table.range(after.saturating_add(1)..)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry?;
            let made: Vec<Changed> = decode("changes", v.value())?;
            out.extend(made.into_iter().map(|c| (k.value(), c)));
        }
        Ok((complete, out))
    }

    /// A value stored by [`Self::apply_entries`] or [`Self::import`].
    pub fn extra(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EXTRA)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Writes the whole state (every record, not the extras) to `out` in the compact snapshot
    /// form (see [`snapshot_format`]), from one consistent read transaction, and returns the
    /// records written, the extras named in `extra_keys` and, if asked (it costs a second
    /// encoding of every record), the state digest, all as of that same state.
    pub fn export(
        &self,
        out: &mut impl std::io::Write,
        extra_keys: &[&str],
        with_digest: bool,
    ) -> Result<Exported, StorageError> {
        let txn = self.db.begin_read()?;
        let mut compact = snapshot_format::CompactWriter::new(out)?;
        let mut canonical = with_digest.then(|| Hashing::new(std::io::sink()));
        let records = Self::export_from(&txn, &mut |rec| {
            if let Some(c) = &mut canonical {
                snapshot_format::write_canonical(c, rec)?;
            }
            compact.put(rec)
        })?;
        let extra = txn.open_table(EXTRA)?;
        let extras = extra_keys
            .iter()
            .map(|k| extra.get(*k).map(|v| v.map(|v| v.value().to_vec())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Exported { records, extras, digest: canonical.map(|c| sha2::Digest::finalize(c.hash).into()) })
    }

    /// The state in the canonical form earlier versions wrote snapshots in (tests of reading
    /// them).
    #[cfg(test)]
    pub(crate) fn export_canonical(&self, out: &mut impl std::io::Write) -> Result<u64, StorageError> {
        let txn = self.db.begin_read()?;
        Self::export_from(&txn, &mut |rec| snapshot_format::write_canonical(out, rec))
    }

    /// Walks the state of `txn`, giving each record (in canonical order) and then the trailer
    /// to `put`; returns the number of records before the trailer.
    fn export_from(
        txn: &redb::ReadTransaction,
        put_record: &mut dyn FnMut(&SnapshotRecord) -> Result<(), StorageError>,
    ) -> Result<u64, StorageError> {
        let mut n = 0u64;
        let mut put = |rec: &SnapshotRecord| -> Result<(), StorageError> {
            put_record(rec)?;
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
        for entry in txn.open_table(TOMBSTONES)?.iter()? {
            let (k, _) = entry?;
            put(&SnapshotRecord::Tombstone { key: k.value().into() })?;
        }
        for entry in txn.open_table(THUMBNAILS)?.iter()? {
            let (k, v) = entry?;
            let (source, spec) = k.value();
            put(&SnapshotRecord::Thumbnail { source: source.to_vec(), spec: spec.into(), value: v.value().to_vec() })?;
        }
        for entry in txn.open_table(USAGE)?.iter()? {
            let (k, v) = entry?;
            put(&SnapshotRecord::Usage { key: k.value().into(), value: v.value().to_vec() })?;
        }
        for entry in txn.open_table(BLOCKS)?.iter()? {
            let (k, _) = entry?;
            let (block, root) = k.value();
            put(&SnapshotRecord::Block { block: block.to_vec(), root: root.to_vec() })?;
        }
        for entry in txn.open_table(META)?.iter()? {
            let (k, v) = entry?;
            // Where this node's change history starts is its own, not replicated state.
            if k.value() != CHANGES_FROM {
                put(&SnapshotRecord::Meta { key: k.value().into(), value: v.value() })?;
            }
        }
        let records = n;
        put_record(&SnapshotRecord::End { records })?;
        Ok(records)
    }

    /// Replaces the whole state with what [`Self::export`] wrote (or an earlier version wrote,
    /// in the canonical form), plus `extras`, in one
    /// durable transaction. A truncated or corrupt input changes nothing.
    pub fn import(&self, input: &mut impl std::io::Read, extras: &[(&str, Vec<u8>)]) -> Result<u64, StorageError> {
        let txn = self.db.begin_write()?;
        let mut count = 0u64;
        {
            let mut media = txn.open_table(MEDIA)?;
            let mut content = txn.open_table(CONTENT)?;
            let mut pending = txn.open_table(PENDING)?;
            let mut pending_by_expiry = txn.open_table(PENDING_BY_EXPIRY)?;
            let mut blob_keys = txn.open_table(BLOB_KEYS)?;
            let mut tombstones = txn.open_table(TOMBSTONES)?;
            let mut meta = txn.open_table(META)?;
            let mut thumbnails = txn.open_table(THUMBNAILS)?;
            let mut usage = txn.open_table(USAGE)?;
            let mut blocks = txn.open_table(BLOCKS)?;
            txn.open_table(CHANGES)?.retain(|_, _| false)?;
            blocks.retain(|_, _| false)?;
            thumbnails.retain(|_, _| false)?;
            usage.retain(|_, _| false)?;
            media.retain(|_, _| false)?;
            content.retain(|_, _| false)?;
            pending.retain(|_, _| false)?;
            pending_by_expiry.retain(|_, _| false)?;
            blob_keys.retain(|_, _| false)?;
            tombstones.retain(|_, _| false)?;
            meta.retain(|_, _| false)?;
            let mut reader = snapshot_format::Reader::new(input)?;
            loop {
                match reader.next()? {
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
                        pending_by_expiry.insert((expires_at_ms, server.as_str(), id.as_str()), user.as_str())?;
                    }
                    SnapshotRecord::Tombstone { key } => {
                        tombstones.insert(key.as_str(), ())?;
                    }
                    SnapshotRecord::Thumbnail { source, spec, value } => {
                        thumbnails.insert((source.as_slice(), spec.as_str()), value.as_slice())?;
                    }
                    SnapshotRecord::Usage { key, value } => {
                        usage.insert(key.as_str(), value.as_slice())?;
                    }
                    SnapshotRecord::Block { block, root } => {
                        blocks.insert((block.as_slice(), root.as_slice()), ())?;
                    }
                    SnapshotRecord::Meta { key, value } => {
                        if key != CHANGES_FROM {
                            meta.insert(key.as_str(), value)?;
                        }
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
            // No change before this state is recorded here: older resumes must resync.
            let position = meta.get("last_applied")?.map(|v| v.value()).unwrap_or(0);
            meta.insert(CHANGES_FROM, position)?;
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

    /// What `user` and `tenant` uploaded in the window of `now_ms` (by `period_ms`).
    pub fn usage(&self, user: &str, tenant: &str, period_ms: u64, now_ms: u64) -> Result<(Usage, Usage), StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(USAGE)?;
        let window = now_ms / period_ms.max(1);
        let read = |key: String| -> Result<Usage, StorageError> {
            let found = table.get(key.as_str())?.map(|v| decode("usage", v.value())).transpose()?;
            Ok(in_window(found, window))
        };
        Ok((
            read(usage_key(QuotaScope::User, user, window, period_ms))?,
            read(usage_key(QuotaScope::Tenant, tenant, window, period_ms))?,
        ))
    }

    /// How many usage rows are stored (of any window).
    /// Roots of stored DAGs that hold `block` (at most [`MAX_BLOCK_ROOTS`], in CID byte order).
    pub fn block_roots(&self, block: &Cid) -> Result<Vec<Cid>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        let key = block.to_bytes();
        let mut roots = Vec::new();
        for entry in table.range((key.as_slice(), &[][..])..)? {
            let (k, _) = entry?;
            let (b, root) = k.value();
            if b != key.as_slice() || roots.len() == MAX_BLOCK_ROOTS {
                break;
            }
            let root =
                Cid::try_from(root).map_err(|e| StorageError::Corrupt { table: "blocks", detail: e.to_string() })?;
            roots.push(root);
        }
        Ok(roots)
    }

    pub fn usage_rows(&self) -> Result<u64, StorageError> {
        Ok(self.db.begin_read()?.open_table(USAGE)?.len()?)
    }

    /// Every thumbnail recorded for `source`, with its content record.
    pub fn thumbnails(&self, source: &Cid) -> Result<Vec<(ThumbnailRecord, Option<ContentRecord>)>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(THUMBNAILS)?;
        let content = txn.open_table(CONTENT)?;
        let source = source.to_bytes();
        let mut out = Vec::new();
        for entry in table.range((source.as_slice(), "")..)? {
            let (k, v) = entry?;
            if k.value().0 != source.as_slice() {
                break;
            }
            let record: ThumbnailRecord = decode("thumbnails", v.value())?;
            let c = content.get(record.cid.to_bytes().as_slice())?.map(|v| decode("content", v.value())).transpose()?;
            out.push((record, c));
        }
        Ok(out)
    }

    /// After a restore from a backup: moves the reclaim generation past any the old cluster
    /// can have issued since, and seals everything before it. Objects of those generations
    /// (uploads that raced the old cluster's end) are refused, so edges store them again.
    pub fn seal_for_restore(&self) -> Result<(), StorageError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let generation = meta.get(GENERATION)?.map(|v| v.value()).unwrap_or(1) + RESTORE_GENERATION_JUMP;
            meta.insert(GENERATION, generation)?;
            meta.insert(SEALED, generation - 1)?;
            txn.open_table(TOMBSTONES)?.retain(|_, _| false)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// When the next pending reservation expires (`None`: none pending).
    pub fn next_expiry(&self) -> Result<Option<u64>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PENDING_BY_EXPIRY)?;
        Ok(table.first()?.map(|(k, _)| k.value().0))
    }

    /// The state's clock: the latest leader time any applied command carried (0: none yet).
    pub fn clock(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(META)?.get(CLOCK)?.map(|v| v.value()).unwrap_or(0))
    }

    /// The reclaim generations as of this node's state.
    pub fn generations(&self) -> Result<Generations, StorageError> {
        generations_in(&self.db.begin_read()?.open_table(META)?)
    }

    /// Whether `key` is tombstoned (tests).
    pub fn is_tombstoned(&self, key: &str) -> Result<bool, StorageError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(TOMBSTONES)?.get(key)?.is_some())
    }

    /// Number of (media, content) records.
    pub fn counts(&self) -> Result<(u64, u64), StorageError> {
        let txn = self.db.begin_read()?;
        Ok((txn.open_table(MEDIA)?.len()?, txn.open_table(CONTENT)?.len()?))
    }

    /// sha2-256 of the state's records in the canonical snapshot form (see
    /// [`snapshot_format`]): equal on replicas with the same state, whatever version wrote the
    /// snapshot they came from.
    pub fn digest(&self) -> Result<[u8; 32], StorageError> {
        Ok(self.digest_at()?.1)
    }

    /// `(last applied index, digest)` from one consistent read.
    pub fn digest_at(&self) -> Result<(u64, [u8; 32]), StorageError> {
        let txn = self.db.begin_read()?;
        let applied = txn.open_table(META)?.get("last_applied")?.map(|v| v.value()).unwrap_or(0);
        let mut w = Hashing::new(std::io::sink());
        Self::export_from(&txn, &mut |rec| snapshot_format::write_canonical(&mut w, rec))?;
        Ok((applied, sha2::Digest::finalize(w.hash).into()))
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
    pending_by_expiry: redb::Table<'txn, (u64, &'static str, &'static str), &'static str>,
    blob_keys: redb::Table<'txn, &'static str, &'static [u8]>,
    tombstones: redb::Table<'txn, &'static str, ()>,
    meta: redb::Table<'txn, &'static str, u64>,
    thumbnails: redb::Table<'txn, (&'static [u8], &'static str), &'static [u8]>,
    usage: redb::Table<'txn, &'static str, &'static [u8]>,
    blocks: redb::Table<'txn, (&'static [u8], &'static [u8]), ()>,
    /// Changes to mutable facts made by the command being applied.
    changed: Vec<Changed>,
    /// The generations as of the last command applied in this transaction (read once).
    generations: Option<Generations>,
    /// The clock as of the last command applied in this transaction, stored once at its end.
    clock: Option<u64>,
}

/// What a commit's content is to the stored content record.
enum Attached {
    /// The caller's objects hold the content now (new content, a repair, or a retry).
    Ours(ContentRecord),
    /// The content is stored elsewhere; the caller's objects are released.
    Duplicate(ContentRecord),
}

impl Tables<'_> {
    fn apply(&mut self, cmd: &Command) -> Result<Applied, StorageError> {
        match cmd {
            Command::CreatePending { media, user_id, now_ms, ttl_ms, max_pending_per_user } => {
                let now = self.clock(*now_ms)?;
                self.create_pending(media, user_id, now, *ttl_ms, *max_pending_per_user)
            }
            Command::CommitUpload {
                server_name,
                media_id,
                user_id,
                now_ms,
                content,
                content_type,
                filename,
                lost_key,
            } => {
                let now = self.clock(*now_ms)?;
                let upload = Upload {
                    server_name,
                    media_id: media_id.as_deref(),
                    user_id,
                    content,
                    content_type,
                    filename: filename.as_deref(),
                    lost_key: lost_key.as_deref(),
                };
                Ok(self.commit_upload(&upload, now)?.map(CommandOutput::Committed))
            }
            Command::Expire { now_ms, limit } => {
                let now = self.clock(*now_ms)?;
                self.expire(now, *limit)
            }
            Command::BeginSweep { now_ms, min_interval_ms } => {
                let now = self.clock(*now_ms)?;
                self.begin_sweep(now, *min_interval_ms)
            }
            Command::Batch(cmds) => {
                let mut outcomes = Vec::with_capacity(cmds.len());
                for cmd in cmds {
                    outcomes.push(match cmd {
                        Command::Batch(_) => Err(CommandError::InvalidArgument("nested batch".into())),
                        cmd => self.apply(cmd)?,
                    });
                }
                Ok(Ok(CommandOutput::Batch(outcomes)))
            }
            Command::ReportLost { cid, blob_key } => self.report_lost(cid, blob_key),
            Command::Limited { quota, user, tenant, command } => self.limited(quota, user, tenant, command),
            Command::CommitThumbnail {
                source,
                spec,
                now_ms,
                content,
                content_type,
                width,
                height,
                animated,
                lost_key,
            } => {
                let now = self.clock(*now_ms)?;
                let made = ThumbnailRecord {
                    source: *source,
                    spec: *spec,
                    cid: content.cid,
                    content_type: content_type.clone(),
                    width: *width,
                    height: *height,
                    animated: *animated,
                    created_at_ms: now,
                };
                Ok(self.commit_thumbnail(made, content, lost_key.as_deref(), now)?.map(CommandOutput::Thumbnail))
            }
            Command::IndexBlocks { root, blocks } => self.index_blocks(root, blocks),
            Command::RegisterStore { id } => {
                let stored = match self.meta_value(STORE_ID)? {
                    Some(existing) => existing,
                    None if *id != 0 => {
                        self.meta.insert(STORE_ID, *id)?;
                        self.generations = None;
                        *id
                    }
                    None => return Ok(Err(CommandError::InvalidArgument("store id 0".into()))),
                };
                Ok(Ok(CommandOutput::StoreId(stored)))
            }
        }
    }

    fn meta_value(&self, key: &str) -> Result<Option<u64>, StorageError> {
        Ok(self.meta.get(key)?.map(|v| v.value()))
    }

    /// The time a command runs at: the leader's clock as stamped, never earlier than any
    /// command before it.
    fn clock(&mut self, proposed: u64) -> Result<u64, StorageError> {
        let before = match self.clock {
            Some(c) => c,
            None => self.meta_value(CLOCK)?.unwrap_or(0),
        };
        let now = before.max(proposed);
        self.clock = Some(now);
        Ok(now)
    }

    fn generations(&mut self) -> Result<Generations, StorageError> {
        match self.generations {
            Some(g) => Ok(g),
            None => {
                let g = generations_in(&self.meta)?;
                self.generations = Some(g);
                Ok(g)
            }
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
        ttl_ms: u64,
        max_pending: u32,
    ) -> Result<Applied, StorageError> {
        if media.server_name.is_empty() || media.media_id.is_empty() || user_id.is_empty() || ttl_ms == 0 {
            return Ok(Err(CommandError::InvalidArgument("empty server name, media ID, user or lifetime".into())));
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
        let expires_at_ms = now_ms.saturating_add(ttl_ms);
        let record = MediaRecord {
            key: media.clone(),
            uploader: user_id.to_owned(),
            created_at_ms: now_ms,
            state: MediaState::Pending { expires_at_ms },
        };
        self.put_media(&record)?;
        let (server, id) = (media.server_name.as_str(), media.media_id.as_str());
        self.pending.insert((user_id, server, id), expires_at_ms)?;
        self.pending_by_expiry.insert((expires_at_ms, server, id), user_id)?;
        Ok(Ok(CommandOutput::Pending(record)))
    }

    fn remove_pending(&mut self, user: &str, server: &str, media_id: &str) -> Result<(), StorageError> {
        if let Some(expires) = self.pending.remove((user, server, media_id))?.map(|v| v.value()) {
            self.pending_by_expiry.remove((expires, server, media_id))?;
        }
        Ok(())
    }

    fn commit_upload(
        &mut self,
        u: &Upload<'_>,
        now_ms: u64,
    ) -> Result<Result<CommitOutcome, CommandError>, StorageError> {
        let content = u.content;
        if u.server_name.is_empty() || u.user_id.is_empty() || content.blob_key.is_empty() {
            return Ok(Err(CommandError::InvalidArgument("empty server name, user or blob key".into())));
        }
        let cid_string = content.cid.to_string();
        // Synchronous uploads are named by their CID; an asynchronous one fills a reservation
        // (even if a client picked a reservation ID that looks like a CID).
        let is_sync = u.media_id.is_none();
        let media_id = u.media_id.unwrap_or(&cid_string);
        let existing = self.get_media(u.server_name, media_id)?;
        let created_at_ms = match &existing {
            // The same bytes again: a synchronous upload of bytes this server already has, or
            // a retried commit of a reservation whose first answer was lost (same uploader;
            // a reservation ID is random, so it is never the CID of what fills it, and a PUT
            // to a CID-named mxc stays a conflict). Same mxc, no new reference; the caller's
            // objects repair lost content or are released.
            Some(record @ MediaRecord { state: MediaState::Ready { cid, .. }, uploader, .. })
                if *cid == content.cid && (is_sync || (uploader == u.user_id && media_id != cid_string)) =>
            {
                let attached = match self.attach(content, u.lost_key, now_ms, 0)? {
                    Ok(a) => a,
                    Err(e) => return Ok(Err(e)),
                };
                return Ok(Ok(self.outcome(record.clone(), attached)?));
            }
            Some(MediaRecord { state: MediaState::Ready { .. }, .. }) => {
                return Ok(Err(CommandError::AlreadyExists));
            }
            Some(MediaRecord { state: MediaState::Pending { .. }, .. }) if is_sync => {
                return Ok(Err(CommandError::AlreadyExists));
            }
            Some(MediaRecord { state: MediaState::Pending { expires_at_ms }, uploader, created_at_ms, .. }) => {
                if uploader != u.user_id {
                    return Ok(Err(CommandError::PermissionDenied));
                }
                if *expires_at_ms <= now_ms {
                    return Ok(Err(CommandError::NotFound));
                }
                *created_at_ms
            }
            None if is_sync => now_ms,
            None => return Ok(Err(CommandError::NotFound)),
        };
        let attached = match self.attach(content, u.lost_key, now_ms, 1)? {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        if !is_sync {
            self.remove_pending(u.user_id, u.server_name, media_id)?;
        }
        let media = MediaRecord {
            key: MediaKey::new(u.server_name, media_id),
            uploader: u.user_id.to_owned(),
            created_at_ms,
            state: MediaState::Ready {
                cid: content.cid,
                content_type: u.content_type.to_owned(),
                filename: u.filename.map(str::to_owned),
                uploaded_at_ms: now_ms,
            },
        };
        self.put_media(&media)?;
        self.changed.push(Changed::Ready(media.key.clone()));
        Ok(Ok(self.outcome(media, attached)?))
    }

    fn commit_thumbnail(
        &mut self,
        made: ThumbnailRecord,
        content: &ContentRecord,
        lost_key: Option<&str>,
        now_ms: u64,
    ) -> Result<Result<ThumbnailOutcome, CommandError>, StorageError> {
        let spec = made.spec;
        let sides_ok =
            |w: u32, h: u32| (1..=ThumbnailSpec::MAX_SIDE).contains(&w) && (1..=ThumbnailSpec::MAX_SIDE).contains(&h);
        if !sides_ok(spec.width, spec.height) || !sides_ok(made.width, made.height) {
            return Ok(Err(CommandError::InvalidArgument("thumbnail size out of range".into())));
        }
        if made.content_type.is_empty() || content.blob_key.is_empty() {
            return Ok(Err(CommandError::InvalidArgument("empty content type or blob key".into())));
        }
        // Thumbnails are of stored content only.
        if self.get_content(&made.source)?.is_none() {
            return Ok(Err(CommandError::NotFound));
        }
        let (source, spec_key) = (made.source.to_bytes(), spec.key());
        let recorded: Option<ThumbnailRecord> = self
            .thumbnails
            .get((source.as_slice(), spec_key.as_str()))?
            .map(|v| decode("thumbnails", v.value()))
            .transpose()?;
        let (record, attached) = match recorded {
            // The same thumbnail again (a retry, or another edge made the same bytes): no new
            // reference; the caller's objects repair lost content or are released.
            Some(r) if r.cid == made.cid => match self.attach(content, lost_key, now_ms, 0)? {
                Ok(a) => (r, a),
                Err(e) => return Ok(Err(e)),
            },
            Some(r) => {
                let current = self.get_content(&r.cid)?;
                match current {
                    // Another edge's thumbnail of the same spec, still stored: it stays. The
                    // caller's objects are released, unless they hold content already (a
                    // retried replacement that was itself replaced): then they are not the
                    // caller's to delete.
                    Some(c) if !c.lost && lost_key != Some(c.blob_key.as_str()) => {
                        if self.blob_keys.get(content.blob_key.as_str())?.is_some() {
                            (r, Attached::Ours(c))
                        } else {
                            self.release(content)?;
                            (r, Attached::Duplicate(c))
                        }
                    }
                    // The recorded one's bytes are lost: the caller's (other) bytes replace it.
                    lost => {
                        let attached = match self.attach(content, None, now_ms, 1)? {
                            Ok(a) => a,
                            Err(e) => return Ok(Err(e)),
                        };
                        if let Some(mut old) = lost {
                            old.refcount = old.refcount.saturating_sub(1);
                            self.put_content(&old)?;
                        }
                        self.put_thumbnail(&made)?;
                        (made, attached)
                    }
                }
            }
            None => {
                let attached = match self.attach(content, lost_key, now_ms, 1)? {
                    Ok(a) => a,
                    Err(e) => return Ok(Err(e)),
                };
                self.put_thumbnail(&made)?;
                (made, attached)
            }
        };
        let generation = self.generations()?.generation;
        let (content, deduplicated) = match attached {
            Attached::Ours(c) => (c, false),
            Attached::Duplicate(c) => (c, true),
        };
        Ok(Ok(ThumbnailOutcome { thumbnail: record, content, deduplicated, generation }))
    }

    fn limited(&mut self, quota: &Quota, user: &str, tenant: &str, command: &Command) -> Result<Applied, StorageError> {
        let (now_ms, charge) = match command {
            Command::CommitUpload { server_name, user_id, .. }
            | Command::CreatePending { media: MediaKey { server_name, .. }, user_id, .. }
                if server_name != tenant || user_id != user =>
            {
                return Ok(Err(CommandError::InvalidArgument(
                    "a quota is the user's and the server name's of its command".into(),
                )));
            }
            Command::CommitUpload { server_name, media_id, now_ms, content, .. } => {
                // Only a commit that makes a new media record is counted (and can be refused).
                let id = media_id.clone().unwrap_or_else(|| content.cid.to_string());
                let ready = matches!(
                    self.get_media(server_name, &id)?,
                    Some(MediaRecord { state: MediaState::Ready { .. }, .. })
                );
                (*now_ms, (!ready).then_some(content.size))
            }
            Command::CreatePending { now_ms, .. } => (*now_ms, None),
            _ => return Ok(Err(CommandError::InvalidArgument("only uploads and reservations take a quota".into()))),
        };
        let now = self.clock(now_ms)?;
        let period = quota.period_ms;
        let window = now / period.max(1);
        self.prune_usage(now)?;
        let (u, t) = (
            self.window_usage(QuotaScope::User, user, window, period)?,
            self.window_usage(QuotaScope::Tenant, tenant, window, period)?,
        );
        // An upload must fit; a reservation is refused once a quota is used up.
        let (bytes, files) = charge.map_or((0, 0), |size| (size, 1));
        let over = |used: Usage, max_bytes: u64, max_files: u64| match charge {
            Some(_) => {
                (max_bytes > 0 && used.bytes.saturating_add(bytes) > max_bytes)
                    || (max_files > 0 && used.files.saturating_add(files) > max_files)
            }
            None if matches!(command, Command::CreatePending { .. }) => {
                (max_bytes > 0 && used.bytes >= max_bytes) || (max_files > 0 && used.files >= max_files)
            }
            None => false,
        };
        if over(u, quota.user_bytes, quota.user_files) {
            return Ok(Err(CommandError::QuotaExceeded { scope: QuotaScope::User }));
        }
        if over(t, quota.tenant_bytes, quota.tenant_files) {
            return Ok(Err(CommandError::QuotaExceeded { scope: QuotaScope::Tenant }));
        }
        let out = self.apply(command)?;
        if out.is_ok() && charge.is_some() {
            for (scope, who, used) in [(QuotaScope::User, user, u), (QuotaScope::Tenant, tenant, t)] {
                let next =
                    Usage { window, bytes: used.bytes.saturating_add(bytes), files: used.files.saturating_add(files) };
                self.usage.insert(usage_key(scope, who, window, period).as_str(), encode(&next)?.as_slice())?;
            }
        }
        Ok(out)
    }

    fn window_usage(&self, scope: QuotaScope, who: &str, window: u64, period: u64) -> Result<Usage, StorageError> {
        let key = usage_key(scope, who, window, period);
        let found = self.usage.get(key.as_str())?.map(|v| decode("usage", v.value())).transpose()?;
        Ok(in_window(found, window))
    }

    /// Removes up to [`USAGE_PRUNE_BATCH`] usage rows of windows over by `now` (those that
    /// ended first, first), and as many of the form before windows were part of the key
    /// (`u:…`, `t:…`, which sort after every hex digit).
    fn prune_usage(&mut self, now: u64) -> Result<(), StorageError> {
        // Every key of a window that ended at or before `now` sorts below this.
        let over = format!("{:016x}", now.saturating_add(1));
        let mut stale = Vec::new();
        for entry in self.usage.range(..over.as_str())?.take(USAGE_PRUNE_BATCH) {
            stale.push(entry?.0.value().to_owned());
        }
        for entry in self.usage.range("g"..)?.take(USAGE_PRUNE_BATCH) {
            stale.push(entry?.0.value().to_owned());
        }
        for key in stale {
            self.usage.remove(key.as_str())?;
        }
        Ok(())
    }

    fn put_thumbnail(&mut self, t: &ThumbnailRecord) -> Result<(), StorageError> {
        let source = t.source.to_bytes();
        self.thumbnails.insert((source.as_slice(), t.spec.key().as_str()), encode(t)?.as_slice())?;
        Ok(())
    }

    fn outcome(&mut self, media: MediaRecord, attached: Attached) -> Result<CommitOutcome, StorageError> {
        let generation = self.generations()?.generation;
        Ok(match attached {
            Attached::Ours(content) => CommitOutcome { media, content, deduplicated: false, generation },
            Attached::Duplicate(content) => CommitOutcome { media, content, deduplicated: true, generation },
        })
    }

    /// Attaches an upload's objects to the content record of its CID, adding `add_refs`
    /// references. Checks everything before writing anything.
    fn attach(
        &mut self,
        ours: &ContentRecord,
        lost_key: Option<&str>,
        now_ms: u64,
        add_refs: u64,
    ) -> Result<Result<Attached, CommandError>, StorageError> {
        let stored = self.get_content(&ours.cid)?;
        let repairs = |s: &ContentRecord| s.lost || lost_key == Some(s.blob_key.as_str());
        let record = match stored {
            // A retry of the commit that stored these very objects.
            Some(mut s) if s.blob_key == ours.blob_key => {
                s.refcount += add_refs;
                self.put_content(&s)?;
                return Ok(Ok(Attached::Ours(s)));
            }
            Some(mut s) if !repairs(&s) => {
                s.refcount += add_refs;
                self.put_content(&s)?;
                self.release(ours)?;
                return Ok(Ok(Attached::Duplicate(s)));
            }
            // Lost (reported, or found missing by this caller): these objects replace it.
            // Released objects never come back (their owner may have deleted them): a caller
            // repairing after a duplicate answer stores fresh copies first.
            Some(s) => {
                if let Err(e) = self.check_new_objects(ours)? {
                    return Ok(Err(e));
                }
                self.unregister(&s)?;
                self.changed.push(Changed::Content(s.cid));
                ContentRecord {
                    refcount: s.refcount + add_refs,
                    created_at_ms: s.created_at_ms,
                    lost: false,
                    ..ours.clone()
                }
            }
            None => {
                if let Err(e) = self.check_new_objects(ours)? {
                    return Ok(Err(e));
                }
                ContentRecord { refcount: add_refs.max(1), created_at_ms: now_ms, lost: false, ..ours.clone() }
            }
        };
        self.register(&record)?;
        self.put_content(&record)?;
        Ok(Ok(Attached::Ours(record)))
    }

    /// Whether a content record may reference `c`'s objects: well-formed keys of unsealed,
    /// issued generations, never released, not referenced by other content.
    fn check_new_objects(&mut self, c: &ContentRecord) -> Result<Result<(), CommandError>, StorageError> {
        let g = self.generations()?;
        for key in c.object_keys() {
            let Some(generation) = blob_key::generation(key) else {
                return Ok(Err(CommandError::InvalidArgument(format!("malformed blob key {key:?}"))));
            };
            // A generation not issued yet (an edge that knew a cluster restored from an older
            // backup) would escape sealing: such objects are stored again under the current one.
            let unissued = generation > g.generation;
            if generation <= g.sealed || unissued || self.tombstones.get(key)?.is_some() {
                return Ok(Err(CommandError::Reclaimed { generation: g.generation }));
            }
            if self.blob_keys.get(key)?.is_some() {
                return Ok(Err(CommandError::InvalidArgument(format!("blob key {key:?} already holds other content"))));
            }
        }
        Ok(Ok(()))
    }

    fn register(&mut self, c: &ContentRecord) -> Result<(), StorageError> {
        let cid = c.cid.to_bytes();
        for key in c.object_keys() {
            self.blob_keys.insert(key, cid.as_slice())?;
            self.tombstones.remove(key)?;
        }
        Ok(())
    }

    fn unregister(&mut self, c: &ContentRecord) -> Result<(), StorageError> {
        for key in c.object_keys() {
            self.blob_keys.remove(key)?;
        }
        Ok(())
    }

    /// Makes sure no commit will ever reference `c`'s objects, so their owner may delete them.
    /// Keys of sealed generations are refused anyway and need no tombstone.
    fn release(&mut self, c: &ContentRecord) -> Result<(), StorageError> {
        let g = self.generations()?;
        for key in c.object_keys() {
            // Keys of sealed or unissued generations are refused anyway: no tombstone needed.
            let open = blob_key::generation(key).is_some_and(|k| k > g.sealed && k <= g.generation);
            if open && self.blob_keys.get(key)?.is_none() {
                self.tombstones.insert(key, ())?;
            }
        }
        Ok(())
    }

    fn put_content(&mut self, c: &ContentRecord) -> Result<(), StorageError> {
        self.content.insert(c.cid.to_bytes().as_slice(), encode(c)?.as_slice())?;
        Ok(())
    }

    fn get_content(&self, cid: &Cid) -> Result<Option<ContentRecord>, StorageError> {
        let found = self.content.get(cid.to_bytes().as_slice())?;
        found.map(|v| decode("content", v.value())).transpose()
    }

    fn index_blocks(&mut self, root: &Cid, blocks: &[Cid]) -> Result<Applied, StorageError> {
        if blocks.len() > crate::command::MAX_BLOCKS_PER_INDEX {
            return Ok(Err(CommandError::InvalidArgument(format!(
                "{} blocks in one index command (at most {})",
                blocks.len(),
                crate::command::MAX_BLOCKS_PER_INDEX
            ))));
        }
        if self.get_content(root)?.is_none() {
            return Ok(Err(CommandError::NotFound));
        }
        let root = root.to_bytes();
        let mut added = 0;
        for block in blocks {
            let block = block.to_bytes();
            if block != root && self.blocks.insert((block.as_slice(), root.as_slice()), ())?.is_none() {
                added += 1;
            }
        }
        Ok(Ok(CommandOutput::Indexed { added }))
    }

    fn report_lost(&mut self, cid: &Cid, blob_key: &str) -> Result<Applied, StorageError> {
        let marked = match self.get_content(cid)? {
            Some(mut c) if c.blob_key == blob_key && !c.lost => {
                c.lost = true;
                self.put_content(&c)?;
                self.changed.push(Changed::Content(c.cid));
                true
            }
            _ => false,
        };
        Ok(Ok(CommandOutput::Lost { marked }))
    }

    /// Removes up to `limit` reservations that expired by `now_ms`, read from the expiry index.
    fn expire(&mut self, now_ms: u64, limit: u32) -> Result<Applied, StorageError> {
        let mut expired = Vec::new();
        for entry in self.pending_by_expiry.iter()? {
            if expired.len() >= limit as usize {
                break;
            }
            let (k, user) = entry?;
            let (at, server, media) = k.value();
            if at > now_ms {
                break;
            }
            expired.push((at, server.to_owned(), media.to_owned(), user.value().to_owned()));
        }
        for (at, server, media, user) in &expired {
            self.pending_by_expiry.remove((*at, server.as_str(), media.as_str()))?;
            self.pending.remove((user.as_str(), server.as_str(), media.as_str()))?;
            // Only a reservation still waiting for content goes; a filled one is Ready.
            if let Some(MediaRecord { state: MediaState::Pending { .. }, .. }) = self.get_media(server, media)? {
                self.media.remove((server.as_str(), media.as_str()))?;
            }
        }
        Ok(Ok(CommandOutput::Expired { removed: expired.len() as u64 }))
    }

    /// Advances the reclaim generation (at most once per `min_interval_ms` of leader time) and
    /// seals the generation two behind it: objects of a sealed generation can no longer be
    /// committed, so the sweeper may delete those nobody references. An upload has at least
    /// one whole interval to commit before its generation is sealed; a slower one is refused
    /// and stores its bytes again.
    fn begin_sweep(&mut self, now_ms: u64, min_interval_ms: u64) -> Result<Applied, StorageError> {
        let mut g = self.generations()?;
        let last = self.meta_value(ADVANCED_AT)?;
        if last.is_none_or(|at| now_ms.saturating_sub(at) >= min_interval_ms) {
            g.generation += 1;
            g.sealed = g.sealed.max(g.generation.saturating_sub(2));
            self.meta.insert(GENERATION, g.generation)?;
            self.meta.insert(SEALED, g.sealed)?;
            self.meta.insert(ADVANCED_AT, now_ms)?;
            self.generations = Some(g);
            // Released keys of sealed generations are refused by the seal itself.
            let end = blob_key::after_generation(g.sealed);
            self.tombstones.retain_in::<&str, _>(..end.as_str(), |_, _| false)?;
        }
        Ok(Ok(CommandOutput::Sweep(g)))
    }
}

/// The reclaim generations and store identity as recorded in a `META` table (read or write).
fn generations_in(meta: &impl ReadableTable<&'static str, u64>) -> Result<Generations, StorageError> {
    let get = |k: &str| -> Result<Option<u64>, StorageError> { Ok(meta.get(k)?.map(|v| v.value())) };
    Ok(Generations {
        generation: get(GENERATION)?.unwrap_or(1),
        sealed: get(SEALED)?.unwrap_or(0),
        store_id: get(STORE_ID)?.unwrap_or(0),
    })
}

/// The fields of a `CommitUpload`.
struct Upload<'a> {
    server_name: &'a str,
    media_id: Option<&'a str>,
    user_id: &'a str,
    content: &'a ContentRecord,
    content_type: &'a str,
    filename: Option<&'a str>,
    lost_key: Option<&'a str>,
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
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
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
    Tombstone {
        key: String,
    },
    Meta {
        key: String,
        value: u64,
    },
    /// Trailer: the number of records before it (detects truncation).
    End {
        records: u64,
    },
    /// Written before `Meta` (after `Tombstone`); last here because postcard numbers variants
    /// by position and earlier versions' snapshots must still read.
    Thumbnail {
        source: Vec<u8>,
        spec: String,
        value: Vec<u8>,
    },
    /// Written after `Thumbnail`, before `Meta`.
    Usage {
        key: String,
        value: Vec<u8>,
    },
    /// Written after `Usage`, before `Meta`.
    Block {
        block: Vec<u8>,
        root: Vec<u8>,
    },
}

/// What [`StateMachine::export`] wrote.
#[derive(Debug)]
pub struct Exported {
    /// Records before the trailer.
    pub records: u64,
    /// The extras asked for, as of the exported state.
    pub extras: Vec<Option<Vec<u8>>>,
    /// The state digest of what was exported (as [`StateMachine::digest`] gives it), if asked.
    pub digest: Option<[u8; 32]>,
}

/// A stored usage row as of `window`: a row of an earlier window counts nothing.
fn in_window(stored: Option<Usage>, window: u64) -> Usage {
    stored.filter(|u| u.window == window).unwrap_or(Usage { window, ..Usage::default() })
}

fn usage_key(scope: QuotaScope, who: &str, window: u64, period_ms: u64) -> String {
    let period = period_ms.max(1);
    let end = window.saturating_add(1).saturating_mul(period);
    match scope {
        QuotaScope::User => format!("{end:016x}:{period:x}:u:{who}"),
        QuotaScope::Tenant => format!("{end:016x}:{period:x}:t:{who}"),
    }
}

fn io_err(e: std::io::Error) -> StorageError {
    StorageError::Database(format!("snapshot I/O: {e}"))
}

fn snapshot_err(detail: String) -> StorageError {
    StorageError::Corrupt { table: "snapshot", detail }
}

mod snapshot_format;

#[cfg(test)]
mod tests;
