//! Two homeservers served by one mxcas: two real Synapses (`localhost` and `two.localhost`),
//! the tenant chosen by the request's `Host`. One homeserver's token means nothing to the
//! other's tenant, uploads land under the requesting tenant's server name, another tenant's
//! media IDs cannot be filled, media of every tenant is downloadable by the users of any, and
//! each tenant has its own limits.

use mxcas_tests::synapse::Synapse;
use mxcas_tests::{Node, NodeOptions};

const ONE: &str = "localhost";
const TWO: &str = "two.localhost";

struct Answer {
    status: u16,
    json: serde_json::Value,
}

async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    Answer { status, json: resp.json().await.unwrap_or(serde_json::Value::Null) }
}

async fn upload(node: &Node, host: &str, token: &str, body: Vec<u8>) -> anyhow::Result<Answer> {
    let req = node.http.post(node.url("/_matrix/media/v3/upload")).header("host", host).bearer_auth(token).body(body);
    Ok(answer(req.send().await?).await)
}

fn errcode(a: &Answer) -> &str {
    a.json["errcode"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_homeserver_is_a_tenant_of_its_own() -> anyhow::Result<()> {
    let (one, two) = tokio::try_join!(Synapse::start(ONE), Synapse::start(TWO))?;
    let node = Node::start(NodeOptions {
        static_tokens: false,
        extra: format!(
            "[[tenants]]\nserver_name = \"{ONE}\"\nhomeserver_url = \"{}\"\n\
             [[tenants]]\nserver_name = \"{TWO}\"\nhomeserver_url = \"{}\"\nhosts = [\"{TWO}\", \"media.two.localhost\"]\n\
             max_upload_size = \"1 KiB\"\n",
            one.url, two.url
        ),
        ..Default::default()
    })
    .await?;
    one.register("alice", "alice-password")?;
    two.register("bob", "bob-password")?;
    let alice = one.login("alice", "alice-password").await?;
    let bob = two.login("bob", "bob-password").await?;

    // Uploads land under the requesting tenant's server name (with or without a port in Host).
    let a = upload(&node, ONE, &alice, b"alice's file".to_vec()).await?;
    assert_eq!(a.status, 200, "{}", a.json);
    let alice_mxc = a.json["content_uri"].as_str().unwrap_or_default().to_owned();
    assert!(alice_mxc.starts_with("mxc://localhost/"), "{alice_mxc}");
    let b = upload(&node, "media.two.localhost:443", &bob, b"bob's file".to_vec()).await?;
    assert_eq!(b.status, 200, "{}", b.json);
    let bob_mxc = b.json["content_uri"].as_str().unwrap_or_default().to_owned();
    assert!(bob_mxc.starts_with("mxc://two.localhost/"), "{bob_mxc}");

    // One homeserver's token means nothing to the other's tenant.
    let cross = upload(&node, TWO, &alice, b"alice at two".to_vec()).await?;
    assert_eq!((cross.status, errcode(&cross)), (401, "M_UNKNOWN_TOKEN"), "{}", cross.json);
    let cross = upload(&node, ONE, &bob, b"bob at one".to_vec()).await?;
    assert_eq!((cross.status, errcode(&cross)), (401, "M_UNKNOWN_TOKEN"), "{}", cross.json);

    // A media ID reserved at two is two's: whatever the Host, two's homeserver checks the token
    // of whoever fills it.
    let created = answer(
        node.http.post(node.url("/_matrix/media/v1/create")).header("host", TWO).bearer_auth(&bob).send().await?,
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.json);
    let reserved = created.json["content_uri"].as_str().unwrap_or_default().to_owned();
    assert!(reserved.starts_with("mxc://two.localhost/"), "{reserved}");
    let path = reserved.trim_start_matches("mxc://");
    let put = node
        .http
        .put(node.url(&format!("/_matrix/media/v3/upload/{path}")))
        .header("host", ONE)
        .bearer_auth(&alice)
        .body("alice's bytes")
        .send()
        .await?;
    let put = answer(put).await;
    assert_eq!((put.status, errcode(&put)), (401, "M_UNKNOWN_TOKEN"), "{}", put.json);
    let put = node
        .http
        .put(node.url(&format!("/_matrix/media/v3/upload/{path}")))
        .header("host", ONE)
        .bearer_auth(&bob)
        .body("bob's bytes")
        .send()
        .await?;
    assert_eq!(put.status(), 200, "bob fills his own reservation, whichever Host");

    // Media of every tenant is local: alice (at one) downloads bob's (at two).
    let bob_path = bob_mxc.trim_start_matches("mxc://");
    let got = node
        .http
        .get(node.url(&format!("/_matrix/client/v1/media/download/{bob_path}")))
        .header("host", ONE)
        .bearer_auth(&alice)
        .send()
        .await?;
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await?.as_ref(), b"bob's file");

    // Each tenant's limits: two takes at most 1 KiB, one the default.
    let config = |host: &'static str, token: String| {
        let req = node.http.get(node.url("/_matrix/client/v1/media/config")).header("host", host).bearer_auth(token);
        async move { anyhow::Ok(answer(req.send().await?).await) }
    };
    assert_eq!(config(TWO, bob.clone()).await?.json["m.upload.size"], 1024);
    assert_eq!(config(ONE, alice.clone()).await?.json["m.upload.size"], 100 * 1024 * 1024);
    let big = upload(&node, TWO, &bob, vec![7u8; 2048]).await?;
    assert_eq!((big.status, errcode(&big)), (413, "M_TOO_LARGE"), "{}", big.json);
    assert_eq!(upload(&node, ONE, &alice, vec![7u8; 2048]).await?.status, 200);

    // A Host naming no tenant is refused before any homeserver sees the token (handing it to
    // some default tenant would get another homeserver's users an "unknown token").
    let other = upload(&node, "unknown.example", &alice, b"via an unknown host".to_vec()).await?;
    assert_eq!((other.status, errcode(&other)), (404, "M_UNRECOGNIZED"), "{}", other.json);
    Ok(())
}
