//! Upload load for failure tests: workers upload deterministic files (seeded, so any one can
//! be regenerated to compare) through one or more mxcas API endpoints until stopped, and
//! record which uploads were acknowledged; [`lost`] checks every acknowledged one downloads
//! byte-identical.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;

use crate::node::ALICE;
use crate::{Node, test_bytes};

/// The size of upload `seed` when sizes cycle through `sizes`.
pub fn size_for(sizes: &[usize], seed: u64) -> usize {
    sizes[(seed % sizes.len() as u64) as usize]
}

type Acked = Arc<Mutex<Vec<(String, u64)>>>;

/// Uploads through `edges` (round robin) until `stop`; records what got a 200.
pub struct Load {
    sizes: &'static [usize],
    acked: Acked,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(edges: &[&Node], workers: usize, seed_base: u64, sizes: &'static [usize]) -> Load {
        let acked: Acked = Arc::default();
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(seed_base));
        let targets: Vec<(reqwest::Client, String)> =
            edges.iter().map(|e| (e.http.clone(), e.url("/_matrix/media/v3/upload"))).collect();
        let mut handles = Vec::new();
        for w in 0..workers {
            let (acked, failed, stop, next, targets) =
                (acked.clone(), failed.clone(), stop.clone(), next.clone(), targets.clone());
            handles.push(tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let (http, url) = &targets[i % targets.len()];
                    i += 1;
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    let body = test_bytes(seed, size_for(sizes, seed));
                    let sent =
                        http.post(url).bearer_auth(ALICE).body(body).timeout(Duration::from_secs(30)).send().await;
                    let id = match sent {
                        Ok(r) if r.status() == 200 => r.json::<serde_json::Value>().await.ok().and_then(|j| {
                            j["content_uri"]
                                .as_str()
                                .and_then(|u| u.strip_prefix("mxc://localhost/"))
                                .map(str::to_owned)
                        }),
                        Ok(r) => {
                            let status = r.status();
                            eprintln!("load: upload {seed} failed: {status} {}", r.text().await.unwrap_or_default());
                            None
                        }
                        Err(e) => {
                            eprintln!("load: upload {seed} failed: {e}");
                            None
                        }
                    };
                    match id {
                        Some(id) => acked.lock().await.push((id, seed)),
                        None => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        Load { sizes, acked, failed, stop, workers: handles }
    }

    /// How many uploads have been acknowledged so far.
    pub async fn acked(&self) -> usize {
        self.acked.lock().await.len()
    }

    /// The sizes this load cycles through (for [`lost`]).
    pub fn sizes(&self) -> &'static [usize] {
        self.sizes
    }

    /// Stops the workers; returns `(acknowledged (media ID, seed) pairs, failed attempts)`.
    pub async fn stop(self) -> anyhow::Result<(Vec<(String, u64)>, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await?;
        }
        let acked = self.acked.lock().await.clone();
        Ok((acked, self.failed.load(Ordering::Relaxed)))
    }
}

/// Every acknowledged upload downloads byte-identical from every edge; returns how many did not.
pub async fn lost(acked: &[(String, u64)], edges: &[&Node], sizes: &[usize]) -> anyhow::Result<usize> {
    use futures::StreamExt;
    let checks =
        acked.iter().flat_map(|(id, seed)| edges.iter().map(move |e| (id.clone(), *seed, e.http.clone(), e.url(""))));
    let lost = futures::stream::iter(checks)
        .map(|(id, seed, http, base)| async move {
            let url = format!("{base}/_matrix/client/v1/media/download/localhost/{id}");
            let ok = match http.get(&url).bearer_auth(ALICE).send().await {
                Ok(r) if r.status() == 200 => {
                    r.bytes().await.is_ok_and(|b| b.as_ref() == test_bytes(seed, size_for(sizes, seed)).as_slice())
                }
                _ => false,
            };
            if !ok {
                eprintln!("LOST: {id} (seed {seed}) via {base}");
            }
            usize::from(!ok)
        })
        .buffer_unordered(16)
        .fold(0, |n, x| async move { n + x })
        .await;
    Ok(lost)
}
