//! The blob store: where file bytes live, through `object_store` (local filesystem or any
//! S3-compatible service).
//!
//! One file is one object (`blobs/<generation>/<random>`, see `mxcas_meta::model::blob_key`),
//! named when its upload starts because the CID is only known at the end; the metadata
//! service maps CID → object key. Small uploads are one
//! `put`; larger ones stream as a multipart upload, so no upload is ever held whole in memory.
//! The local backend fsyncs files and directories before a write is reported done (a new
//! small object's directory fsync shared with concurrent ones: [`crate::local_files`]).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::Deserialize;

use crate::local_files::LocalFiles;
use crate::metrics::Metrics;

/// `[store]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// Files under a local directory (default: `<data_dir>/blobs`).
    Fs {
        /// Directory; default `<data_dir>/blobs`.
        #[serde(default)]
        path: Option<PathBuf>,
    },
    /// An S3-compatible object store.
    S3(S3Config),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// e.g. `http://127.0.0.1:8333`; empty for AWS itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Path-style requests (`endpoint/bucket/key`), which most self-hosted stores need.
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Credentials: values, or `*_file` paths to read them from. When neither is given the
    /// standard `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` environment variables are used.
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub access_key_id_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_true() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist (on a referenced key: data loss, not a transient failure).
    #[error("blob store: object {0} does not exist")]
    NotFound(String),
    #[error("blob store: {0}")]
    Backend(object_store::Error),
    #[error("blob store config: {0}")]
    Config(String),
    #[error("blob store timed out after {0:?}")]
    Timeout(Duration),
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { path, .. } => StoreError::NotFound(path),
            e => StoreError::Backend(e),
        }
    }
}

/// The object naming the blob store's identity (a random number, also recorded in the
/// metadata): an edge whose store lacks it, or holds another, is looking at the wrong bucket
/// or an unmounted directory, and must not call anything lost.
pub const STORE_ID_KEY: &str = "mxcas/store-id";

/// Threshold below which an upload is buffered and stored with one `put` (also the part size
/// of multipart uploads; S3 needs at least 5 MiB per part).
pub const PART_SIZE: usize = 8 << 20;

#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    metrics: Arc<Metrics>,
    /// The local backend's directory, where new objects are written with shared directory
    /// fsyncs and multipart staging files are found (`None` for S3).
    local_files: Option<Arc<LocalFiles>>,
}

fn secret(value: &Option<String>, file: &Option<PathBuf>, what: &str) -> Result<Option<String>, StoreError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(StoreError::Config(format!("set {what} or {what}_file, not both"))),
        (Some(v), None) => Ok(Some(v.clone())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim().to_owned()))
            .map_err(|e| StoreError::Config(format!("cannot read {what}_file {}: {e}", path.display()))),
        (None, None) => Ok(None),
    }
}

impl BlobStore {
    pub fn open(config: &StoreConfig, data_dir: &std::path::Path, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let mut local_root = None;
        let inner: Arc<dyn ObjectStore> = match config {
            StoreConfig::Fs { path } => {
                let root = path.clone().unwrap_or_else(|| data_dir.join("blobs"));
                std::fs::create_dir_all(&root)
                    .map_err(|e| StoreError::Config(format!("cannot create {}: {e}", root.display())))?;
                local_root = Some(root.clone());
                Arc::new(LocalFileSystem::new_with_prefix(&root)?.with_fsync(true).with_automatic_cleanup(false))
            }
            StoreConfig::S3(s3) => {
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_virtual_hosted_style_request(!s3.path_style);
                if let Some(endpoint) = &s3.endpoint {
                    b = b.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
                }
                if let Some(id) = secret(&s3.access_key_id, &s3.access_key_id_file, "access_key_id")? {
                    b = b.with_access_key_id(id);
                }
                if let Some(key) = secret(&s3.secret_access_key, &s3.secret_access_key_file, "secret_access_key")? {
                    b = b.with_secret_access_key(key);
                }
                Arc::new(b.build()?)
            }
        };
        let local_files = local_root.map(|root| Arc::new(LocalFiles::new(root)));
        Ok(Self { inner, metrics, local_files })
    }

    /// A fresh object key for an upload starting under reclaim generation `generation`.
    pub fn new_blob_key(generation: u64) -> String {
        mxcas_meta::model::blob_key::new(generation, &uuid::Uuid::new_v4().simple().to_string())
    }

