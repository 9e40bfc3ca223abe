//! Verified multi-source fetch: `ipfs:` media from one throttled trustless gateway vs three
//! (each throttled to the same bandwidth), and three plus one that lies about every block
//! (issue 9's goal: at least 2.5× from three; a liar costs only retries).
//!
//! The content is made by IPFS's own importer with its default settings (256 KiB chunks) and
//! served by `tests/oracle/plain_gateway.mjs`, each listener paced to BENCH_RATE bytes/s
//! (default 4 MB/s) over all its connections. Every download is of a new mxc (another server
//! name), so each one fetches from the gateways; every answer is compared with the file.
//!
//! Run with `scripts/bench-multi-source.sh` (release binaries). Bounded: about a minute.

use std::time::Instant;

use anyhow::ensure;
use mxcas_tests::oracle::PlainGateways;
use mxcas_tests::{Node, NodeOptions, test_bytes};

async fn fetch_secs(node: &Node, server: &str, root: &str, data: &[u8]) -> anyhow::Result<f64> {
    let url = node.url(&format!("/_matrix/client/v1/media/download/{server}/ipfs:{root}"));
    let t = Instant::now();
    let resp = node.http.get(url).bearer_auth(mxcas_tests::node::ALICE).send().await?;
    ensure!(resp.status() == 200, "download answered {}: {}", resp.status(), resp.text().await?);
    let body = resp.bytes().await?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(body.as_ref() == data, "the download is not the file");
    Ok(secs)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mib: usize = std::env::var("BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(24);
    let rate: u64 = std::env::var("BENCH_RATE").ok().and_then(|s| s.parse().ok()).unwrap_or(4_000_000);
    let data = test_bytes(90, mib << 20);
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &data)?;
    let paced = format!("rate={rate}");
    let gw = PlainGateways::start(file.path(), false, &[&paced, &paced, &paced, "lie"])?;
    let mut node = Node::start(NodeOptions::default()).await?;
    let base = node.opts.clone();
    let run = |urls: Vec<String>, server: &'static str| {
        let list = urls.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
        let mut opts = base.clone();
        opts.media = format!("max_upload_size = \"{} MiB\"\n", mib + 1);
        opts.extra = format!("[ipfs]\ngateways = [{list}]\n");
        (opts, server)
    };
    let scenarios = [
        ("one gateway", run(gw.urls[..1].to_vec(), "one.example")),
        ("three gateways", run(gw.urls[..3].to_vec(), "three.example")),
        (
            "three + a liar",
            run(vec![gw.urls[3].clone(), gw.urls[0].clone(), gw.urls[1].clone(), gw.urls[2].clone()], "liar.example"),
        ),
    ];
    eprintln!("== {mib} MiB, gateways paced to {:.1} MB/s each", rate as f64 / 1e6);
    let mut secs = Vec::new();
    for (name, (opts, server)) in scenarios {
        node.restart_with(opts).await?;
        let s = fetch_secs(&node, server, &gw.root, &data).await?;
        let bad = node.metric("mxcas_edge_gateway_blocks_total{result=\"bad\"}").await?;
        println!("  {name:<16} {s:6.2} s  {:6.1} MB/s  (blocks refused: {bad})", data.len() as f64 / s / 1e6);
        secs.push(s);
    }
    println!(
        "speed-up of three gateways over one: {:.2}x; three + a liar vs three: {:.2}x the time",
        secs[0] / secs[1],
        secs[2] / secs[1]
    );
    Ok(())
}
