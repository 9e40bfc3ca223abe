//! Cold download of a large file through an edge vs a plain S3 GET of the same object from the
//! same server, in the same run (issue 9's bucket pipeline target: at least 0.7×).
//!
//! SeaweedFS (real S3 API), `mxcas serve` on it, one BENCH_MIB (default 256) MiB upload. The
//! baseline is one GET of the stored object with `object_store`'s S3 client (what a plain S3
//! client does: one request, one stream). Each edge read is cold: the node is restarted before
//! it, so neither its block cache nor its metadata cache holds anything. Both sides stream into
//! a byte counter; before timing, one read of each is compared with the uploaded bytes, so the
//! baseline is known to do the work. Also reported: the edge with one block a store read
//! (`read_span_blocks = 1`, as before spans), with more read ahead and longer spans, and one
//! block at a time (as before the read-ahead), for the gains.
//!
//! Run with `scripts/bench-cold-read.sh` (release binaries). Bounded: about a minute.

use std::time::Instant;

use anyhow::{Context, ensure};
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use rand::RngCore;
use rand::SeedableRng;

use mxcas_tests::s3::SeaweedFs;
use mxcas_tests::{Node, NodeOptions};

const ROUNDS: usize = 3;

/// Bytes of `stream`, counted (and kept only if `keep`).
async fn drain<E>(
    mut stream: impl futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    keep: bool,
) -> anyhow::Result<(u64, Vec<u8>)>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let (mut n, mut kept) = (0u64, Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        n += chunk.len() as u64;
        if keep {
            kept.extend_from_slice(&chunk);
        }
    }
    Ok((n, kept))
}

/// Bytes of `GET` of the whole object, streamed.
async fn s3_get(s3: &object_store::aws::AmazonS3, key: &str, keep: bool) -> anyhow::Result<(u64, Vec<u8>)> {
    drain(s3.get(&object_store::path::Path::from(key)).await?.into_stream(), keep).await
}

/// Bytes of a download of `media_id` through the edge, streamed.
async fn edge_get(node: &Node, media_id: &str, keep: bool) -> anyhow::Result<(u64, Vec<u8>)> {
    let resp = node.download(media_id).await?;
    ensure!(resp.status() == 200, "edge answered {}", resp.status());
    drain(resp.bytes_stream(), keep).await
}

fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// MB/s of each of `ROUNDS` cold edge reads with `cache` as the node's `[cache]` config.
async fn edge_rounds(node: &mut Node, cache: &str, media_id: &str, size: u64) -> anyhow::Result<Vec<f64>> {
    let mut opts = node.opts.clone();
    opts.cache = cache.to_owned();
    let mut speeds = Vec::new();
    for _ in 0..ROUNDS {
        node.restart_with(opts.clone()).await?;
        let t = Instant::now();
        let (n, _) = edge_get(node, media_id, false).await?;
        let secs = t.elapsed().as_secs_f64();
        ensure!(n == size, "edge sent {n} of {size} bytes");
        speeds.push(mb_s(n, secs));
    }
    Ok(speeds)
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mib: u64 = std::env::var("BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let size = mib << 20;
    let s3 = SeaweedFs::start().await?;
    let bucket = s3.object_store()?;
    // The cache holds a quarter of the file at most: nothing of it survives anyway (restarts).
    let cache = format!("capacity = \"{} MiB\"\n", (mib / 4).max(8));
    let mut node = Node::start(NodeOptions {
        store: s3.store(),
        media: format!("max_upload_size = \"{} MiB\"\n", mib + 1),
        cache: cache.clone(),
        ..NodeOptions::default()
    })
    .await?;

    eprintln!("== uploading {mib} MiB of random bytes");
    let mut data = vec![0u8; size as usize];
    rand_chacha::ChaCha20Rng::seed_from_u64(9).fill_bytes(&mut data);
    let media_id = node.upload_ok(data.clone()).await?;
    let mut objects = bucket.list(None);
    let mut key = None;
    while let Some(meta) = objects.next().await {
        let meta = meta?;
        if meta.size == size {
            key = Some(meta.location.to_string());
        }
    }
    let key = key.context("no stored object of the upload's size")?;

    eprintln!("== checking that both sides return the uploaded bytes (untimed)");
    let (n, bytes) = s3_get(&bucket, &key, true).await?;
    ensure!(n == size && bytes == data, "the plain S3 GET of {key} did not return the uploaded bytes");
    node.restart().await?;
    let (n, bytes) = edge_get(&node, &media_id, true).await?;
    ensure!(n == size && bytes == data, "the edge download did not return the uploaded bytes");
    drop(bytes);

    eprintln!("== timing: {ROUNDS} plain S3 GETs, {ROUNDS} cold edge downloads each way");
    let mut s3_speeds = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let (n, _) = s3_get(&bucket, &key, false).await?;
        let secs = t.elapsed().as_secs_f64();
        ensure!(n == size, "S3 sent {n} of {size} bytes");
        s3_speeds.push(mb_s(n, secs));
    }
    let edge = edge_rounds(&mut node, &cache, &media_id, size).await?;
    let mut variants = Vec::new();
    for (name, settings) in [
        ("read-ahead 8, one block a read", "read_span_blocks = 1\n"),
        ("read-ahead 16, spans of 8", "read_ahead_blocks = 16\nread_span_blocks = 8\n"),
        ("one block at a time", "read_ahead_blocks = 1\nread_span_blocks = 1\n"),
    ] {
        variants.push((name, edge_rounds(&mut node, &format!("{cache}{settings}"), &media_id, size).await?));
    }
    // The baseline again, after: a server that changed speed during the run shows here.
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let (n, _) = s3_get(&bucket, &key, false).await?;
        ensure!(n == size, "S3 sent {n} of {size} bytes");
        s3_speeds.push(mb_s(n, t.elapsed().as_secs_f64()));
    }
    let fmt = |v: &[f64]| v.iter().map(|s| format!("{s:.0}")).collect::<Vec<_>>().join(", ");
    println!("cold read of {mib} MiB, MB/s (best of each):");
    println!("  plain S3 GET of the object:          {:.0}  [{}]", best(&s3_speeds), fmt(&s3_speeds));
    println!("  edge, read-ahead 8, spans of 4 (default): {:.0}  [{}]", best(&edge), fmt(&edge));
    for (name, speeds) in &variants {
        println!("  edge, {name}: {:.0}  [{}]", best(speeds), fmt(speeds));
    }
    println!("ratio edge (default) / plain S3 GET: {:.2}", best(&edge) / best(&s3_speeds));
    for (name, speeds) in &variants {
        println!("  {name}: {:.2}", best(speeds) / best(&s3_speeds));
    }
    Ok(())
}
