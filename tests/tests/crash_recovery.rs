//! No acknowledged upload is lost on `kill -9`: concurrent uploads run while the process is
//! killed without warning, twice; after each restart every upload that got a 200 downloads
//! byte-identical. Reproduce one test: `scripts/test.sh <test name>`.

use std::time::Duration;

use mxcas_tests::load::{Load, lost};
use mxcas_tests::{Node, NodeOptions};

/// One-block and multi-block (multipart: over 8 MiB) uploads.
const SIZES: &[usize] = &[1_000, 200_000, 1_048_576, 1_500_000, 9 * 1_048_576 + 3];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_uploads_survive_kill_9() -> anyhow::Result<()> {
    let mut node = Node::start(NodeOptions::default()).await?;
    let mut all_acked = Vec::new();
    for round in 0..2u64 {
        let load = Load::start(&[&node], 6, 1 + round * 1_000_000, SIZES);
        // Let uploads get going, then pull the plug while they are in flight.
        tokio::time::sleep(Duration::from_millis(1500 + 500 * round)).await;
        node.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (acked, failed) = load.stop().await?;
        node.restart().await?;
        all_acked.extend(acked);
        anyhow::ensure!(
            all_acked.len() > 10,
            "too few uploads were acknowledged to prove anything: {}",
            all_acked.len()
        );
        let lost = lost(&all_acked, &[&node], SIZES).await?;
        println!("round {round}: acknowledged {} so far, failed {failed} this round, lost {lost}", all_acked.len());
        assert_eq!(lost, 0, "acknowledged uploads were lost after kill -9");
    }
    Ok(())
}
