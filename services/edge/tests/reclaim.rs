//! Reclaiming, repair and data loss, with a real one-node metadata service (raft over redb,
//! gRPC on loopback) and a real local blob store, driven through the HTTP API. The bad
//! interleavings are forced with pause points, not hoped for with sleeps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mxcas_edge::media::MediaService;
use mxcas_edge::pause;
use mxcas_edge::sweeper::sweep_once;
use mxcas_meta::MetaClient;
use mxcas_meta::client::ClientConfig;
use mxcas_meta::raft::{BasicNode, RaftNode, RaftSettings};
use mxcas_meta::server::MetaService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const TOKEN: &str = "reclaim-test-token";

struct Fixture {
    dir: tempfile::TempDir,
    api: String,
    media: Arc<MediaService>,
    http: reqwest::Client,
    cancel: CancellationToken,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Bytes that differ per `seed` (no two tests share content).
fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u64 * 31 + seed as u64 * 7919 + (i as u64 >> 10)) as u8).collect()
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let cancel = CancellationToken::new();
    // Generations may advance at every sweep here; the tests force the interleavings.
    let settings = RaftSettings { reclaim_interval: Duration::ZERO, ..RaftSettings::default() };
    let node = RaftNode::start(1, &dir.path().join("meta"), &settings).await.expect("raft");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let service = MetaService::new(node.clone()).into_server();
    let c = cancel.clone();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, c.cancelled_owned())
            .await;
    });
    node.initialize([(1, BasicNode { addr: addr.clone() })].into_iter().collect()).await.expect("init");
    node.wait_for_leader(Duration::from_secs(10)).await.expect("leader");
    let meta = MetaClient::new(&[addr], ClientConfig::default()).expect("client");
    let settings = mxcas_edge::EdgeSettings {
        server_name: "localhost".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_owned(),
        media: Default::default(),
        cache: Default::default(),
        auth: mxcas_edge::config::AuthConfig {
            tokens: BTreeMap::from([(TOKEN.to_owned(), "@alice:localhost".to_owned())]),
            ..Default::default()
        },
        store: mxcas_edge::store::StoreConfig::Fs { path: None },
        sweeper: mxcas_edge::sweeper::SweeperConfig { enabled: false, ..Default::default() },
        http: Default::default(),
        thumbnails: Default::default(),
        tenants: Vec::new(),
        federation: Default::default(),
        ipfs: Default::default(),
    };
    let edge = mxcas_edge::start(settings, meta, cancel.clone(), &TaskTracker::new()).await.expect("edge");
    Fixture { api: format!("http://{}", edge.api_addr), media: edge.media, dir, http: reqwest::Client::new(), cancel }
}

