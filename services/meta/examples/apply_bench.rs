//! Per-command cost of two pieces of the metadata write path, in-process (no network, no
//! raft): encoding and decoding a raft entry of a batch (JSON, the old log and RPC encoding, vs
//! postcard), and applying batches of commits to a fresh state database (not fsynced, as
//! followers and leaders apply between durable points).
//!
//!   cargo run --release -p mxcas-meta --example apply_bench        # BATCH=256 N=200000
use std::time::Instant;

use cid::Cid;
use mxcas_meta::model::blob_key;
use mxcas_meta::{Command, ContentRecord, StateMachine};
use sha2::Digest;

fn commit(n: u64) -> Command {
    let digest = sha2::Sha256::digest(n.to_le_bytes());
    let mh = cid::multihash::Multihash::<64>::wrap(0x12, &digest).expect("a sha2-256 digest fits");
    Command::CommitUpload {
        server_name: "localhost".into(),
        media_id: None,
        user_id: "@bench:localhost".into(),
        now_ms: 1,
        content: ContentRecord {
            cid: Cid::new_v1(0x55, mh),
            size: 8,
            chunk_size: 1 << 20,
            blob_key: blob_key::new(1, &format!("bench{n:016x}")),
            index_key: None,
            refcount: 0,
            created_at_ms: 1,
            lost: false,
        },
        content_type: "application/octet-stream".into(),
        filename: None,
        lost_key: None,
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Microseconds per command to encode and decode `batch` (of `size` commands) 100 times,
/// checking the round trip; and the encoded bytes per command.
fn codec(
    batch: &Command,
    size: u64,
    encode: impl Fn(&Command) -> Vec<u8>,
    decode: impl Fn(&[u8]) -> Command,
) -> (f64, u64) {
    let started = Instant::now();
    let mut len = 0;
    for _ in 0..100 {
        let bytes = encode(batch);
        assert_eq!(&decode(&bytes), batch, "round trip");
        len = bytes.len() as u64;
    }
    (started.elapsed().as_secs_f64() * 1e6 / (100 * size) as f64, len / size)
}

fn main() {
    let size = env("BATCH", 256);
    let total = env("N", 200_000);
    let batch = Command::Batch((0..size).map(commit).collect());
    let (json_us, json_len) = codec(
        &batch,
        size,
        |c| serde_json::to_vec(c).expect("JSON encodes"),
        |b| serde_json::from_slice(b).expect("JSON decodes"),
    );
    let (pc_us, pc_len) = codec(
        &batch,
        size,
        |c| postcard::to_stdvec(c).expect("postcard encodes"),
        |b| postcard::from_bytes(b).expect("postcard decodes"),
    );
    println!(
        "entry encode+decode per command: JSON {json_us:.2} µs ({json_len} B), postcard {pc_us:.2} µs ({pc_len} B)"
    );

    let dir = tempfile::tempdir().expect("a temporary directory");
    let sm = StateMachine::open(&dir.path().join("state.redb")).expect("a new state database");
    let started = Instant::now();
    let (mut index, mut n) = (0, 0);
    while n < total {
        let cmd = Command::Batch((n..n + size).map(commit).collect());
        index += 1;
        let (out, _) = sm.apply_entries_with_changes(&[(index, Some(&cmd))], &[], false).expect("applies");
        assert!(matches!(&out[0], Some(Ok(_))), "batch {index} refused: {:?}", out[0]);
        n += size;
        if n % 50_000 < size {
            eprintln!("  {n} applied, {:.1} µs per command so far", started.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
    }
    println!("apply per command (batches of {size}): {:.1} µs", started.elapsed().as_secs_f64() * 1e6 / n as f64);
}
