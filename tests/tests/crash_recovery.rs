//! No acknowledged upload is lost on `kill -9`: concurrent uploads run while the process is
//! killed without warning, twice; after each restart every upload that got a 200 downloads
//! byte-identical. Reproduce one test: `scripts/test.sh <test name>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mxcas_tests::node::ALICE;
use mxcas_tests::{Node, NodeOptions, test_bytes};
use tokio::sync::Mutex;

/// Sizes cycle through one-block and multi-block (multipart) uploads.
fn size_for(seed: u64) -> usize {
    [1_000, 200_000, 1_048_576, 1_500_000, 9 * 1_048_576 + 3][(seed % 5) as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_uploads_survive_kill_9() -> anyhow::Result<()> {
    let mut node = Node::start(NodeOptions::default()).await?;
    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let next_seed = Arc::new(AtomicU64::new(1));

    for round in 0..2 {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for _ in 0..6 {
            let (http, url) = (node.http.clone(), node.url("/_matrix/media/v3/upload"));
            let (acked, failed, next_seed, stop) = (acked.clone(), failed.clone(), next_seed.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let seed = next_seed.fetch_add(1, Ordering::Relaxed);
                    let body = test_bytes(seed, size_for(seed));
                    let sent =
                        http.post(&url).bearer_auth(ALICE).body(body).timeout(Duration::from_secs(30)).send().await;
                    let ok = match sent {
                        Ok(resp) if resp.status() == 200 => resp.json::<serde_json::Value>().await.ok().and_then(|j| {
                            j["content_uri"]
                                .as_str()
                                .and_then(|u| u.strip_prefix("mxc://localhost/"))
                                .map(str::to_owned)
                        }),
                        _ => None,
                    };
                    match ok {
                        Some(id) => acked.lock().await.push((id, seed)),
                        None => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }));
        }
        // Let uploads get going, then pull the plug while they are in flight.
        tokio::time::sleep(Duration::from_millis(1500 + 500 * round)).await;
        node.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.await?;
        }
        node.restart().await?;

        let acked = acked.lock().await.clone();
        anyhow::ensure!(acked.len() > 10, "too few uploads were acknowledged to prove anything: {}", acked.len());
        let mut lost = 0;
        for (id, seed) in &acked {
            let resp = node.download(id).await?;
            let ok =
                resp.status() == 200 && resp.bytes().await?.as_ref() == test_bytes(*seed, size_for(*seed)).as_slice();
            if !ok {
                lost += 1;
                eprintln!("LOST: {id} (seed {seed})");
            }
        }
        println!("round {round}: acknowledged {}, failed {}, lost {lost}", acked.len(), failed.load(Ordering::Relaxed));
        assert_eq!(lost, 0, "acknowledged uploads were lost after kill -9");
    }
    Ok(())
}
