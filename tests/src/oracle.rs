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

/// Plain trustless gateways (`tests/oracle/plain_gateway.mjs`) serving one file as IPFS's own
/// importer made it, each listener behaving as its mode says (`ok`, `rate=N` bytes/s, `lie`,
/// `stall`, `absent`). Killed on drop.
pub struct PlainGateways {
    child: std::process::Child,
    /// The root CID the importer gave the file.
    pub root: String,
    /// One URL per mode, in order.
    pub urls: Vec<String>,
}

impl PlainGateways {
    /// Imports `file` with the importer's defaults (256 KiB chunks, CIDv1, raw leaves), or as
    /// kubo long did (`legacy`: CIDv0, dag-pb leaves, 174 links), and serves it.
    pub fn start(file: &Path, legacy: bool, modes: &[&str]) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let mut cmd = Command::new("node");
        cmd.arg(oracle_dir().join("plain_gateway.mjs")).arg(file);
        if legacy {
            cmd.arg("--legacy");
        }
        for m in modes {
            cmd.args(["--gateway", m]);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot run node (the test script installs the importer)")?;
        let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut next = || -> anyhow::Result<String> { Ok(lines.next().context("the gateway exited early")??) };
        let root = next()?;
        let urls = modes.iter().map(|_| next()).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { child, root, urls })
    }
}

impl Drop for PlainGateways {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
