//! Access tokens checked with a real homeserver: Synapse (sqlite, loopback, its media
//! repository off, as operators run it behind an external one) issues the tokens, and
//! `mxcas serve` asks its `whoami` who they belong to.

use std::time::Duration;

use mxcas_tests::proxy::LinkProxy;
use mxcas_tests::synapse::{AS_TOKEN, Synapse};
use mxcas_tests::{Node, NodeOptions};

async fn status_and_json(resp: reqwest::Response) -> (u16, serde_json::Value, Option<String>) {
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let json = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, json, retry)
}

struct Client<'a> {
    node: &'a Node,
}

impl Client<'_> {
    async fn upload(
        &self,
        token: Option<&str>,
        query: &str,
        body: &'static [u8],
    ) -> (u16, serde_json::Value, Option<String>) {
        let mut req = self.node.http.post(self.node.url(&format!("/_matrix/media/v3/upload{query}"))).body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        status_and_json(req.send().await.expect("upload")).await
    }

    async fn create(&self, token: &str, query: &str) -> String {
        let resp = self
            .node
            .http
            .post(self.node.url(&format!("/_matrix/media/v1/create{query}")))
            .bearer_auth(token)
            .send()
            .await
            .expect("create");
        let (status, json, _) = status_and_json(resp).await;
        assert_eq!(status, 200, "{json}");
        json["content_uri"].as_str().expect("content_uri").rsplit('/').next().expect("id").to_owned()
    }

    async fn put(&self, token: &str, query: &str, id: &str) -> (u16, serde_json::Value) {
        let resp = self
            .node
            .http
            .put(self.node.url(&format!("/_matrix/media/v3/upload/localhost/{id}{query}")))
            .bearer_auth(token)
            .body("async content")
            .send()
            .await
            .expect("put");
        let (s, j, _) = status_and_json(resp).await;
        (s, j)
    }

    async fn download(&self, token: &str, id: &str) -> (u16, Vec<u8>) {
        let resp = self
            .node
            .http
            .get(self.node.url(&format!("/_matrix/client/v1/media/download/localhost/{id}")))
            .bearer_auth(token)
            .send()
            .await
            .expect("download");
        (resp.status().as_u16(), resp.bytes().await.expect("body").to_vec())
    }

    async fn auth_checks(&self, result: &str) -> f64 {
        let text = self.node.metrics().await.expect("metrics");
        let name = format!("mxcas_edge_auth_checks_total{{result=\"{result}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&name).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
    }
}

