//! The hot cache: verified file blocks in memory, weighted by bytes.
//!
//! Keys are `(CID of the file, block number)`: block `i` is bytes `[i*chunk, (i+1)*chunk)`,
//! so hot ranges of big files stay in memory without caching whole files. Many concurrent
//! misses of one block cause one store read (moka's `try_get_with` is single-flight); the
//! read has a deadline. Every block is checked against its sha2-256 (from the CID for a
//! one-block file, from the block index otherwise) before it is cached or served: a corrupt
//! object in the store becomes an error, never bad bytes on the wire.
//!
//! Block indexes of large files are cached alongside, in a smaller cache of their own.
//!
//! A long read goes ahead of its reader ([`BlockCache::read_ahead`]): the next few blocks are
//! read from the store at once, each in a task of its own (so their hashing spreads over the
//! runtime's workers), each still through the cache's single flight; the reader takes them in
//! order. A store answers one ranged read in about a round trip, so a cold read of a large
//! file is only as fast as a plain GET of the object when several are in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cid::Cid;
use futures::{Stream, StreamExt};
use moka::future::Cache;
use sha2::{Digest, Sha256};

use crate::block_index::BlockIndex;
use crate::metrics::{Metrics, ResultLabels};
use crate::store::{BlobStore, StoreError};
use mxcas_cas::sha256_digest;
use mxcas_meta::ContentRecord;

#[derive(Debug, thiserror::Error, Clone)]
pub enum BlockError {
    #[error("blob store: {0}")]
    Store(String),
    /// The object the content record names does not exist: data loss (or a record that has
    /// since been repaired onto another object).
    #[error("stored object {key} is missing")]
    Missing { key: String },
    #[error("stored block {block} of {cid} does not match its hash: the blob store returned corrupt data")]
    Corrupt { cid: String, block: u64 },
    #[error("block {block} is past the end of {cid}")]
    OutOfRange { cid: String, block: u64 },
}

impl From<StoreError> for BlockError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(key) => BlockError::Missing { key },
            e => BlockError::Store(e.to_string()),
        }
    }
}

impl BlockError {
    /// The stored bytes are gone or wrong (not a transient failure).
    pub fn is_data_loss(&self) -> bool {
        matches!(self, BlockError::Missing { .. } | BlockError::Corrupt { .. })
    }
}

#[derive(Clone)]
pub struct BlockCache {
    blocks: Cache<(Cid, u64), Bytes>,
    indexes: Cache<Cid, Arc<BlockIndex>>,
    store: BlobStore,
    metrics: Arc<Metrics>,
    read_timeout: Duration,
    /// Blocks a long read has in flight or waiting ahead of its reader.
    read_ahead: usize,
}

