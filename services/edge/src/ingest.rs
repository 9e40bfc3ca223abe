//! Ingest: an upload body streamed into the blob store while its CID is computed.
//!
//! The body is read once. Each piece goes to the store and into a 1 MiB leaf buffer; every
//! full leaf is hashed on the blocking pool as a short task (under a millisecond), so a slow
//! client never holds a thread, and the UnixFS DAG (see [`mxcas_cas`]) grows from the leaf
//! digests. The first [`PART_SIZE`] bytes are buffered and, if the body ends there, stored
//! with one `put`; otherwise a multipart upload starts and the rest streams through it. Memory
//! per upload is bounded (one part, one leaf, parts in flight), whatever the file size. Any
//! failure (client gone or idle too long, body too large, store error) aborts the multipart
//! upload and deletes what was written: nothing stays behind.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use object_store::WriteMultipart;
use sha2::{Digest, Sha256};

use crate::block_index::BlockIndex;
use crate::store::{BlobStore, PART_SIZE, StoreError};
use cid::Cid;
use mxcas_cas::{CHUNK_SIZE, Dag, DagBuilder, RAW, cid_from_digest};
use mxcas_meta::ContentRecord;
use mxcas_meta::model::blob_key;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The client sent more than the limit.
    #[error("upload larger than {limit} bytes")]
    TooLarge { limit: u64 },
    /// The body ended early or could not be read (client's fault or a dropped connection).
    #[error("request body: {0}")]
    Body(String),
    /// The client sent nothing for too long.
    #[error("request body idle for {0:?}")]
    Idle(Duration),
    /// The client sent too slowly on average (bytes per second, the minimum).
    #[error("request body slower than {0} bytes/s")]
    TooSlow(u64),
    /// The blob store failed (retryable).
    #[error("blob store: {0}")]
    Store(String),
    #[error("hasher: {0}")]
    Hasher(String),
}

impl From<StoreError> for IngestError {
    fn from(e: StoreError) -> Self {
        IngestError::Store(e.to_string())
    }
}

impl From<object_store::Error> for IngestError {
    fn from(e: object_store::Error) -> Self {
        IngestError::Store(e.to_string())
    }
}

/// A stored upload, not yet referenced by the metadata service.
#[derive(Debug)]
pub struct Ingested {
    /// The content record to commit (refcount 0: the metadata service counts references).
    pub content: ContentRecord,
    /// The first [`crate::sniff::HEAD`] bytes (all of a smaller upload): what decides its type.
    pub head: Vec<u8>,
    /// The CIDs of the DAG's blocks other than its root (leaves once each, then inner nodes),
    /// for the gateway's block index; empty for a one-block file.
    pub blocks: Vec<Cid>,
}

/// How fast a client must send: something every `idle_timeout`, and at least `min_rate`
/// bytes per second over each window of `idle_timeout` (0: no minimum). Together they bound
/// how long a slot can be held by a client that trickles, also after a fast start.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub idle_timeout: Duration,
    pub min_rate: u64,
}

/// The current window of a [`Pace`]: when it started and what arrived in it. Time the server
/// itself spends (storing, hashing) is not the client's and is left out.
struct Window {
    pace: Pace,
    started: tokio::time::Instant,
    bytes: u64,
}

impl Window {
    fn new(pace: Pace) -> Self {
        Self { pace, started: tokio::time::Instant::now(), bytes: 0 }
    }

    /// Counts `n` bytes received at `now`; false when the window that just closed was too slow.
    fn received(&mut self, n: u64, now: tokio::time::Instant) -> bool {
        self.bytes += n;
        let elapsed = now.saturating_duration_since(self.started);
        if self.pace.min_rate == 0 || elapsed < self.pace.idle_timeout {
            return true;
        }
        let fast_enough = self.bytes as f64 >= self.pace.min_rate as f64 * elapsed.as_secs_f64();
        self.started = now;
        self.bytes = 0;
        fast_enough
    }

