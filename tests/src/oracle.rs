//! IPFS's own importer (`ipfs-unixfs-importer` with the `unixfs-v1-2025` profile, pinned in
//! `tests/oracle/package-lock.json`) as the reference for CIDs.

use std::path::Path;
use std::process::Command;

use anyhow::Context;

fn oracle_dir() -> std::path::PathBuf {
    let fallback = Path::new(env!("CARGO_MANIFEST_DIR")).join("oracle");
    crate::required_program("MXCAS_ORACLE_DIR", Some(fallback).filter(|d| d.join("node_modules").exists()))
}

/// The root CID of each file, as IPFS tooling computes it.
pub fn cids(files: &[&Path]) -> anyhow::Result<Vec<String>> {
    let dir = oracle_dir();
    let out = Command::new("node")
        .arg(dir.join("cid.mjs"))
        .args(files)
        .output()
        .context("cannot run node (the test script installs the oracle)")?;
    anyhow::ensure!(out.status.success(), "oracle failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    Ok(text.lines().map(|l| l.split_whitespace().next().unwrap_or_default().to_owned()).collect())
}

/// Fetches each CID with `@helia/verified-fetch`, whose only source of blocks is the trustless
/// gateway at `gateway` (it verifies every block it is given). Returns each file's length and
/// sha2-256 (hex), in order.
pub fn verified_fetch(gateway: &str, cids: &[&str]) -> anyhow::Result<Vec<(u64, String)>> {
    let out = Command::new("node")
        .arg(oracle_dir().join("verified_fetch.mjs"))
        .arg(gateway)
        .args(cids)
        .output()
        .context("cannot run node (the test script installs @helia/verified-fetch)")?;
    anyhow::ensure!(out.status.success(), "verified-fetch failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    text.lines()
        .map(|l| {
            let mut parts = l.split_whitespace().skip(1);
            let len = parts.next().context("no length")?.parse()?;
            Ok((len, parts.next().context("no hash")?.to_owned()))
        })
        .collect()
}

/// What `@ipld/car` read: the roots, then each block's CID and length, in order.
pub type CarContents = (Vec<String>, Vec<(String, u64)>);

/// Reads a CAR file with `@ipld/car`, checking every block against its CID.
pub fn read_car(path: &Path) -> anyhow::Result<CarContents> {
    let out = Command::new("node")
        .arg(oracle_dir().join("read_car.mjs"))
        .arg(path)
        .output()
        .context("cannot run node (the test script installs @ipld/car)")?;
    anyhow::ensure!(out.status.success(), "@ipld/car refused the CAR: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    let roots = lines
        .next()
        .and_then(|l| l.strip_prefix("roots"))
        .context("no roots line")?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let blocks = lines
        .map(|l| {
            let (cid, len) = l.split_once(' ').context("block line")?;
            Ok((cid.to_owned(), len.parse()?))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((roots, blocks))
}
