//! One blob-store suite, run through the real binary against every backend: the local
//! filesystem and a real S3-compatible server (SeaweedFS). Reproduce:
//! `scripts/test.sh store_conformance`.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use mxcas_tests::node::ALICE;
use mxcas_tests::s3::SeaweedFs;
use mxcas_tests::{Node, NodeOptions, test_bytes, wait_for};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const MIB: usize = 1024 * 1024;

async fn keys(store: &dyn ObjectStore) -> anyhow::Result<Vec<String>> {
    let mut keys: Vec<String> = store
        .list(Some(&object_store::path::Path::from("blobs")))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await?;
    keys.sort();
    Ok(keys)
}

async fn settle(store: &dyn ObjectStore, want: usize) -> anyhow::Result<Vec<String>> {
    wait_for(&format!("{want} objects in the store"), Duration::from_secs(10), || async {
        keys(store).await.ok().filter(|k| k.len() == want)
    })
    .await
}

async fn suite(node: &Node, store: Arc<dyn ObjectStore>) -> anyhow::Result<()> {
    assert!(keys(&*store).await?.is_empty());

    // One-block, boundary and multipart-sized (> 8 MiB part) files round-trip.
    let small = test_bytes(1, 10_000);
    let exact = test_bytes(2, MIB);
    let large = test_bytes(3, 9 * MIB + 3);
    let mut ids = Vec::new();
    for data in [&small, &exact, &large] {
        let id = node.upload_ok(data.clone()).await?;
        assert_eq!(node.download(&id).await?.bytes().await?.as_ref(), data.as_slice());
        ids.push(id);
    }
    // small, exact: one object each; large: blob + block index.
    let objects = settle(&*store, 4).await?;
    assert_eq!(objects.iter().filter(|k| k.ends_with(".idx")).count(), 1, "{objects:?}");

    // A range inside the multipart file, across a part boundary (8 MiB).
    let resp = node.download_range(&ids[2], &format!("bytes={}-{}", 8 * MIB - 5, 8 * MIB + 4)).await?;
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await?.as_ref(), &large[8 * MIB - 5..8 * MIB + 5]);

    // Dedup: the second copy's objects are removed.
    assert_eq!(node.upload_ok(large.clone()).await?, ids[2]);
    settle(&*store, 4).await?;

    // An upload cut off mid-body leaves nothing (multipart aborted).
    {
        use tokio::io::AsyncWriteExt;
        let mut conn = tokio::net::TcpStream::connect(node.api.trim_start_matches("http://")).await?;
        let head = format!(
            "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\nContent-Length: {}\r\n\r\n",
            20 * MIB
        );
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(&test_bytes(4, 12 * MIB)).await?;
        drop(conn);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    settle(&*store, 4).await?;

    // A corrupted object is never served: the block fails verification.
    let fresh = test_bytes(5, 50_000);
    let id = node.upload_ok(fresh.clone()).await?;
    let first_id = id.clone();
    let objects = settle(&*store, 5).await?;
    let mut victim = None;
    for key in &objects {
        let bytes = store.get(&Path::from(key.as_str())).await?.bytes().await?;
        if bytes.as_ref() == fresh.as_slice() {
            victim = Some(key.clone());
        }
    }
    let victim = victim.ok_or_else(|| anyhow::anyhow!("uploaded object not found in {objects:?}"))?;
    let mut bad = fresh.clone();
    bad[100] ^= 0xff;
    store.put(&Path::from(victim.as_str()), PutPayload::from(bad)).await?;
    let resp = node.download(&id).await?;
    assert_eq!(resp.status(), 500, "corrupt data must not be served");
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["errcode"], "IO.MXCAS.DATA_LOSS", "corruption is data loss, not 'retry later'");
    assert!(node.metric("mxcas_edge_data_loss_total").await? >= 1.0);

    // Nor when the block index is doctored to match doctored data: the index must agree with
    // the DAG its CID names.
    let big = test_bytes(6, 2 * MIB + 100);
    let id = node.upload_ok(big.clone()).await?;
    let before: std::collections::BTreeSet<String> = objects.into_iter().collect();
    let now = settle(&*store, 7).await?;
    let new: Vec<&String> = now.iter().filter(|k| !before.contains(*k)).collect();
    let idx = new.iter().find(|k| k.ends_with(".idx")).ok_or_else(|| anyhow::anyhow!("no index in {new:?}"))?;
    let blob = idx.trim_end_matches(".idx");
    let evil = vec![b'E'; MIB];
    let mut forged = big.clone();
    forged[..MIB].copy_from_slice(&evil);
    store.put(&Path::from(blob), PutPayload::from(forged)).await?;
    let mut index = store.get(&Path::from(idx.as_str())).await?.bytes().await?.to_vec();
    let evil_hash: [u8; 32] =
        sha2::Digest::finalize(sha2::Digest::chain_update(<sha2::Sha256 as sha2::Digest>::new(), &evil)).into();
    index[28..60].copy_from_slice(&evil_hash);
    store.put(&Path::from(idx.as_str()), PutPayload::from(index)).await?;
    let resp = node.download_range(&id, "bytes=0-9").await?;
    assert_eq!(resp.status(), 500, "a forged index must not vouch for forged data");

    // Uploading the same bytes again repairs both (the loss was recorded by the downloads).
    for (bytes, media_id) in [(&fresh, &first_id), (&big, &id)] {
        assert_eq!(&node.upload_ok(bytes.clone()).await?, media_id, "same bytes, same mxc");
        let resp = node.download(media_id).await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await?.as_ref(), bytes.as_slice());
    }
    Ok(())
}