    /// Writes `key` only if it does not exist; returns whether this call created it.
    pub async fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let opts = object_store::PutOptions { mode: object_store::PutMode::Create, ..Default::default() };
        match self.inner.put_opts(&Path::from(key), PutPayload::from_bytes(bytes), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The size of `key`, or `None` when it does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self.inner.head(&Path::from(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Copies `from` to `to` inside the store (server-side on S3: all or nothing).
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StoreError> {
        self.metrics.store_writes.inc();
        self.inner.copy(&Path::from(from), &Path::from(to)).await?;
        Ok(())
    }

    /// Staging files of the local backend (`<key>#<n>`, written by multipart uploads and
    /// hidden from `list`) under `prefix`, as `(the key they stage, the file)`. A process
    /// killed mid-upload leaves them behind; S3 has no such files (abandoned multipart
    /// uploads are reclaimed by a bucket lifecycle rule, see docs/storage.md).
    pub fn staging_files(&self, prefix: &str) -> Vec<(String, PathBuf)> {
        let Some(root) = self.local_files.as_ref().map(|f| f.root()) else { return Vec::new() };
        let mut found = Vec::new();
        let mut dirs = vec![root.join(prefix)];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(path);
                    continue;
                }
                let Ok(rel) = path.strip_prefix(root) else { continue };
                let rel = rel.to_string_lossy();
                if let Some((key, n)) = rel.rsplit_once('#')
                    && !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_digit())
                {
                    found.push((key.to_owned(), path.clone()));
                }
            }
        }
        found
    }

    /// Writes the new object `key`: a fresh key no one else writes (an upload's blob or
    /// index). Durable when this returns. On the local backend the file is created under its
    /// key directly (an existing one is an error) and concurrent writes share their directory
    /// fsyncs (see [`crate::local_files`]).
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.metrics.store_writes.inc();
        let started = std::time::Instant::now();
        let written = match self.local_files.as_ref().and_then(|files| Some((files, files.path_of(key)?))) {
            Some((files, path)) => files.write_new(path, bytes).await.map_err(|e| {
                StoreError::Backend(object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(e) })
            }),
            None => self.inner.put(&Path::from(key), PutPayload::from_bytes(bytes)).await.map(drop).map_err(Into::into),
        };
        self.metrics.store_write_seconds.observe(started.elapsed().as_secs_f64());
        written
    }

    /// Starts a multipart upload to `key`.
    pub async fn start_multipart(&self, key: &str) -> Result<WriteMultipart, StoreError> {
        self.metrics.store_writes.inc();
        let upload = self.inner.put_multipart(&Path::from(key)).await?;
        Ok(WriteMultipart::new_with_chunk_size(upload, PART_SIZE))
    }

    /// Reads `range` of `key` (counted in `mxcas_edge_store_reads_total`).
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.metrics.store_reads.inc();
        let bytes = self.inner.get_range(&Path::from(key), range).await?;
        self.metrics.store_read_bytes.inc_by(bytes.len() as u64);
        Ok(bytes)
    }

    /// Reads all of `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.metrics.store_reads.inc();
        let bytes = self.inner.get(&Path::from(key)).await?.bytes().await?;
        self.metrics.store_read_bytes.inc_by(bytes.len() as u64);
        Ok(bytes)
    }

    /// Deletes `key`; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.inner.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists every object key under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        use futures::TryStreamExt;
        let prefix = Path::from(prefix);
        let metas: Vec<_> = self.inner.list(Some(&prefix)).try_collect().await?;
        Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
    }

    /// Every object under `prefix` with its last-modified time (ms since the epoch), streamed.
    pub fn list_meta(&self, prefix: &str) -> futures::stream::BoxStream<'static, Result<(String, i64), StoreError>> {
        use futures::StreamExt;
        let prefix = Path::from(prefix);
        self.inner
            .list(Some(&prefix))
            .map(|m| m.map(|m| (m.location.to_string(), m.last_modified.timestamp_millis())).map_err(StoreError::from))
            .boxed()
    }

    /// Deletes `keys` in the background, logging failures (orphans are reclaimed later).
    pub fn delete_later(&self, keys: Vec<String>) {
        let store = self.clone();
        tokio::spawn(async move {
            for key in keys {
                if let Err(e) = store.delete(&key).await {
                    tracing::warn!(%key, error = %e, "could not delete unreferenced blob");
                }
            }
        });
    }
}