impl BlockCache {
    pub fn new(
        capacity_bytes: u64,
        read_timeout: Duration,
        read_ahead: usize,
        store: BlobStore,
        metrics: Arc<Metrics>,
    ) -> Self {
        let blocks = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_k: &(Cid, u64), v: &Bytes| u32::try_from(v.len() + 64).unwrap_or(u32::MAX))
            .build();
        let indexes = Cache::builder()
            .max_capacity((capacity_bytes / 16).max(1 << 20))
            .weigher(|_k: &Cid, v: &Arc<BlockIndex>| {
                let n = 64 + 32 * v.leaves.len() + v.nodes.iter().map(|(_, b)| b.len() + 48).sum::<usize>();
                u32::try_from(n).unwrap_or(u32::MAX)
            })
            .build();
        Self { blocks, indexes, store, metrics, read_timeout, read_ahead: read_ahead.max(1) }
    }

    /// Number of blocks of `content`.
    pub fn block_count(content: &ContentRecord) -> u64 {
        content.size.div_ceil(content.chunk_size as u64).max(1)
    }

    /// Byte range of block `i` of `content`.
    pub fn block_range(content: &ContentRecord, i: u64) -> std::ops::Range<u64> {
        let chunk = content.chunk_size as u64;
        let start = i * chunk;
        start..(start + chunk).min(content.size)
    }

    /// Block `i` of `content`, verified, from memory or (once for all concurrent callers) the
    /// store.
    pub async fn block(&self, content: &ContentRecord, i: u64) -> Result<Bytes, BlockError> {
        let key = (content.cid, i);
        if let Some(bytes) = self.blocks.get(&key).await {
            self.count("hit");
            return Ok(bytes);
        }
        let ran = Arc::new(AtomicBool::new(false));
        let loader = {
            let ran = ran.clone();
            let this = self.clone();
            let content = content.clone();
            async move {
                ran.store(true, Ordering::Relaxed);
                match tokio::time::timeout(this.read_timeout, this.load(&content, i)).await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Timeout(this.read_timeout).into()),
                }
            }
        };
        let result = self.blocks.try_get_with(key, loader).await;
        let mine = ran.load(Ordering::Relaxed);
        match result {
            Ok(bytes) => {
                self.count(if mine { "miss" } else { "coalesced" });
                self.metrics.cache_bytes.set(self.blocks.weighted_size() as i64);
                Ok(bytes)
            }
            Err(e) => {
                self.count("error");
                Err((*e).clone())
            }
        }
    }

    /// Blocks `blocks` of `content`, verified, in order, read ahead of the consumer: at most
    /// `read_ahead` blocks are being read or held for it at a time, so a download's memory is
    /// bounded however slowly its client reads. A block whose read fails comes as its error,
    /// and ends the stream (a body is cut there, never left with a gap).
    pub fn read_ahead(
        &self,
        content: &ContentRecord,
        blocks: std::ops::Range<u64>,
    ) -> impl Stream<Item = Result<Bytes, BlockError>> + Send + 'static {
        let (this, content) = (self.clone(), content.clone());
        let read_ahead = self.read_ahead;
        futures::stream::iter(blocks)
            .map(move |i| {
                let (this, content) = (this.clone(), content.clone());
                // A task per block: reads and hashing proceed on every worker, and a block
                // already being read finishes into the cache even if the reader goes away.
                let task = tokio::spawn(async move { this.block(&content, i).await });
                async move { task.await.unwrap_or_else(|e| Err(BlockError::Store(format!("block read task: {e}")))) }
            })
            .buffered(read_ahead)
            .scan(false, |failed, block| {
                let end = std::mem::replace(failed, block.is_err());
                std::future::ready((!end).then_some(block))
            })
    }

    fn count(&self, result: &'static str) {
        self.metrics.cache_requests.get_or_create(&ResultLabels { result }).inc();
    }

    async fn load(&self, content: &ContentRecord, i: u64) -> Result<Bytes, BlockError> {
        let cid_str = || content.cid.to_string();
        if i >= Self::block_count(content) {
            return Err(BlockError::OutOfRange { cid: cid_str(), block: i });
        }
        let expected = match &content.index_key {
            None => sha256_digest(&content.cid),
            Some(index_key) => {
                let index = self.index(content, index_key).await?;
                index.leaves.get(i as usize).copied()
            }
        };
        let range = Self::block_range(content, i);
        let bytes = match self.store.get_range(&content.blob_key, range.clone()).await {
            Ok(b) => b,
            // A range past the end (a truncated object) is an error of its own on every
            // backend: tell it from a transient failure by the object's size.
            Err(StoreError::Backend(e)) => {
                return match self.store.size(&content.blob_key).await {
                    Ok(Some(size)) if size != content.size => {
                        tracing::error!(cid = %content.cid, blob = %content.blob_key, size, want = content.size, "stored object is truncated");
                        Err(BlockError::Corrupt { cid: cid_str(), block: i })
                    }
                    Ok(None) => Err(BlockError::Missing { key: content.blob_key.clone() }),
                    _ => Err(StoreError::Backend(e).into()),
                };
            }
            Err(e) => return Err(e.into()),
        };
        let verified = bytes.len() as u64 == range.end - range.start
            && expected.is_some_and(|want| {
                // Hashing a 1 MiB block takes under a millisecond; off the runtime anyway.
                let b = bytes.clone();
                tokio::task::block_in_place(move || <[u8; 32]>::from(Sha256::digest(&b)) == want)
            });
        if !verified {
            tracing::error!(cid = %content.cid, block = i, blob = %content.blob_key, "stored block fails verification");
            return Err(BlockError::Corrupt { cid: cid_str(), block: i });
        }
        Ok(bytes)
    }

    pub async fn index(&self, content: &ContentRecord, index_key: &str) -> Result<Arc<BlockIndex>, BlockError> {
        let store = self.store.clone();
        let key = index_key.to_owned();
        let (cid, size, chunk_size) = (content.cid, content.size, content.chunk_size);
        self.indexes
            .try_get_with(content.cid, async move {
                let bytes = store.get(&key).await?;
                let index = BlockIndex::decode(bytes).map_err(|e| {
                    tracing::error!(%cid, error = %e, "stored block index is malformed");
                    BlockError::Corrupt { cid: cid.to_string(), block: u64::MAX }
                })?;
                if let Err(e) = index.verify(&cid, size, chunk_size) {
                    tracing::error!(%cid, error = %e, "stored block index fails verification");
                    return Err(BlockError::Corrupt { cid: cid.to_string(), block: u64::MAX });
                }
                Ok(Arc::new(index))
            })
            .await
            .map_err(|e| (*e).clone())
    }
}
