//! Upload quotas held in the metadata service, so they hold across edges: a replicated
//! metadata cluster of one node, two `mxcas edge` processes over one SeaweedFS bucket, and a
//! user who spreads their uploads over both.

use mxcas_tests::cluster::{Cluster, MetaOptions};
use mxcas_tests::node::{ALICE, BOB};
use mxcas_tests::s3::SeaweedFs;
use mxcas_tests::{Node, NodeOptions, test_bytes};

async fn upload(node: &Node, token: &str, body: Vec<u8>) -> anyhow::Result<(u16, serde_json::Value)> {
    let resp = node.http.post(node.url("/_matrix/media/v3/upload")).bearer_auth(token).body(body).send().await?;
    Ok((resp.status().as_u16(), resp.json().await.unwrap_or(serde_json::Value::Null)))
}

async fn create(node: &Node, token: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let resp = node.http.post(node.url("/_matrix/media/v1/create")).bearer_auth(token).send().await?;
    Ok((resp.status().as_u16(), resp.json().await.unwrap_or(serde_json::Value::Null)))
}

fn errcode(j: &serde_json::Value) -> &str {
    j["errcode"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_across_edges_and_refuse_before_costing_a_write() -> anyhow::Result<()> {
    let s3 = SeaweedFs::start().await?;
    let cluster = Cluster::start(1, MetaOptions::default()).await?;
    // alice: 3 files a day; everyone at localhost together: 5.
    let media = "user_files_per_period = 3\ntenant_files_per_period = 5\nquota_info_uri = \"https://example.org/quota\"\n\
         quota_admin_contact = \"mailto:admin@example.org\"\n";
    let edge = || {
        Node::start(NodeOptions {
            store: s3.store(),
            edge_meta: cluster.endpoints(),
            media: media.into(),
            ..Default::default()
        })
    };
    let (a, b) = (edge().await?, edge().await?);

    // A reservation made while alice has room, to fill once she has none.
    let (s, j) = create(&a, ALICE).await?;
    assert_eq!(s, 200, "{j}");
    let reserved = j["content_uri"].as_str().unwrap_or_default().trim_start_matches("mxc://").to_owned();

    // Three uploads spread over both edges fit; the fourth, on either, does not.
    for (i, node) in [&a, &b, &a].into_iter().enumerate() {
        let (s, j) = upload(node, ALICE, test_bytes(i as u64, 1000)).await?;
        assert_eq!(s, 200, "upload {i}: {j}");
    }
    for node in [&a, &b] {
        let (s, j) = upload(node, ALICE, test_bytes(10, 1000)).await?;
        assert_eq!((s, errcode(&j)), (403, "M_USER_LIMIT_EXCEEDED"), "{j}");
        assert_eq!(j["info_uri"], "https://example.org/quota");
    }
    for node in [&a, &b] {
        assert_eq!(node.metric("mxcas_edge_uploads_total{result=\"refused\"}").await?, 1.0, "counted as refused");
    }
    // The same bytes again make no new media: not refused, not counted.
    let (s, j) = upload(&b, ALICE, test_bytes(0, 1000)).await?;
    assert_eq!(s, 200, "{j}");
    // /create over the quota is refused before it costs a raft write.
    // (An entry from elsewhere can land in between, such as a commit retried under load whose
    // first attempt applies late: a refused /create that writes fails every try.)
    let mut wrote = Vec::new();
    for _ in 0..3 {
        let applied = cluster.metas[0].state().await?.last_applied;
        let (s, j) = create(&b, ALICE).await?;
        assert_eq!((s, errcode(&j)), (403, "M_USER_LIMIT_EXCEEDED"), "{j}");
        wrote.push(cluster.metas[0].state().await?.last_applied - applied);
        if wrote.last() == Some(&0) {
            break;
        }
    }
    assert_eq!(wrote.last(), Some(&0), "a refused /create wrote to the log each time: {wrote:?}");

    // bob's two uploads fill the tenant's five; his third is over the tenant's quota.
    for (seed, node) in [(20, &b), (21, &a)] {
        let (s, j) = upload(node, BOB, test_bytes(seed, 1000)).await?;
        assert_eq!(s, 200, "{j}");
    }
    let (s, j) = upload(&b, BOB, test_bytes(30, 1000)).await?;
    assert_eq!((s, errcode(&j)), (403, "M_RESOURCE_LIMIT_EXCEEDED"), "{j}");
    assert_eq!(j["admin_contact"], "mailto:admin@example.org");

    // Filling the early reservation would be a new file over alice's quota: refused.
    let put = b
        .http
        .put(b.url(&format!("/_matrix/media/v3/upload/{reserved}")))
        .bearer_auth(ALICE)
        .body(test_bytes(40, 1000));
    let resp = put.send().await?;
    let status = resp.status().as_u16();
    let j: serde_json::Value = resp.json().await.unwrap_or_default();
    assert_eq!((status, errcode(&j)), (403, "M_USER_LIMIT_EXCEEDED"), "{j}");
    Ok(())
}