#[tokio::test]
async fn local_filesystem_backend() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(node.data_dir().join("blobs"))?);
    suite(&node, store).await?;
    // No multipart staging files are left behind either.
    // (7 objects, plus the repairs' new blob, blob and block index; the replaced ones are the
    // sweeper's once their generation is sealed.)
    assert_eq!(node.local_blobs().len(), 10, "{:?}", node.local_blobs());
    Ok(())
}

#[tokio::test]
async fn s3_backend_seaweedfs() -> anyhow::Result<()> {
    let s3 = SeaweedFs::start().await?;
    let node = Node::start(NodeOptions { store: s3.store(), ..Default::default() }).await?;
    let store: Arc<dyn ObjectStore> = Arc::new(s3.object_store()?);
    suite(&node, store).await
}

#[tokio::test]
async fn wrong_s3_credentials_fail_uploads_with_a_retryable_error() -> anyhow::Result<()> {
    let s3 = SeaweedFs::start().await?;
    let mut store = s3.store();
    if let mxcas_tests::Store::S3 { secret_key, .. } = &mut store {
        *secret_key = "wrong".into();
    }
    let node = Node::start(NodeOptions { store, ..Default::default() }).await?;
    // Uploads fail with a retryable Matrix error, not a 200 and not a hang.
    let resp = node.upload(b"x".to_vec(), "text/plain", None).await?;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["errcode"], "M_UNKNOWN");
    Ok(())
}

/// A miss of a long read reads its block's span (`read_span_blocks`, 4 by default) in one
/// store request, cut to what the read covers, and each block of it is verified on its own: a
/// cold read of an 11-block file makes three reads of blocks (and one of its block index), a
/// range reads only its blocks, and a damaged block spoils only itself, reported as data
/// loss.
#[tokio::test]
async fn blocks_are_read_from_the_store_in_spans_each_verified_alone() -> anyhow::Result<()> {
    let mut node = Node::start(NodeOptions::default()).await?;
    let data = test_bytes(8, 10 * MIB + 5);
    let id = node.upload_ok(data.clone()).await?;
    node.restart().await?;
    let before = store_reads(&node).await?;
    assert_eq!(node.download(&id).await?.bytes().await?.as_ref(), data.as_slice());
    assert_eq!(store_reads(&node).await? - before, 4.0, "spans 0-3, 4-7 and 8-10, and the block index");

    // A range reads only the blocks it covers: span 8-10 cut to block 9.
    node.restart().await?;
    let before = store_reads(&node).await?;
    let range = |i: usize| format!("bytes={}-{}", i * MIB, i * MIB + 9);
    let resp = node.download_range(&id, &range(9)).await?;
    assert_eq!(resp.bytes().await?.as_ref(), &data[9 * MIB..9 * MIB + 10]);
    assert_eq!(store_reads(&node).await? - before, 2.0, "the index, and block 9");
    let read_bytes = "mxcas_edge_store_read_bytes_total";
    let bytes_before = node.metric(read_bytes).await?;
    let resp = node.download_range(&id, &format!("bytes={}-{}", 4 * MIB, 6 * MIB + 9)).await?;
    assert_eq!(resp.bytes().await?.as_ref(), &data[4 * MIB..6 * MIB + 10]);
    assert_eq!(store_reads(&node).await? - before, 3.0, "blocks 4-6 of span 4-7 in one read");
    assert_eq!(node.metric(read_bytes).await? - bytes_before, (3 * MIB) as f64, "and no more of the span");

    // Damage block 5 in the stored object.
    let blob = node
        .local_blobs()
        .into_iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == data.len() as u64))
        .ok_or_else(|| anyhow::anyhow!("the blob is not among {:?}", node.local_blobs()))?;
    let mut bad = std::fs::read(&blob)?;
    bad[5 * MIB + 10] ^= 0xff;
    std::fs::write(&blob, bad)?;
    node.restart().await?;
    let resp = node.download_range(&id, &range(4)).await?;
    assert_eq!(resp.status(), 206, "block 4 of the damaged span is still whole");
    assert_eq!(resp.bytes().await?.as_ref(), &data[4 * MIB..4 * MIB + 10]);
    let resp = node.download_range(&id, &range(5)).await?;
    assert_eq!(resp.status(), 500, "the damaged block is never served");
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["errcode"], "IO.MXCAS.DATA_LOSS");
    Ok(())
}

async fn store_reads(node: &Node) -> anyhow::Result<f64> {
    node.metric("mxcas_edge_store_reads_total").await
}
