//! Metadata-cluster benchmarks, each reported beside its baseline from the same run:
//!
//! 1. commits/s of `CommitUpload` (the metadata write of every upload) through a 3-node
//!    loopback cluster vs a 1-node cluster, 64 concurrent callers (group commit at work), and
//!    through a 3-node cluster with mutual TLS on every link vs without;
//! 2. p50/p99 of an edge's lookup (HEAD of a download) for a fact it has cached vs one it has
//!    to fetch (a linearizable read through the leader);
//! 3. metadata-node RSS and snapshot size after N records written through the real API,
//!    scaled to per-million figures.
//!
//! Run with `scripts/bench-cluster.sh` (release binaries). Bounded: a few minutes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mxcas_proto::meta as pb;
use mxcas_tests::cluster::{Cluster, MetaOptions};
use mxcas_tests::node::ALICE;
use mxcas_tests::s3::SeaweedFs;
use mxcas_tests::{Node, NodeOptions};

fn commit_request(n: u64) -> pb::CommitUploadRequest {
    let bytes = n.to_le_bytes();
    let cid = mxcas_cas::raw_cid(&bytes);
    pb::CommitUploadRequest {
        media: Some(pb::MediaKey { server_name: "localhost".into(), media_id: String::new() }),
        user_id: "@bench:localhost".into(),
        content: Some(pb::Content {
            cid: cid.to_bytes(),
            size: 8,
            chunk_size: 1 << 20,
            // Named as edges name them (32 hex digits), so bytes per record are as in production.
            blob_key: mxcas_meta::model::blob_key::new(1, &format!("{n:032x}")),
            index_key: String::new(),
            refcount: 0,
            created_at_ms: 1,
            lost: false,
        }),
        content_type: "application/octet-stream".into(),
        filename: None,
        lost_key: None,
        quota: None,
    }
}

/// Commits as fast as `callers` concurrent clients can against the leader for `duration`,
/// starting at record number `base`; returns commits/s and the next record number. Counts
/// failed calls in `failed` (a healthy cluster under load should refuse none).
async fn commit_rate(
    channel: &tonic::transport::Channel,
    callers: usize,
    duration: Duration,
    base: u64,
    failed: &Arc<AtomicU64>,
) -> anyhow::Result<(f64, u64)> {
    let next = Arc::new(AtomicU64::new(base));
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (next, done, channel, failed) = (next.clone(), done.clone(), channel.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::meta_client::MetaClient::new(channel);
            while Instant::now() < end {
                let n = next.fetch_add(1, Ordering::Relaxed);
                match client.commit_upload(commit_request(n)).await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(status) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("   commit failed: {}: {}", status.code(), status.message());
                        }
                        0
                    }
                };
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await?;
    }
    let n = done.load(Ordering::Relaxed);
    Ok((n as f64 / started.elapsed().as_secs_f64(), next.load(Ordering::Relaxed)))
}

/// [`commit_rate`] through the client edges use (`MetaClient`), which groups concurrent
/// commits into `CommitUploads` calls; every answer checked.
async fn client_commit_rate(
    endpoints: &[String],
    callers: usize,
    duration: Duration,
    base: u64,
    failed: &Arc<AtomicU64>,
) -> anyhow::Result<(f64, u64)> {
    let client = mxcas_meta::MetaClient::new(endpoints, mxcas_meta::client::ClientConfig::default())?;
    let next = Arc::new(AtomicU64::new(base));
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (next, done, client, failed) = (next.clone(), done.clone(), client.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let req = commit_request(n);
                let content = mxcas_meta::ContentRecord::try_from(req.content.expect("content"))?;
                let commit = mxcas_meta::client::CommitRequest {
                    server_name: "localhost".into(),
                    media_id: None,
                    user_id: req.user_id,
                    content,
                    content_type: req.content_type,
                    filename: None,
                    lost_key: None,
                    quota: None,
                };
                match client.commit_upload(&commit).await {
                    Ok(o) if o.media.key.media_id == commit.content.cid.to_string() && !o.deduplicated => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(o) => anyhow::bail!("commit {n} answered {o:?}"),
                    Err(e) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("   commit failed: {e}");
                        }
                    }
                }
            }
            Ok(())
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await??;
    }
    let n = done.load(Ordering::Relaxed);
    Ok((n as f64 / started.elapsed().as_secs_f64(), next.load(Ordering::Relaxed)))
}

