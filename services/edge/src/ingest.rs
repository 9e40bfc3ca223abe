//! Ingest: an upload body streamed into the blob store while its CID is computed.
//!
//! The body is read once. Each piece goes to a hasher on a blocking thread (the UnixFS DAG
//! builder, see [`crate::unixfs`]) and to the store: the first [`PART_SIZE`] bytes are
//! buffered and, if the body ends there, stored with one `put`; otherwise a multipart upload
//! starts and the rest streams through it. Memory per upload is bounded (one part plus a few
//! pieces in flight), whatever the file size. Any failure (client gone, body too large, store
//! error) aborts the multipart upload and deletes what was written: nothing stays behind.

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use object_store::WriteMultipart;
use tokio::sync::mpsc;

use crate::block_index::BlockIndex;
use crate::store::{BlobStore, PART_SIZE, StoreError};
use crate::unixfs::{CHUNK_SIZE, Dag, DagBuilder};
use mxcas_meta::ContentRecord;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The client sent more than the limit.
    #[error("upload larger than {limit} bytes")]
    TooLarge { limit: u64 },
    /// The body ended early or could not be read (client's fault or a dropped connection).
    #[error("request body: {0}")]
    Body(String),
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
}

impl Ingested {
    /// Every object this upload wrote.
    pub fn keys(&self) -> Vec<String> {
        let mut keys = vec![self.content.blob_key.clone()];
        keys.extend(self.content.index_key.clone());
        keys
    }
}

/// Streams `body` into `store`; returns once the bytes (and block index) are durable.
pub async fn ingest<S, E>(store: &BlobStore, body: S, max_size: u64, now_ms: u64) -> Result<Ingested, IngestError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let blob_key = BlobStore::new_blob_key();
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let hasher = tokio::task::spawn_blocking(move || {
        let mut builder = DagBuilder::new();
        while let Some(piece) = rx.blocking_recv() {
            builder.update(&piece);
        }
        builder.finish()
    });

    let mut sink = Sink { store, key: &blob_key, buffer: BytesMut::new(), multipart: None };
    let fed = feed(body, max_size, &tx, &mut sink).await;
    drop(tx);
    let dag = hasher.await.map_err(|e| IngestError::Hasher(e.to_string()));
    let (size, dag) = match (fed, dag) {
        (Ok(size), Ok(dag)) => (size, dag),
        (Err(e), _) | (Ok(_), Err(e)) => {
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
            store.delete_later(vec![blob_key.clone(), format!("{blob_key}.idx")]);
            return Err(e);
        }
    };
    debug_assert_eq!(size, dag.size);
    Ok(Ingested {
        content: ContentRecord {
            cid: dag.root,
            size: dag.size,
            chunk_size: CHUNK_SIZE as u32,
            blob_key,
            index_key,
            refcount: 0,
            created_at_ms: now_ms,
        },
    })
}

async fn feed<S, E>(
    mut body: S,
    max_size: u64,
    tx: &mpsc::Sender<Bytes>,
    sink: &mut Sink<'_>,
) -> Result<u64, IngestError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut size = 0u64;
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| IngestError::Body(e.to_string()))?;
        size += piece.len() as u64;
        if size > max_size {
            return Err(IngestError::TooLarge { limit: max_size });
        }
        tx.send(piece.clone()).await.map_err(|_| IngestError::Hasher("hasher stopped".into()))?;
        sink.write(piece).await?;
    }
    Ok(size)
}

async fn store_index(store: &BlobStore, blob_key: &str, dag: &Dag) -> Result<Option<String>, IngestError> {
    if dag.leaves.len() <= 1 {
        return Ok(None);
    }
    let key = format!("{blob_key}.idx");
    store.put(&key, BlockIndex::from_dag(dag, CHUNK_SIZE as u32).encode()).await?;
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
            None => self.store.put(self.key, self.buffer.freeze()).await?,
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