/// `POST /upload` of `body`.
async fn post_upload(http: &reqwest::Client, api: &str, body: Vec<u8>) -> reqwest::Response {
    http.post(format!("{api}/_matrix/media/v3/upload"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .expect("upload request")
}

/// The media ID of a successful upload's answer.
async fn media_id_of(resp: reqwest::Response) -> String {
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let json: serde_json::Value = resp.json().await.expect("json");
    let uri = json["content_uri"].as_str().expect("content_uri");
    uri.rsplit('/').next().expect("media id").to_owned()
}

impl Fixture {
    async fn upload(&self, body: Vec<u8>) -> reqwest::Response {
        post_upload(&self.http, &self.api, body).await
    }

    /// An upload running in its own task (to be stopped at a pause point).
    fn spawn_upload(&self, body: Vec<u8>) -> tokio::task::JoinHandle<reqwest::Response> {
        let (http, api) = (self.http.clone(), self.api.clone());
        tokio::spawn(async move { post_upload(&http, &api, body).await })
    }

    async fn upload_ok(&self, body: Vec<u8>) -> String {
        media_id_of(self.upload(body).await).await
    }

    async fn download(&self, media_id: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/_matrix/client/v1/media/download/localhost/{media_id}", self.api))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("download request")
    }

    /// Every file of uploads in the local store (objects and staging files; not the store's
    /// identity marker).
    fn stored_files(&self) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        let mut dirs = vec![self.dir.path().join("blobs").join("blobs")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                } else {
                    out.push(e.path());
                }
            }
        }
        out.sort();
        out
    }

    async fn sweep(&self) -> mxcas_edge::sweeper::Swept {
        sweep_once(&self.media.store, &self.media.meta, Duration::ZERO).await.expect("sweep")
    }

    /// A download running in its own task (to be stopped at a pause point).
    fn spawn_download(&self, media_id: &str) -> tokio::task::JoinHandle<reqwest::Response> {
        let (http, url) =
            (self.http.clone(), format!("{}/_matrix/client/v1/media/download/localhost/{media_id}", self.api));
        tokio::spawn(async move { http.get(url).bearer_auth(TOKEN).send().await.expect("download request") })
    }

    /// A metric's value, 0 if it has not been recorded yet.
    fn metric_or_zero(&self, name: &str) -> f64 {
        let text = self.media.metrics.encode();
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.media.metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_during_a_paused_commit_never_ends_in_a_200_for_deleted_bytes() {
    let f = fixture().await;
    let mut paused = f.media.pause.arm(pause::BEFORE_COMMIT);
    let body = bytes(1, 3 * 1024 * 1024 + 5);
    let upload = f.spawn_upload(body.clone());
    paused.reached().await;
    // The bytes are durable and not yet committed. Two sweeps seal the upload's generation
    // and delete its unreferenced objects (the old sweeper did the same from their age).
    assert_eq!(f.stored_files().len(), 2, "blob and block index stored");
    f.sweep().await;
    let swept = f.sweep().await;
    assert_eq!(swept.deleted, 2, "{swept:?}");
    assert!(f.stored_files().is_empty());
    paused.release();
    let resp = upload.await.expect("task");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    assert_ne!(status, 200, "the upload's bytes are gone: it must not be acknowledged ({text})");
    assert_eq!(status, 503, "{text}");
    // Nothing refers to the lost bytes; the same upload again works.
    let id = f.upload_ok(body.clone()).await;
    assert_eq!(f.download(&id).await.bytes().await.expect("body").as_ref(), body.as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_generation_was_sealed_is_stored_again_and_kept() {
    let f = fixture().await;
    let mut paused = f.media.pause.arm(pause::BEFORE_COMMIT);
    let body = bytes(2, 2 * 1024 * 1024 + 17);
    let upload = f.spawn_upload(body.clone());
    paused.reached().await;
    // Seal the generation without deleting anything (a sweeper that stopped between the two).
    f.media.meta.begin_sweep(Duration::ZERO).await.expect("advance");
    let g = f.media.meta.begin_sweep(Duration::ZERO).await.expect("advance");
    assert!(g.sealed >= 1, "{g:?}");
    paused.release();
    let id = media_id_of(upload.await.expect("task")).await;
    assert_eq!(f.metric("mxcas_edge_upload_restores_total"), 1.0);
    // The original objects are now orphans of a sealed generation: the sweeper takes them,
    // and the media stays whole.
    let swept = f.sweep().await;
    assert_eq!(swept.deleted, 2, "{swept:?}");
    assert_eq!(f.stored_files().len(), 2);
    assert_eq!(f.download(&id).await.bytes().await.expect("body").as_ref(), body.as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_read_before_a_change_is_never_cached_after_it() {
    let f = fixture().await;
    let body = bytes(9, 4000);
    let id = f.upload_ok(body.clone()).await;
    let key = mxcas_meta::model::MediaKey::new("localhost", id.clone());
    // A download reads the record and stops before caching it...
    let mut paused = f.media.pause.arm(pause::RECORD_READ);
    let download = f.spawn_download(&id);
    paused.reached().await;
    // ...while the content changes (here another edge finds its bytes bad and reports them
    // lost) and this edge's change feed delivers that change.
    let content_events = "mxcas_edge_feed_events_total{kind=\"content\"}";
    let before = f.metric_or_zero(content_events);
    let (_, content) = f.media.meta.get_media(&key).await.expect("read").expect("record");
    let content = content.expect("content");
    assert!(f.media.meta.report_lost(&content.cid, &content.blob_key).await.expect("report"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while f.metric_or_zero(content_events) <= before {
        assert!(tokio::time::Instant::now() < deadline, "the change feed never delivered the change");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The download goes on with the record it read before the change; that record must not
    // stay cached, or this edge would serve it as it was for as long as the cache keeps it.
    paused.release();
    let resp = download.await.expect("task");
    assert_eq!(resp.status(), 200, "the bytes themselves are intact");
    let cached = f.media.cached(&key).await;
    let cached = cached.map(|r| r.content);
    assert!(cached.as_ref().is_none_or(|c| c.lost), "the pre-change record was cached: {cached:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reupload_repairs_content_whose_blob_was_deleted() {
    let f = fixture().await;
    let body = bytes(3, 3 * 1024 * 1024 + 1);
    let id = f.upload_ok(body.clone()).await;
    for file in f.stored_files().iter().filter(|p| p.extension().is_none()) {
        std::fs::remove_file(file).expect("delete the blob");
    }
    // The same bytes again: same mxc, and the fresh copy replaces the missing one instead of
    // being deleted as a duplicate.
    assert_eq!(f.upload_ok(body.clone()).await, id);
    assert_eq!(f.metric("mxcas_edge_repairs_total"), 1.0);
    let resp = f.download(&id).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.expect("body").as_ref(), body.as_slice());
    // And only the new copy is kept: the old block index (an orphan now) and the released
    // duplicate are gone once swept.
    f.sweep().await;
    f.sweep().await;
    assert_eq!(f.stored_files().len(), 2, "{:?}", f.stored_files());
    assert_eq!(f.download(&id).await.bytes().await.expect("body").as_ref(), body.as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_or_corrupt_bytes_are_data_loss_until_the_same_bytes_arrive_again() {
    let f = fixture().await;
    // A small (one-block) file whose object is overwritten with other bytes of the same size.
    let small = bytes(4, 5000);
    let small_id = f.upload_ok(small.clone()).await;
    let object = f.stored_files().pop().expect("one object");
    std::fs::write(&object, bytes(5, 5000)).expect("corrupt");
    // A large file whose object disappears.
    let large = bytes(6, 2 * 1024 * 1024 + 3);
    let large_id = f.upload_ok(large.clone()).await;
    for file in f.stored_files().iter().filter(|p| p.extension().is_none() && **p != object) {
        std::fs::remove_file(file).expect("delete");
    }
    for id in [&small_id, &large_id] {
        for _ in 0..2 {
            let resp = f.download(id).await;
            assert_eq!(resp.status(), 500);
            assert!(!resp.headers().contains_key("retry-after"), "data loss is not 'retry later'");
            let json: serde_json::Value = resp.json().await.expect("json");
            assert_eq!(json["errcode"], "IO.MXCAS.DATA_LOSS", "{json}");
        }
    }
    assert!(f.metric("mxcas_edge_data_loss_total") >= 2.0);
    // Uploading the same bytes again repairs each.
    assert_eq!(f.upload_ok(small.clone()).await, small_id);
    assert_eq!(f.upload_ok(large.clone()).await, large_id);
    assert_eq!(f.download(&small_id).await.bytes().await.expect("body").as_ref(), small.as_slice());
    assert_eq!(f.download(&large_id).await.bytes().await.expect("body").as_ref(), large.as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_files_of_a_killed_multipart_upload_are_swept() {
    let f = fixture().await;
    let generation = f.media.meta.generations().await.expect("generations").generation;
    let key = mxcas_edge::store::BlobStore::new_blob_key(generation);
    {
        // What a process killed mid-upload leaves: a multipart upload never finished or aborted.
        let mut mp = f.media.store.start_multipart(&key).await.expect("multipart");
        mp.put(bytes::Bytes::from(vec![1u8; 9 << 20]));
        mp.wait_for_capacity(0).await.expect("part written");
        std::mem::forget(mp);
    }
    let staged: Vec<_> = f.stored_files().into_iter().filter(|p| p.to_string_lossy().contains('#')).collect();
    assert!(!staged.is_empty(), "object_store stages the upload as <key>#N: {:?}", f.stored_files());
    assert!(f.media.store.list("blobs").await.expect("list").is_empty(), "and its listing hides it");
    // Once its generation is sealed, the sweeper removes it.
    f.sweep().await;
    let swept = f.sweep().await;
    assert_eq!(swept.staging_deleted, staged.len() as u64, "{swept:?}");
    assert!(f.stored_files().is_empty(), "{:?}", f.stored_files());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_object_is_data_loss_not_retry_later() {
    let f = fixture().await;
    let body = bytes(8, 3 * 1024 * 1024 + 9);
    let id = f.upload_ok(body.clone()).await;
    let blob = f.stored_files().into_iter().find(|p| p.extension().is_none()).expect("blob");
    std::fs::OpenOptions::new().write(true).open(&blob).expect("open").set_len(1024 * 1024).expect("truncate");
    let resp = f
        .http
        .get(format!("{}/_matrix/client/v1/media/download/localhost/{id}", f.api))
        .header("range", "bytes=2097152-2097160")
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), 500);
    let json: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(json["errcode"], "IO.MXCAS.DATA_LOSS", "{json}");
    assert_eq!(f.upload_ok(body.clone()).await, id);
    assert_eq!(f.download(&id).await.bytes().await.expect("body").as_ref(), body.as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_not_the_clusters_never_reports_loss() {
    let f = fixture().await;
    let body = bytes(9, 2 * 1024 * 1024 + 1);
    let id = f.upload_ok(body.clone()).await;
    // The store's directory "comes up empty" (an unmounted volume): every object, and the
    // store's identity marker, is gone.
    let root = f.dir.path().join("blobs");
    std::fs::remove_dir_all(&root).expect("empty the store");
    std::fs::create_dir_all(&root).expect("empty mount point");
    let resp = f.download(&id).await;
    assert_eq!(resp.status(), 503, "a wrong store is an outage, not data loss");
    assert!(f.metric("mxcas_edge_store_misconfigured_total") >= 1.0);
    assert_eq!(f.metric("mxcas_edge_data_loss_total"), 0.0);
    let (_, content) =
        f.media.meta.get_media(&mxcas_meta::MediaKey::new("localhost", &id)).await.expect("read").expect("media");
    assert!(!content.expect("content").lost, "nothing was recorded as lost");
    // A re-upload does not move the record onto this store either.
    let resp = f.upload(body.clone()).await;
    assert_eq!(resp.status(), 503);
}
