//! A real Matrix client through a real reverse proxy, the way a homeserver's users meet
//! mxcas: matrix-nio (`tests/clients/nio_flow.py`, run by Synapse's venv python) is given
//! nginx's URL and nothing else; nginx sends the media paths to `mxcas serve` and the rest to
//! Synapse (its media repository off), and mxcas checks each token with Synapse's `whoami`.
//! Two users share a room; alice uploads a JPEG and a 5 MiB file and sends an `m.image`; bob
//! finds it by syncing, downloads both through the authenticated v1 endpoints (bytes compared
//! by SHA-256) and asks for thumbnails, which are decoded and held to the spec's size rules.

use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use mxcas_tests::nginx::Nginx;
use mxcas_tests::synapse::Synapse;
use mxcas_tests::{Node, NodeOptions};

const FLOW: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/nio_flow.py");

/// The steps `nio_flow.py` reports, in order, when everything passed.
const STEPS: [&str; 9] = [
    "login",
    "media_config",
    "room",
    "upload",
    "send",
    "bob_sync",
    "download",
    "thumbnail_crop_96x96",
    "thumbnail_scale_320x240",
];

struct Flow {
    status: ExitStatus,
    summary: serde_json::Value,
    stderr: String,
    command: String,
}

/// Runs the client flow against `homeserver` as the two users (`user:password` each).
async fn run_flow(homeserver: &str, alice: &str, bob: &str) -> anyhow::Result<Flow> {
    let python = mxcas_tests::required_program("SYNAPSE_PYTHON", None);
    let dir = tempfile::Builder::new().prefix("mxcas-nio-").tempdir()?;
    let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let args = ["--homeserver", homeserver, "--server-name", "localhost", "--alice", alice, "--bob", bob];
    let command = format!("{} {FLOW} {}", python.display(), args.join(" "));
    let mut child = Command::new(python)
        .arg(FLOW)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout)?)
        .stderr(std::fs::File::create(&stderr)?)
        .spawn()?;
    // The script bounds itself (240 s by default); this bounds an interpreter that hangs.
    let done = mxcas_tests::wait_for("nio_flow.py to finish", Duration::from_secs(300), || {
        let status = child.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    let status = match done {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{e}; stderr:\n{}", std::fs::read_to_string(&stderr).unwrap_or_default());
        }
    };
    let out = std::fs::read_to_string(&stdout)?;
    // Not JSON (the script crashed before printing its summary): keep the text for the message.
    let summary = serde_json::from_str::<serde_json::Value>(&out).unwrap_or(serde_json::Value::String(out));
    Ok(Flow { status, summary, stderr: std::fs::read_to_string(&stderr)?, command })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_nio_through_nginx_to_synapse_and_mxcas() -> anyhow::Result<()> {
    // mxcas's server_name is the homeserver's ("localhost" in both, as the harness writes
    // them), so the mxc URIs that uploads return are the homeserver's own.
    let hs = Synapse::start("localhost").await?;
    hs.register("alice", "alice-password-1")?;
    hs.register("bob", "bob-password-1")?;
    let node = Node::start(NodeOptions {
        auth: format!("homeserver_url = \"{}\"\n", hs.url),
        static_tokens: false,
        ..Default::default()
    })
    .await?;
    let nginx = Nginx::start(&[node.api.as_str()], &hs.url).await?;

    let flow = run_flow(&nginx.url, "alice:alice-password-1", "bob:bob-password-1").await?;
    let s = &flow.summary;
    assert!(
        flow.status.success() && s["ok"] == true,
        "the real client failed ({}): {}\n{s:#}\n\nreproduce: `scripts/test.sh matrix_nio_through_nginx`, or \
         by hand against running Synapse + mxcas + nginx:\n  {}\n==== synapse log ====\n{}",
        flow.status,
        flow.stderr,
        flow.command,
        hs.log()
    );
    assert_eq!(s["steps"], serde_json::json!(STEPS), "{s:#}");

    // What the client saw, repeated here so a regression reads plainly in the test output.
    assert_eq!(s["download"]["image"]["content_type"], "image/jpeg", "{s:#}");
    assert_eq!(s["download"]["file"]["bytes"], 5 * 1024 * 1024, "{s:#}");
    assert_eq!(s["download"]["image_named"]["filename"], "holiday.jpg", "{s:#}");
    let (crop, scale) = (&s["thumbnail_crop_96x96"], &s["thumbnail_scale_320x240"]);
    assert_eq!((crop["width"].as_u64(), crop["height"].as_u64()), (Some(96), Some(96)), "{s:#}");
    // The source is 1000x600: scaled into 320x240 it is 320x192 (±1 for rounding).
    assert_eq!(scale["width"], 320, "{s:#}");
    assert!(scale["height"].as_u64().is_some_and(|h| (191..=193).contains(&h)), "{s:#}");

    // Everything went through nginx, each path to its upstream: media to mxcas (the client's
    // downloads and thumbnails on the authenticated v1 endpoints), the rest to Synapse.
    let (mxcas_addr, synapse_addr) = (node.api.trim_start_matches("http://"), hs.url.trim_start_matches("http://"));
    let requests = nginx.requests();
    let media_prefixes = ["/_matrix/media/", "/_matrix/client/v1/media/", "/_matrix/federation/v1/media/"];
    for r in &requests {
        let want = if media_prefixes.iter().any(|p| r.uri.starts_with(*p)) { mxcas_addr } else { synapse_addr };
        assert_eq!(r.upstream, want, "{r:?} went to the wrong upstream\n{}", nginx.log());
    }
    let count = |method: &str, prefix: &str| {
        requests.iter().filter(|r| r.method == method && r.uri.starts_with(prefix) && r.status == 200).count()
    };
    assert_eq!(count("POST", "/_matrix/media/v3/upload"), 2, "{}", nginx.log());
    assert_eq!(count("GET", "/_matrix/client/v1/media/download/localhost/"), 3, "{}", nginx.log());
    assert_eq!(count("GET", "/_matrix/client/v1/media/thumbnail/localhost/"), 2, "{}", nginx.log());
    assert!(count("GET", "/_matrix/client/v3/sync") >= 2, "{}", nginx.log());

    // The tokens were the homeserver's, checked by asking it (alice's and bob's at least).
    assert!(node.metric("mxcas_edge_auth_checks_total{result=\"valid\"}").await? >= 2.0, "{}", node.log());
    Ok(())
}
