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
