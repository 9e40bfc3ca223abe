//! Process lifecycle: graceful shutdown on SIGTERM, data kept across a clean restart, config
//! errors reported before any port is bound. Reproduce one test: `scripts/test.sh <test name>`.

use std::process::Command;
use std::time::Duration;

use mxcas_tests::node::mxcas_bin;
use mxcas_tests::{Node, NodeOptions, test_bytes};

#[tokio::test]
async fn sigterm_stops_cleanly_and_data_survives_restart() -> anyhow::Result<()> {
    let mut node = Node::start(NodeOptions::default()).await?;
    let data = test_bytes(42, 2 * 1024 * 1024 + 1);
    let id = node.upload_ok(data.clone()).await?;
    let status = node.terminate(Duration::from_secs(15))?;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(node.log().contains("shutting down"));
    node.restart().await?;
    assert_eq!(node.download(&id).await?.bytes().await?.as_ref(), data.as_slice());
    Ok(())
}

#[test]
fn bad_config_fails_fast_with_a_clear_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("listen_adress = \"127.0.0.1:1\"\n", "unknown field"),
        ("[media]\nmax_upload_size = \"lots\"\n", "max_upload_size"),
        ("server_name = \"bad name\"\n", "server_name"),
        ("[auth]\ntokens = { \"short\" = \"@a:b\" }\n", "shorter than 8"),
        ("[media]\nfreeze_legacy_download_after = \"yesterday\"\n", "freeze_legacy_download_after"),
        ("[store]\nbackend = \"s3\"\n", "bucket"),
        ("[media]\nuser_files_per_period = 3\n", "quota_info_uri"),
        ("[media]\ntenant_bytes_per_period = \"1 GiB\"\n", "quota_admin_contact"),
        // Static tokens where homeservers' are the only ones.
        (
            "[auth]\ntokens = { \"long-enough-token\" = \"@a:localhost\" }\n\
             [[tenants]]\nserver_name = \"localhost\"\nhomeserver_url = \"http://127.0.0.1:1\"\n",
            "cannot be used with [[tenants]]",
        ),
        (
            "[auth]\ntokens = { \"long-enough-token\" = \"@a:localhost\" }\nhomeserver_url = \"http://127.0.0.1:1\"\n",
            "cannot be used with [auth] homeserver_url",
        ),
        (
            "[auth]\nhomeserver_url = \"http://127.0.0.1:1\"\n\
             [[tenants]]\nserver_name = \"other.example\"\nhomeserver_url = \"http://127.0.0.1:1\"\n",
            "homeserver_url cannot be used with [[tenants]]",
        ),
        (
            "[[tenants]]\nserver_name = \"localhost\"\nhomeserver_url = \"http://127.0.0.1:1\"\nsigning_key_file = \"/nonexistent/key\"\n",
            "signing_key_file",
        ),
    ];
    for (config, expect) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            format!(
                "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{config}",
                dir.path().join("d").display()
            ),
        )?;
        let out = Command::new(mxcas_bin()).arg("serve").arg("--config").arg(&path).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{config:?} was accepted");
        assert!(stderr.contains(expect), "{config:?}: expected {expect:?} in: {stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("Matrix media API on"), "{config:?} bound a port");
    }
    Ok(())
}

#[test]
fn help_documents_the_defaults() -> anyhow::Result<()> {
    let out = Command::new(mxcas_bin()).args(["serve", "--help"]).output()?;
    let help = String::from_utf8(out.stdout)?;
    for needle in ["--config", "MXCAS_CONFIG", "127.0.0.1:8008", "./mxcas-data", "--dev-token", "localhost"] {
        assert!(help.contains(needle), "`mxcas serve --help` lacks {needle}:\n{help}");
    }
    Ok(())
}
