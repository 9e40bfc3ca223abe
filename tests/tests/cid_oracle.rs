//! mxcas names files exactly as IPFS tooling does (`ipfs-unixfs-importer`, profile
//! `unixfs-v1-2025`): at the boundary sizes and for a file big enough to need a second tree
//! level (more than 1024 leaves), both through `mxcas cid` and through a real upload.
//! Reproduce one test: `scripts/test.sh <test name>`.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use mxcas_tests::{Node, NodeOptions, oracle, test_bytes};

const MIB: usize = 1024 * 1024;

fn mxcas_cid(files: &[&Path]) -> anyhow::Result<Vec<String>> {
    let out = Command::new(mxcas_tests::node::mxcas_bin()).arg("cid").args(files).output()?;
    anyhow::ensure!(out.status.success(), "mxcas cid failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.lines().map(|l| l.split_whitespace().next().unwrap_or("").to_owned()).collect())
}

#[tokio::test]
async fn boundary_sizes_match_ipfs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sizes = [0, 1, 1000, MIB - 1, MIB, MIB + 1, 2 * MIB, 3 * MIB + 5];
    let mut paths = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let p = dir.path().join(format!("f{size}"));
        std::fs::write(&p, test_bytes(i as u64, *size))?;
        paths.push(p);
    }
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let want = oracle::cids(&refs)?;
    let got = mxcas_cid(&refs)?;
    assert_eq!(got, want, "mxcas cid vs ipfs-unixfs-importer for sizes {sizes:?}");
    assert!(want[..5].iter().all(|c| c.starts_with("bafkrei")), "one-block files are raw leaves: {want:?}");
    assert!(want[5..].iter().all(|c| c.starts_with("bafybei")), "larger files are dag-pb roots: {want:?}");

    let node = Node::start(NodeOptions::default()).await?;
    for (path, want) in paths.iter().zip(&want) {
        let id = node.upload_ok(std::fs::read(path)?).await?;
        assert_eq!(&id, want, "upload of {}", path.display());
    }
    Ok(())
}

#[tokio::test]
async fn two_level_dag_matches_ipfs() -> anyhow::Result<()> {
    // 1025 full leaves and a partial one: the root links two interior nodes.
    let size = 1025 * MIB + 7;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("big");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for i in 0..size.div_ceil(8 * MIB) {
            let n = (size - i * 8 * MIB).min(8 * MIB);
            f.write_all(&test_bytes(1000 + i as u64, n))?;
        }
        f.flush()?;
    }
    let want = oracle::cids(&[&path])?;
    let got = mxcas_cid(&[&path])?;
    assert_eq!(got, want);

    let node = Node::start(NodeOptions { media: "max_upload_size = \"2 GiB\"".into(), ..Default::default() }).await?;
    let body = reqwest::Body::from(tokio::fs::File::open(&path).await?);
    let resp = node
        .http
        .post(node.url("/_matrix/media/v3/upload"))
        .bearer_auth(mxcas_tests::node::ALICE)
        .header("content-length", size.to_string())
        .body(body)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let json: serde_json::Value = resp.json().await?;
    assert_eq!(json["content_uri"].as_str(), Some(format!("mxc://localhost/{}", want[0]).as_str()));

    // The last bytes, from the last block of the second interior node.
    let resp = node.download_range(&want[0], "bytes=-100").await?;
    assert_eq!(resp.status(), 206);
    let tail = resp.bytes().await?;
    let file = std::fs::read(&path)?;
    assert_eq!(tail.as_ref(), &file[size - 100..]);
    Ok(())
}