    /// The server spent `d` on its own work: not counted against the client.
    fn exclude(&mut self, d: Duration) {
        self.started += d;
    }
}

/// Streams `body` into `store`; returns once the bytes (and block index) are durable.
pub async fn ingest<S, E>(
    store: &BlobStore,
    body: S,
    max_size: u64,
    pace: Pace,
    now_ms: u64,
    generation: u64,
) -> Result<Ingested, IngestError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let blob_key = BlobStore::new_blob_key(generation);
    let mut sink = Sink { store, key: &blob_key, buffer: BytesMut::new(), multipart: None };
    let (dag, head) = match feed(body, max_size, pace, &mut sink).await {
        Ok(fed) => fed,
        Err(e) => {
            sink.abort().await;
            return Err(e);
        }
    };
    if let Err(e) = sink.finish().await {
        store.delete_later(vec![blob_key]);
        return Err(e);
    }
    let index_key = match store_index(store, &blob_key, &dag).await {
        Ok(k) => k,
        Err(e) => {
            store.delete_later(vec![blob_key.clone(), blob_key::index_of(&blob_key)]);
            return Err(e);
        }
    };
    let blocks = blocks_of(&dag);
    Ok(Ingested {
        blocks,
        content: ContentRecord {
            cid: dag.root,
            size: dag.size,
            chunk_size: CHUNK_SIZE as u32,
            blob_key,
            index_key,
            refcount: 0,
            created_at_ms: now_ms,
            lost: false,
        },
        head,
    })
}

/// Every block of `dag` but its root, each once.
fn blocks_of(dag: &Dag) -> Vec<Cid> {
    if dag.leaves.len() <= 1 {
        return Vec::new();
    }
    let mut seen = std::collections::HashSet::with_capacity(dag.leaves.len());
    let leaves = dag.leaves.iter().filter(|d| seen.insert(**d)).map(|d| cid_from_digest(RAW, d));
    let nodes = dag.nodes.iter().map(|(c, _)| *c).filter(|c| *c != dag.root);
    leaves.chain(nodes).collect()
}

/// sha2-256 of one leaf, on the blocking pool (a short task, never held across I/O).
fn hash_leaf(leaf: Bytes) -> tokio::task::JoinHandle<([u8; 32], u64)> {
    tokio::task::spawn_blocking(move || (<[u8; 32]>::from(Sha256::digest(&leaf)), leaf.len() as u64))
}

/// Leaves being hashed while the body keeps streaming in; added to the DAG in file order.
struct Hashing {
    dag: DagBuilder,
    in_flight: std::collections::VecDeque<tokio::task::JoinHandle<([u8; 32], u64)>>,
}

impl Hashing {
    /// Most leaves hashed at once per upload (bounds memory to a few MiB).
    const MAX_IN_FLIGHT: usize = 2;