/// Puts ~600-byte values into etcd from `callers` concurrent clients on its leader for
/// `duration`; returns puts/s, after checking that etcd applied every one (each put moves the
/// revision by exactly one).
async fn etcd_put_rate(channel: &tonic::transport::Channel, callers: usize, duration: Duration) -> anyhow::Result<f64> {
    use mxcas_tests::etcd::pb;
    let put = |n: u64| pb::PutRequest {
        key: format!("bench/{n}").into_bytes(),
        value: vec![b'v'; 600],
        ..Default::default()
    };
    let revision = |r: pb::PutResponse| r.header.map(|h| h.revision).unwrap_or(0);
    let mut probe = pb::kv_client::KvClient::new(channel.clone());
    let first = revision(probe.put(put(0)).await?.into_inner());
    let next = Arc::new(AtomicU64::new(1));
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (next, done, channel) = (next.clone(), done.clone(), channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::kv_client::KvClient::new(channel);
            while Instant::now() < end {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if client.put(put(n)).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let last = revision(probe.put(put(u64::MAX)).await?.into_inner());
    let n = done.load(Ordering::Relaxed);
    anyhow::ensure!(
        (last - first - 1) as u64 == n,
        "etcd's revision moved by {} for {n} acknowledged puts: the baseline did not do the work",
        last - first - 1
    );
    Ok(n as f64 / elapsed)
}

/// Small uploads per second through `node` (`mxcas serve`): `callers` connections uploading
/// distinct 50 KiB files for `duration`, each answer checked (200 and a content URI).
async fn small_upload_rate(node: &Node, callers: usize, duration: Duration) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (done, next, http, url) =
            (done.clone(), next.clone(), node.http.clone(), node.url("/_matrix/media/v3/upload"));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let mut body = vec![0u8; 50 * 1024];
                body[..8].copy_from_slice(&n.to_le_bytes());
                body[8..16].copy_from_slice(&0x6d78636173u64.to_le_bytes());
                let resp = http.post(&url).bearer_auth(ALICE).body(body).send().await?;
                anyhow::ensure!(resp.status() == 200, "upload answered {}", resp.status());
                let json: serde_json::Value = resp.json().await?;
                anyhow::ensure!(json["content_uri"].as_str().is_some_and(|u| u.starts_with("mxc://")), "{json}");
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Small uploads through `mxcas serve` against the disk's rate for the same files, in
/// alternating rounds (this machine's disk rate swings by several times from one ten seconds
/// to the next); returns the median of each.
async fn small_uploads_vs_disk(duration: Duration) -> anyhow::Result<(f64, f64)> {
    let serve = Node::start(NodeOptions::default()).await?;
    eprintln!("   (mxcas serve pid {:?})", serve.pid());
    let (mut uploads, mut disk) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let disk_dir = tempfile::Builder::new().prefix("mxcas-disk-").tempdir()?;
        disk.push(disk_fsync_rate(disk_dir.path(), 64, duration).await?);
        drop(disk_dir);
        uploads.push(small_upload_rate(&serve, 64, duration).await?);
        eprintln!("   round {round}: uploads/s {:.0}, disk write+fsync/s {:.0}", uploads[round], disk[round]);
    }
    // Where an upload's time goes: the edge's own latency histograms (means over all rounds).
    let metrics = serve.metrics().await?;
    let mean_ms = |name: &str| {
        let value = |suffix: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&format!("mxcas_edge_{name}_{suffix} ")))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        match (value("sum"), value("count")) {
            (Some(sum), Some(count)) if count > 0.0 => format!("{:.2} ms over {count}", sum * 1000.0 / count),
            _ => "absent".into(),
        }
    };
    eprintln!(
        "   mean store write {}, mean metadata commit {}",
        mean_ms("store_write_duration_seconds"),
        mean_ms("meta_commit_duration_seconds")
    );
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(&mut uploads), median(&mut disk)))
}

