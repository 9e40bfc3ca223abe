//! mxcas-tests: the end-to-end harness.
//!
//! Starts the real `mxcas` binary with a generated config in a temp dir, on ports the OS
//! chooses (read back from the process's own "listening" line), polls readiness against a
//! deadline, keeps a log file per process and prints it when a test fails, and always kills
//! what it started (SIGTERM, then SIGKILL). [`s3::SeaweedFs`] does the same for a real
//! S3-compatible server; [`oracle`] runs IPFS's own importer for reference CIDs.
//!
//! External programs come from the environment that `scripts/test.sh` sets up:
//! `MXCAS_BIN` (else `target/<profile>/mxcas` next to the test binary), `WEED_BIN`,
//! `MXCAS_ORACLE_DIR`, `SYNAPSE_PYTHON` (with matrix-nio in its venv), `NGINX_BIN`.

pub mod cluster;
pub mod etcd;
pub mod load;
pub mod nginx;
pub mod node;
pub mod oracle;
pub mod pki;
pub mod proxy;
pub mod s3;
pub mod synapse;

pub use node::{Node, NodeOptions, Store};

use std::time::Duration;

/// Deterministic pseudo-random bytes (ChaCha8 keyed by `seed`).
pub fn test_bytes(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Path of a program the test script installs, from `var`, with advice when it is missing.
pub fn required_program(var: &str, fallback: Option<std::path::PathBuf>) -> std::path::PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    if let Some(p) = fallback.filter(|p| p.exists()) {
        return p;
    }
    panic!("{var} is not set: run the tests with `scripts/test.sh`, which installs what they need and sets it");
}