    async fn push(&mut self, leaf: Bytes) -> Result<(), IngestError> {
        self.in_flight.push_back(hash_leaf(leaf));
        while self.in_flight.len() > Self::MAX_IN_FLIGHT {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<(), IngestError> {
        if let Some(h) = self.in_flight.pop_front() {
            let (digest, len) = h.await.map_err(|e| IngestError::Hasher(e.to_string()))?;
            self.dag.push_leaf(digest, len);
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<Dag, IngestError> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(self.dag.finish_leaves())
    }
}

async fn feed<S, E>(mut body: S, max_size: u64, pace: Pace, sink: &mut Sink<'_>) -> Result<(Dag, Vec<u8>), IngestError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let idle_timeout = pace.idle_timeout;
    let mut window = Window::new(pace);
    let mut size = 0u64;
    let mut hashing = Hashing { dag: DagBuilder::new(), in_flight: Default::default() };
    let mut leaf = BytesMut::with_capacity(CHUNK_SIZE);
    let mut head = Vec::new();
    loop {
        let piece = match tokio::time::timeout(idle_timeout, body.next()).await {
            Err(_) => return Err(IngestError::Idle(idle_timeout)),
            Ok(None) => break,
            Ok(Some(piece)) => piece.map_err(|e| IngestError::Body(e.to_string()))?,
        };
        size += piece.len() as u64;
        if size > max_size {
            return Err(IngestError::TooLarge { limit: max_size });
        }
        if !window.received(piece.len() as u64, tokio::time::Instant::now()) {
            return Err(IngestError::TooSlow(pace.min_rate));
        }
        let working = tokio::time::Instant::now();
        if head.len() < crate::sniff::HEAD {
            let take = (crate::sniff::HEAD - head.len()).min(piece.len());
            head.extend_from_slice(&piece[..take]);
        }
        let mut rest = piece.as_ref();
        while !rest.is_empty() {
            let take = (CHUNK_SIZE - leaf.len()).min(rest.len());
            leaf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if leaf.len() == CHUNK_SIZE {
                hashing.push(leaf.split().freeze()).await?;
                leaf.reserve(CHUNK_SIZE);
            }
        }
        sink.write(piece).await?;
        window.exclude(working.elapsed());
    }
    // The last (possibly empty) leaf: an empty file is one empty raw block.
    if !leaf.is_empty() || size == 0 {
        hashing.push(leaf.freeze()).await?;
    }
    Ok((hashing.finish().await?, head))
}

async fn store_index(store: &BlobStore, blob_key: &str, dag: &Dag) -> Result<Option<String>, IngestError> {
    if dag.leaves.len() <= 1 {
        return Ok(None);
    }
    let key = blob_key::index_of(blob_key);
    store.put_new(&key, BlockIndex::from_dag(dag, CHUNK_SIZE as u32).encode()).await?;
    Ok(Some(key))
}

struct Sink<'a> {
    store: &'a BlobStore,
    key: &'a str,
    buffer: BytesMut,
    multipart: Option<WriteMultipart>,
}

impl Sink<'_> {
    async fn write(&mut self, piece: Bytes) -> Result<(), IngestError> {
        if let Some(mp) = &mut self.multipart {
            mp.wait_for_capacity(2).await?;
            mp.put(piece);
            return Ok(());
        }
        self.buffer.extend_from_slice(&piece);
        if self.buffer.len() >= PART_SIZE {
            let mut mp = self.store.start_multipart(self.key).await?;
            mp.put(std::mem::take(&mut self.buffer).freeze());
            self.multipart = Some(mp);
        }
        Ok(())
    }

    async fn finish(self) -> Result<(), IngestError> {
        match self.multipart {
            Some(mp) => {
                mp.finish().await?;
            }
            None => self.store.put_new(self.key, self.buffer.freeze()).await?,
        }
        Ok(())
    }

    async fn abort(self) {
        if let Some(mp) = self.multipart
            && let Err(e) = mp.abort().await
        {
            tracing::warn!(key = self.key, error = %e, "could not abort multipart upload");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trickle_is_too_slow_in_any_window_even_after_a_fast_start() {
        let pace = Pace { idle_timeout: Duration::from_secs(30), min_rate: 1024 };
        let t0 = tokio::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Window { pace, started: t0, bytes: 0 };
        // Anything goes within a window (a slow start, headers first).
        assert!(w.received(1, at(29)));
        // A fast first window...
        assert!(w.received(100 << 20, at(30)));
        // ...buys nothing for the next: a byte every 25 s is far below the rate.
        assert!(w.received(1, at(55)));
        assert!(!w.received(1, at(80)), "the second window was a trickle");
        // Time the server spent on its own work does not count against the client.
        let mut w = Window { pace, started: t0, bytes: 0 };
        w.exclude(Duration::from_secs(20));
        assert!(w.received(20 * 1024, at(40)), "20 KiB in the client's 20 s is fast enough");
        let mut off = Window { pace: Pace { min_rate: 0, ..pace }, started: t0, bytes: 0 };
        assert!(off.received(0, at(3600)), "0 disables the minimum");
    }
}