/// The disk's rate for the same work without mxcas: `writers` threads each writing 50 KiB
/// files and fsyncing them and their directory (as the local blob store does), in `dir`, for
/// `duration`; checks every file is whole afterwards.
async fn disk_fsync_rate(dir: &std::path::Path, writers: usize, duration: Duration) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (done, dir) = (done.clone(), dir.to_owned());
        tasks.push(tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            use std::io::Write;
            let body = vec![7u8; 50 * 1024];
            let mut i = 0u64;
            while Instant::now() < end {
                let mut f = std::fs::File::create(dir.join(format!("w{w}-{i}")))?;
                f.write_all(&body)?;
                f.sync_all()?;
                std::fs::File::open(&dir)?.sync_all()?;
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let whole = std::fs::read_dir(dir)?.flatten().filter(|e| e.metadata().is_ok_and(|m| m.len() == 50 * 1024)).count();
    anyhow::ensure!(whole as u64 == n, "{whole} whole files for {n} writes: the baseline did not do the work");
    Ok(n as f64 / elapsed)
}

/// The nodes' own addresses (not their test proxies).
fn direct_endpoints(cluster: &Cluster) -> Vec<String> {
    cluster.metas.iter().filter_map(|m| m.listen.map(|a| a.to_string())).collect()
}

/// A channel to the leader (over TLS when the cluster uses it).
async fn leader(cluster: &Cluster) -> anyhow::Result<tonic::transport::Channel> {
    let l = cluster.wait_leader(Duration::from_secs(20)).await?;
    cluster.metas[(l - 1) as usize].channel().await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name, from the state (field 3): utime and
    // stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let records: u64 = std::env::var("BENCH_RECORDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let duration = Duration::from_secs(secs);

    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "uploads") {
        // For profiling the small-upload path alone (with its baseline, for the ratio).
        eprintln!("== small uploads/s: mxcas serve, 50 KiB, 64 connections vs the disk, 3 rounds of {secs}s");
        let (rate, disk_rate) = small_uploads_vs_disk(duration).await?;
        println!(
            "50 KiB uploads/s, mxcas serve: {rate:.0}; disk write+fsync/s: {disk_rate:.0}; ratio {:.2}",
            rate / disk_rate
        );
        return Ok(());
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "commits") {
        // For profiling the commit path alone: one 3-node run, nothing else.
        let three = Cluster::start(3, MetaOptions { direct: true, ..MetaOptions::default() }).await?;
        let failed = Arc::new(AtomicU64::new(0));
        let pids: Vec<u32> = three.metas.iter().filter_map(|m| m.pid()).collect();
        let callers = std::env::var("BENCH_CALLERS").ok().and_then(|s| s.parse().ok()).unwrap_or(64);
        eprintln!("== commits/s: 3-node cluster, {callers} callers, {secs}s (meta pids {pids:?})");
        let channel = leader(&three).await?;
        let l = three.wait_leader(Duration::from_secs(10)).await?;
        let entries =
            || async { three.metas[(l - 1) as usize].cluster_status().await.map(|s| s.last_log_index.unwrap_or(0)) };
        let first_entry = entries().await?;
        let before: Vec<f64> = pids.iter().chain([&std::process::id()]).map(|&p| cpu_secs(p)).collect();
        let (rate, _) = if std::env::var("BENCH_CLIENT").is_ok_and(|v| v == "edge") {
            client_commit_rate(&direct_endpoints(&three), callers, duration, 0, &failed).await?
        } else {
            commit_rate(&channel, callers, duration, 0, &failed).await?
        };
        let after: Vec<f64> = pids.iter().chain([&std::process::id()]).map(|&p| cpu_secs(p)).collect();
        let per_commit: Vec<String> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| format!("{:.0}", (a - b) * 1e6 / (rate * duration.as_secs_f64())))
            .collect();
        let commits_per_entry = rate * duration.as_secs_f64() / (entries().await? - first_entry).max(1) as f64;
        println!(
            "CommitUpload commits/s, 3-node: {rate:.0} ({} failed, {commits_per_entry:.1} per raft entry); \
             CPU µs per commit, meta nodes then bench: {}",
            failed.load(Ordering::Relaxed),
            per_commit.join(" ")
        );
        return Ok(());
    }
    eprintln!("== commits/s: 1-node vs 3-node cluster, 64 callers, {secs}s each");
    let single = Cluster::start(1, MetaOptions::default()).await?;
    let failed = Arc::new(AtomicU64::new(0));
    let (one, _) = commit_rate(&leader(&single).await?, 64, duration, 0, &failed).await?;
    drop(single);
    eprintln!("== commits/s: 3-node cluster over mutual TLS, {secs}s");
    let pki = Arc::new(mxcas_tests::pki::TestPki::generate("bench")?);
    let tls = Cluster::start(3, MetaOptions { tls: Some(pki), ..MetaOptions::default() }).await?;
    let (tls_rate, _) = commit_rate(&leader(&tls).await?, 64, duration, 0, &failed).await?;
    drop(tls);
    // A snapshot by size is due about halfway through the record-writing phase (commands are
    // about 150 bytes in the log).
    let snapshot_bytes: &'static str =
        Box::leak(format!("snapshot_log_bytes = {}", (records * 75).max(1 << 20)).into_boxed_str());
    let record_opts = MetaOptions { snapshot_every: 1_000_000, extra: snapshot_bytes, ..MetaOptions::default() };
    let three = Cluster::start(3, record_opts.clone()).await?;
    let (three_rate, mut next) = commit_rate(&leader(&three).await?, 64, duration, 10_000_000, &failed).await?;
    eprintln!(
        "== commits/s: 3-node, through the edges' client (concurrent commits grouped per call), 64 and 256 callers, {secs}s each"
    );
    let direct = Cluster::start(3, MetaOptions { direct: true, ..MetaOptions::default() }).await?;
    let (edge_rate, base) = client_commit_rate(&direct_endpoints(&direct), 64, duration, 0, &failed).await?;
    let (edge_rate_256, base) = client_commit_rate(&direct_endpoints(&direct), 256, duration, base, &failed).await?;
    let (grpc_rate_256, _) = commit_rate(&leader(&direct).await?, 256, duration, base, &failed).await?;
    drop(direct);

    eprintln!("== puts/s: 3-member etcd (the baseline), 64 and 256 clients on its leader, {secs}s each");
    let etcd = mxcas_tests::etcd::Etcd::start(3).await?;
    let etcd_rate = etcd_put_rate(&etcd.leader().await?, 64, duration).await?;
    let etcd_rate_256 = etcd_put_rate(&etcd.leader().await?, 256, duration).await?;
    drop(etcd);

    eprintln!(
        "== small uploads/s: mxcas serve, 50 KiB, 64 connections vs 64 writers write+fsync, medians of 3 rounds of {secs}s each"
    );
    let (upload_rate, disk_rate) = small_uploads_vs_disk(duration).await?;

    eprintln!("== lookup latency through an edge (HEAD), cached vs uncached");
    let s3 = SeaweedFs::start().await?;
    let edge =
        Node::start(NodeOptions { store: s3.store(), edge_meta: three.endpoints(), ..Default::default() }).await?;
    let mut ids = Vec::new();
    for i in 0..300u64 {
        ids.push(edge.upload_ok(format!("lookup bench {i}").into_bytes()).await?);
    }
    let head = |id: &str| {
        let (http, url) = (edge.http.clone(), edge.url(&format!("/_matrix/client/v1/media/download/localhost/{id}")));
        async move {
            let t = Instant::now();
            let r = http.head(url).bearer_auth(ALICE).send().await?;
            anyhow::ensure!(r.status() == 200, "HEAD answered {}", r.status());
            Ok::<Duration, anyhow::Error>(t.elapsed())
        }
    };
    // Uploading cached nothing about lookups: the first HEAD of each is an uncached lookup.
    let mut uncached = Vec::new();
    for id in &ids {
        uncached.push(head(id).await?);
    }
    let mut cached = Vec::new();
    for id in &ids {
        cached.push(head(id).await?);
    }
    uncached.sort();
    cached.sort();

    eprintln!("== {records} records through CommitUpload, then a snapshot");
    let to_leader = leader(&three).await?;
    let started = Instant::now();
    while next < 10_000_000 + records {
        let (r, n) = commit_rate(&to_leader, 64, Duration::from_secs(5), next, &failed).await?;
        next = n;
        eprintln!("   {} records written ({r:.0}/s)", next - 10_000_000);
    }
    let write_secs = started.elapsed().as_secs_f64();
    let l = three.wait_leader(Duration::from_secs(10)).await?;
    let state = three.metas[(l - 1) as usize].state().await?;
    let written = state.media_count;
    let rss: Vec<u64> = three.metas.iter().map(|m| m.pid().map(rss_kib).unwrap_or(0)).collect();
    let snap_index = three.metas[(l - 1) as usize].cluster_status().await?.snapshot_index.unwrap_or(0);
    let leader_dir = three.metas[(l - 1) as usize].data_dir().join("meta");
    let file_len = |name: &str| std::fs::metadata(leader_dir.join(name)).map(|m| m.len()).unwrap_or(0);
    let (log_bytes, state_bytes) = (file_len("log.redb"), file_len("state.redb"));
    // The snapshot format, of the whole state now: a backup export is the same stream.
    let export = tempfile::Builder::new().prefix("mxcas-bench-export-").tempdir()?;
    let export_file = export.path().join("state.backup");
    let entry = three.endpoints()[(l - 1) as usize].clone();
    let out = std::process::Command::new(mxcas_tests::node::mxcas_bin())
        .args(["admin", "--meta", &entry, "snapshot", "export", "--out"])
        .arg(&export_file)
        .output()?;
    anyhow::ensure!(out.status.success(), "snapshot export failed: {}", String::from_utf8_lossy(&out.stderr));
    let snapshot_bytes = std::fs::metadata(&export_file)?.len();

    eprintln!("== a new node catches up on {written} records (the log before its start compacted away)");
    let mut fourth = mxcas_tests::cluster::MetaProc::start(4, &record_opts).await?;
    let started = Instant::now();
    let target = three.metas[(l - 1) as usize].cluster_status().await?.last_applied.unwrap_or(0);
    // Returns once the learner holds the log (snapshot installed, later entries appended).
    mxcas_tests::cluster::admin(&entry, &["add-learner", "--id", "4", "--addr", &fourth.proxy.addr.to_string()])?;
    let added_secs = started.elapsed().as_secs_f64();
    // Then it applies what followed the snapshot.
    let applied = mxcas_tests::wait_for("the new node to apply everything", Duration::from_secs(300), || async {
        let s = fourth.cluster_status().await.ok()?;
        (s.last_applied.unwrap_or(0) >= target).then_some(())
    })
    .await;
    let install_secs = started.elapsed().as_secs_f64();
    let installed = fourth.log().contains("installed snapshot");
    let caught_up = fourth.state().await?.media_count;
    fourth.kill9();

    let per_m = |x: f64| x * 1_000_000.0 / written as f64;
    println!();
    println!("failed commits over the whole run (quorum lease refusals included): {}", failed.load(Ordering::Relaxed));
    println!("{:<58} {:>12} {:>12} {:>7}", "benchmark", "value", "baseline", "ratio");
    println!(
        "{:<58} {:>12.0} {:>12.0} {:>7.2}",
        "CommitUpload commits/s, 3-node (vs 1-node)",
        three_rate,
        one,
        three_rate / one
    );
    println!(
        "{:<58} {:>12.0} {:>12.0} {:>7.2}",
        "CommitUpload commits/s, 3-node (vs 3-member etcd puts/s)",
        three_rate,
        etcd_rate,
        three_rate / etcd_rate
    );
    println!(
        "{:<58} {:>12.0} {:>12.0} {:>7.2}",
        "commits/s, 3-node, edge client grouping (vs etcd puts/s)",
        edge_rate,
        etcd_rate,
        edge_rate / etcd_rate
    );
    println!(
        "{:<58} {:>12.0} {:>12.0} {:>7.2}",
        "  at 256 callers (vs etcd puts/s, 256 clients)",
        edge_rate_256,
        etcd_rate_256,
        edge_rate_256 / etcd_rate_256
    );
    println!(
        "{:<58} {:>12.0} {:>12.0} {:>7.2}",
        "  one call per commit, 256 callers (vs etcd, 256 clients)",
        grpc_rate_256,
        etcd_rate_256,
        grpc_rate_256 / etcd_rate_256
    );
    println!(
        "{:<58} {:>12.0} {:>12.0} {:>7.2}",
        "50 KiB uploads/s, mxcas serve (vs disk write+fsync/s)",
        upload_rate,
        disk_rate,
        upload_rate / disk_rate
    );
    println!(
        "{:<58} {:>12.0} {:>12.0} {:>7.2}",
        "CommitUpload commits/s, 3-node over mutual TLS (vs plain)",
        tls_rate,
        three_rate,
        tls_rate / three_rate
    );
    println!(
        "{:<58} {:>12.2} {:>12.2} {:>7.2}",
        "edge lookup p50 ms, uncached (vs cached)",
        percentile(&uncached, 0.5).as_secs_f64() * 1e3,
        percentile(&cached, 0.5).as_secs_f64() * 1e3,
        percentile(&uncached, 0.5).as_secs_f64() / percentile(&cached, 0.5).as_secs_f64()
    );
    println!(
        "{:<58} {:>12.2} {:>12.2} {:>7.2}",
        "edge lookup p99 ms, uncached (vs cached)",
        percentile(&uncached, 0.99).as_secs_f64() * 1e3,
        percentile(&cached, 0.99).as_secs_f64() * 1e3,
        percentile(&uncached, 0.99).as_secs_f64() / percentile(&cached, 0.99).as_secs_f64()
    );
    println!(
        "{:<58} {:>12}",
        format!("records in the state ({:.0}/s sustained)", written as f64 / write_secs),
        written
    );
    let max_rss = rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0;
    println!("{:<58} {:>12.0}", "meta RSS MiB, largest node", max_rss);
    println!("{:<58} {:>12.0}", "  scaled per million records", per_m(max_rss));
    let per_record = |b: u64| b as f64 / written.max(1) as f64;
    println!("{:<58} {:>12.0}", "bytes per record: snapshot (whole state, backup export)", per_record(snapshot_bytes));
    println!("{:<58} {:>12.0}", "bytes per record: state database on disk", per_record(state_bytes));
    println!(
        "{:<58} {:>12.0}",
        format!("bytes per record: log file on disk (last snapshot at index {snap_index})"),
        per_record(log_bytes)
    );
    println!(
        "{:<58} {:>12.1}",
        format!("new node caught up on {written} records, s ({})", if installed { "by snapshot" } else { "by log" }),
        install_secs
    );
    println!("{:<58} {:>12.1}", "  of which until add-learner returned, s", added_secs);
    applied?;
    anyhow::ensure!(caught_up == written, "the new node holds {caught_up} of {written} records");
    Ok(())
}