fn media_id(json: &serde_json::Value) -> String {
    json["content_uri"].as_str().unwrap_or_else(|| panic!("{json}")).rsplit('/').next().expect("id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_are_the_homeservers() -> anyhow::Result<()> {
    let mut hs = Synapse::start("localhost").await?;
    hs.register("alice", "alice-password-1")?;
    hs.register("bob", "bob-password-1")?;
    let alice = hs.login("alice", "alice-password-1").await?;
    let bob = hs.login("bob", "bob-password-1").await?;
    // The edge reaches the homeserver through a proxy that can slow the link, to make
    // concurrent checks of one token overlap for certain.
    let link = LinkProxy::start().await?;
    link.set_target(hs.url.trim_start_matches("http://").parse()?);
    let node = Node::start(NodeOptions {
        auth: format!("homeserver_url = \"http://{}\"\ncache_ttl = \"2s\"\nnegative_cache_ttl = \"1s\"\n", link.addr),
        static_tokens: false,
        ..Default::default()
    })
    .await?;
    let c = Client { node: &node };

    // A homeserver token uploads, and another user's downloads it.
    let (status, json, _) = c.upload(Some(&alice), "", b"uploaded with a Synapse token").await;
    assert_eq!(status, 200, "{json}");
    let id = media_id(&json);
    assert_eq!(c.download(&bob, &id).await, (200, b"uploaded with a Synapse token".to_vec()));

    // Tokens are told apart by the user the homeserver names: a reservation of alice's is
    // hers alone.
    let reserved = c.create(&alice, "").await;
    let (status, json) = c.put(&bob, "", &reserved).await;
    assert_eq!((status, json["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{json}");
    assert_eq!(c.put(&alice, "", &reserved).await.0, 200);

    // Missing and unknown tokens, in the spec's words.
    let (status, json, _) = c.upload(None, "", b"x").await;
    assert_eq!((status, json["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")), "{json}");
    let (status, json, _) = c.upload(Some("syt_not_a_token_of_anyone"), "", b"x").await;
    assert_eq!((status, json["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")), "{json}");

    // One check per token however many requests arrive with it at once: with the link
    // slowed, every one of 20 requests arrives while the first check is still out.
    let fresh = hs.login("bob", "bob-password-1").await?;
    let before = c.auth_checks("valid").await;
    link.set_delay(Duration::from_millis(400));
    let downloads: Vec<_> = (0..20).map(|_| c.download(&fresh, &id)).collect();
    for (status, _) in futures::future::join_all(downloads).await {
        assert_eq!(status, 200);
    }
    link.set_delay(Duration::ZERO);
    assert_eq!(c.auth_checks("valid").await - before, 1.0, "20 concurrent requests, one whoami");

    // Guests may download, not upload.
    let guest = hs.register_guest().await?;
    assert_eq!(c.download(&guest, &id).await.0, 200);
    let (status, json, _) = c.upload(Some(&guest), "", b"guest upload").await;
    assert_eq!((status, json["errcode"].as_str()), (403, Some("M_GUEST_ACCESS_FORBIDDEN")), "{json}");
    let resp = node.http.post(node.url("/_matrix/media/v1/create")).bearer_auth(&guest).send().await?;
    assert_eq!(resp.status(), 403, "guests cannot reserve media IDs either");
    let (status, json) = c.put(&guest, "", &reserved).await;
    assert_eq!((status, json["errcode"].as_str()), (403, Some("M_GUEST_ACCESS_FORBIDDEN")), "{json}");

    // An application service uploads as the users in its namespace (`user_id=`), which the
    // homeserver decides, and as no one else.
    hs.register_appservice_user("bridge_1").await?;
    let as_bridge = "?user_id=%40bridge_1%3Alocalhost";
    let (status, json, _) = c.upload(Some(AS_TOKEN), as_bridge, b"bridged").await;
    assert_eq!(status, 200, "{json}");
    let bridged = c.create(AS_TOKEN, as_bridge).await;
    assert_eq!(c.put(&alice, "", &bridged).await.0, 403, "the reservation is the bridge user's");
    assert_eq!(c.put(AS_TOKEN, as_bridge, &bridged).await.0, 200);
    let (status, json, _) = c.upload(Some(AS_TOKEN), "?user_id=%40alice%3Alocalhost", b"as alice").await;
    assert_eq!((status, json["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{json}");

    // A logged-out token stops working within the configured cache_ttl (2 s here).
    let session = hs.login("alice", "alice-password-1").await?;
    assert_eq!(c.upload(Some(&session), "", b"before logout").await.0, 200);
    hs.logout(&session).await?;
    let logged_out = tokio::time::Instant::now();
    loop {
        let (status, json, _) = c.upload(Some(&session), "", b"after logout").await;
        if status == 401 {
            assert_eq!(json["errcode"], "M_UNKNOWN_TOKEN", "{json}");
            break;
        }
        assert_eq!(status, 200, "{json}");
        // cache_ttl (2 s), plus slack for the check and this loop on a busy machine.
        assert!(logged_out.elapsed() < Duration::from_secs(4), "a logged-out token still works after cache_ttl");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The homeserver down: a token the edge cannot check is 503 with Retry-After, never a 401
    // that would log its user out.
    let unchecked = hs.login("bob", "bob-password-1").await?;
    hs.kill();
    for token in [unchecked.as_str(), "syt_not_a_token_of_anyone_either"] {
        let (status, json, retry) = c.upload(Some(token), "", b"homeserver down").await;
        assert_eq!(status, 503, "{json}");
        assert!(retry.is_some(), "503 without Retry-After: {json}");
        assert_ne!(json["errcode"], "M_UNKNOWN_TOKEN", "{json}");
    }
    assert!(c.auth_checks("unavailable").await >= 2.0);
    Ok(())
}
