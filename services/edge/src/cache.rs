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
//!
//! A miss of a long read takes the next blocks of that read with it: blocks are read from the
//! store in spans of `read_span` aligned blocks ([`BlockCache::span_of`]), cut to what the
//! read covers (a range reads only the blocks it covers), one ranged read each, split into
//! blocks, each verified and cached on its own. A span's read is itself single-flight, so
//! concurrent misses of its blocks make one store read. A block of a span that does not come
//! whole or fails its hash is read again on its own, which tells a truncated or missing object
//! from a transient failure.

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

/// The blocks of one span read, in order: each verified, or its error.
type SpanBlocks = Vec<Result<Bytes, BlockError>>;

#[derive(Clone)]
pub struct BlockCache {
    blocks: Cache<(Cid, u64), Bytes>,
    indexes: Cache<Cid, Arc<BlockIndex>>,
    store: BlobStore,
    metrics: Arc<Metrics>,
    read_timeout: Duration,
    /// Blocks a long read has in flight or waiting ahead of its reader.
    read_ahead: usize,
    /// Blocks read from the store by one ranged read.
    read_span: u64,
    /// Span reads in flight, by (file, its object, first block, end): their verified blocks (or
    /// errors). The object is in the key so that a read of a repaired record never joins a
    /// read of the lost object it replaced.
    spans: Cache<(Cid, String, u64, u64), Arc<SpanBlocks>>,
}

impl BlockCache {
    pub fn new(
        capacity_bytes: u64,
        read_timeout: Duration,
        read_ahead: usize,
        read_span: usize,
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
        // Only while a span is read: its blocks live in `blocks` once it ends.
        let spans = Cache::builder().max_capacity(4096).build();
        Self {
            blocks,
            indexes,
            store,
            metrics,
            read_timeout,
            read_ahead: read_ahead.max(1),
            // A span never reads past what a download may hold ahead of its reader.
            read_span: read_span.clamp(1, read_ahead.max(1)) as u64,
            spans,
        }
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
        self.block_of_read(content, i, i..i + 1).await
    }

    /// Block `i` of `content` for a read of blocks `read`: a miss reads, in one store request,
    /// the blocks of `i`'s span that the read covers too.
    async fn block_of_read(
        &self,
        content: &ContentRecord,
        i: u64,
        read: std::ops::Range<u64>,
    ) -> Result<Bytes, BlockError> {
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
                this.load_with_span(&content, i, read).await
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
        let read = blocks.clone();
        futures::stream::iter(blocks)
            .map(move |i| {
                let (this, content, read) = (this.clone(), content.clone(), read.clone());
                // A task per block: reads and hashing proceed on every worker, and a block
                // already being read finishes into the cache even if the reader goes away.
                let task = tokio::spawn(async move { this.block_of_read(&content, i, read).await });
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

    /// The blocks of the span that holds block `i` of `content`, within a read of `read`.
    pub fn span_of(&self, content: &ContentRecord, i: u64, read: &std::ops::Range<u64>) -> std::ops::Range<u64> {
        let start = i - i % self.read_span;
        start.max(read.start)..(start + self.read_span).min(Self::block_count(content)).min(read.end)
    }

    /// Block `i`, read with the rest of its span that `read` covers (once for all concurrent
    /// readers of that span); the span's other blocks go into the cache.
    async fn load_with_span(
        &self,
        content: &ContentRecord,
        i: u64,
        read: std::ops::Range<u64>,
    ) -> Result<Bytes, BlockError> {
        let span = self.span_of(content, i, &read);
        if span.end - span.start <= 1 || i >= span.end {
            return self.load_timed(content, i).await;
        }
        let key = (content.cid, content.blob_key.clone(), span.start, span.end);
        let (this, owned, read) = (self.clone(), content.clone(), span.clone());
        let blocks = self
            .spans
            .get_with(key.clone(), async move {
                let blocks = this.read_span(&owned, read.clone()).await;
                // Cached before the span's flight ends, so a reader of them that comes later
                // finds them rather than reading the span again.
                for (j, block) in read.zip(blocks.iter()) {
                    if let Ok(bytes) = block {
                        this.blocks.insert((owned.cid, j), bytes.clone()).await;
                    }
                }
                Arc::new(blocks)
            })
            .await;
        self.spans.invalidate(&key).await;
        blocks[(i - span.start) as usize].clone()
    }

    /// The blocks `span` of `content`, by one ranged read, each verified; a block that does
    /// not come whole or verified is read again alone (whose error then says what is wrong).
    async fn read_span(&self, content: &ContentRecord, span: std::ops::Range<u64>) -> SpanBlocks {
        let (first, last) = (Self::block_range(content, span.start), Self::block_range(content, span.end - 1));
        let whole = async {
            let expected = self.expected(content, span.clone()).await?;
            let bytes = self.store.get_range(&content.blob_key, first.start..last.end).await?;
            Ok::<_, BlockError>((expected, bytes))
        };
        let read = tokio::time::timeout(self.read_timeout, whole).await;
        // Blocks that did not come whole and verified are read again on their own, at once.
        let blocks = span.clone().map(|j| {
            let range = Self::block_range(content, j);
            let from_span = match &read {
                Ok(Ok((expected, bytes))) => {
                    let at = (range.start - first.start) as usize..(range.end - first.start) as usize;
                    let want = expected[(j - span.start) as usize];
                    // A copy per block: a cached block must not keep its whole span in memory.
                    bytes.get(at).map(Bytes::copy_from_slice).filter(|b| verified(b, want))
                }
                _ => None,
            };
            async move {
                match from_span {
                    Some(b) => Ok(b),
                    None => self.load_timed(content, j).await,
                }
            }
        });
        futures::future::join_all(blocks).await
    }

    /// The sha2-256 each block of `span` must have (`None`: no hash to check it against).
    async fn expected(
        &self,
        content: &ContentRecord,
        span: std::ops::Range<u64>,
    ) -> Result<Vec<Option<[u8; 32]>>, BlockError> {
        Ok(match &content.index_key {
            None => span.map(|_| sha256_digest(&content.cid)).collect(),
            Some(index_key) => {
                let index = self.index(content, index_key).await?;
                span.map(|j| index.leaves.get(j as usize).copied()).collect()
            }
        })
    }

    async fn load_timed(&self, content: &ContentRecord, i: u64) -> Result<Bytes, BlockError> {
        match tokio::time::timeout(self.read_timeout, self.load(content, i)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.read_timeout).into()),
        }
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
        let whole = bytes.len() as u64 == range.end - range.start;
        if !whole || !verified(&bytes, expected) {
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

/// Whether `bytes` hash to `want` (hashing a 1 MiB block takes under a millisecond; off the
/// runtime's other tasks anyway).
fn verified(bytes: &Bytes, want: Option<[u8; 32]>) -> bool {
    want.is_some_and(|want| tokio::task::block_in_place(|| <[u8; 32]>::from(Sha256::digest(bytes)) == want))
}
