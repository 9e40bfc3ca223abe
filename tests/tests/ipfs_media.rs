//! `mxc://<server>/ipfs:<cid>` media (MSC2706) from plain trustless gateways serving content
//! that IPFS's own importer made with its default settings (not mxcas's profile) and as kubo
//! long did (CIDv0, dag-pb leaves): fetched from several gateways at once, every block
//! verified as it arrives, so a lying gateway, a silent one and one that has nothing cost
//! retries only; stored once, then served from the store; never stored when no gateway
//! serves a verified copy. Reproduce one test: `scripts/test.sh <test name>`.

use mxcas_tests::oracle::PlainGateways;
use mxcas_tests::{Node, NodeOptions, test_bytes};

/// A node whose `[ipfs]` gateways are `urls`, in order.
async fn node_with(urls: &[String], extra: &str) -> anyhow::Result<Node> {
    let list = urls.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
    Node::start(NodeOptions {
        // Long enough that waiting for a silent gateway's timeout would show.
        extra: format!("[ipfs]\ngateways = [{list}]\nblock_timeout = \"20s\"\n{extra}"),
        ..Default::default()
    })
    .await
}

fn write_temp(bytes: &[u8]) -> anyhow::Result<tempfile::NamedTempFile> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), bytes)?;
    Ok(file)
}

async fn metric(node: &Node, name: &str, result: &str) -> anyhow::Result<f64> {
    node.metric(&format!("mxcas_edge_{name}_total{{result=\"{result}\"}}")).await
}

#[tokio::test]
async fn ipfs_media_is_verified_block_by_block_from_hostile_gateways() -> anyhow::Result<()> {
    // 3 MiB + a bit: 13 leaves of the importer's 256 KiB, so several gateways share them.
    let data = test_bytes(71, 3 * 1024 * 1024 + 4321);
    let file = write_temp(&data)?;
    for legacy in [false, true] {
        // The liar is listed first and the silent one second: both are asked, neither is
        // believed or waited for to the end.
        let gw = PlainGateways::start(file.path(), legacy, &["lie", "stall", "absent", "ok", "ok"])?;
        assert!(gw.root.starts_with(if legacy { "Qm" } else { "bafy" }), "{}", gw.root);
        let node = node_with(&gw.urls, "").await?;
        let id = format!("ipfs:{}", gw.root);
        let started = std::time::Instant::now();
        let resp = node.download(&id).await?;
        assert_eq!(resp.status(), 200, "{}", node.log());
        // The silent gateway's blocks are asked elsewhere once slow, not after its timeout.
        assert!(started.elapsed() < std::time::Duration::from_secs(15), "took {:?}", started.elapsed());
        assert_eq!(resp.bytes().await?.to_vec(), data, "legacy={legacy}: the verified bytes, in order");
        // Answered while stored: counted once stored, just after the last byte.
        mxcas_tests::wait_for("the fetch to be stored", std::time::Duration::from_secs(10), || async {
            (metric(&node, "ipfs_fetches", "stored").await.ok()? == 1.0).then_some(())
        })
        .await?;
        assert!(metric(&node, "gateway_blocks", "bad").await? >= 1.0, "the liar's block was refused");
        assert!(metric(&node, "gateway_blocks", "verified").await? >= 14.0, "13 leaves and the root verified");
        // Stored: the next downloads (and ranges) come from the store, nothing is asked again.
        drop(gw);
        let resp = node.download_range(&id, "bytes=1000000-1000009").await?;
        assert_eq!(resp.status(), 206);
        assert_eq!(resp.bytes().await?.to_vec(), &data[1_000_000..1_000_010]);
        assert_eq!(metric(&node, "ipfs_fetches", "stored").await?, 1.0, "fetched once");
    }
    Ok(())
}

#[tokio::test]
async fn ipfs_media_without_a_verified_copy_is_never_stored() -> anyhow::Result<()> {
    let data = test_bytes(72, 600_000);
    let file = write_temp(&data)?;
    let gw = PlainGateways::start(file.path(), false, &["lie", "absent", "lie"])?;
    let node = node_with(&gw.urls, "").await?;
    let id = format!("ipfs:{}", gw.root);
    let resp = node.download(&id).await?;
    assert_eq!(resp.status(), 404, "only liars have it: to mxcas, nobody does");
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["errcode"], "M_NOT_FOUND");
    assert!(metric(&node, "gateway_blocks", "bad").await? >= 2.0);
    assert_eq!(metric(&node, "ipfs_fetches", "stored").await?, 0.0);
    assert!(node.local_blobs().is_empty(), "nothing of it stored: {:?}", node.local_blobs());

    // No gateway has the CID at all; a malformed ID; the legacy endpoint (held media only).
    let other = format!("ipfs:{}", mxcas_cas::raw_cid(b"nobody has this"));
    let resp = node.download(&other).await?;
    assert_eq!(resp.status(), 404);
    for bad in ["ipfs:", "ipfs:notacid", "ipfs:bafy%2F..%2Fx"] {
        let resp = node.download(bad).await?;
        assert_eq!(resp.status(), 400, "{bad}");
        let body: serde_json::Value = resp.json().await?;
        assert_eq!(body["errcode"], "M_INVALID_PARAM", "{bad}");
    }
    Ok(())
}

#[tokio::test]
async fn ipfs_media_with_a_bad_middle_block_everywhere_is_refused_and_the_legacy_endpoint_never_fetches()
-> anyhow::Result<()> {
    let data = test_bytes(74, 2 * 1024 * 1024);
    let file = write_temp(&data)?;
    let gw = PlainGateways::start(file.path(), false, &["bad-middle", "bad-middle", "ok"])?;
    // Only the broken copies: the root and most leaves verify, the middle leaf never does.
    let node = node_with(&gw.urls[..2], "").await?;
    let id = format!("ipfs:{}", gw.root);
    let legacy = node.http.get(node.url(&format!("/_matrix/media/v3/download/localhost/{id}"))).send().await?;
    assert_eq!(legacy.status(), 404, "the legacy endpoint serves held media only");
    assert_eq!(metric(&node, "gateway_blocks", "verified").await?, 0.0, "and asks no gateway");
    // A range is answered from the stored media only, so it waits for the fetch: 502.
    let resp = node.download_range(&id, "bytes=0-9").await?;
    assert_eq!(resp.status(), 502, "{}", node.log());
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["errcode"], "M_UNKNOWN");
    // A whole download is answered while fetched: the verified bytes before the bad block,
    // then the body is cut, short of its length.
    let mut resp = node.download(&id).await?;
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    let cut = loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => got.extend_from_slice(&chunk),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(cut && got.len() < data.len(), "cut at {} of {}", got.len(), data.len());
    assert!(got[..] == data[..got.len()], "only the file's own bytes, in order");
    mxcas_tests::wait_for("the second fetch to fail", std::time::Duration::from_secs(10), || async {
        (metric(&node, "ipfs_fetches", "failed").await.ok()? == 2.0).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: nothing recorded, so asked again"))?;
    assert!(metric(&node, "gateway_blocks", "bad").await? >= 2.0, "the middle block, from each");
    assert_eq!(metric(&node, "ipfs_fetches", "stored").await?, 0.0);
    // With an honest gateway as well, the same fetch completes and verifies.
    let node = node_with(&gw.urls, "").await?;
    let resp = node.download(&id).await?;
    assert_eq!(resp.status(), 200, "{}", node.log());
    assert_eq!(resp.bytes().await?.to_vec(), data);
    Ok(())
}

#[tokio::test]
async fn ipfs_ids_of_media_held_here_need_no_gateway() -> anyhow::Result<()> {
    // No gateways at all: an ipfs: ID of bytes uploaded here (mxcas's CID of them) is served
    // from the store; any other ipfs: ID is not held and cannot be fetched.
    let node = Node::start(NodeOptions::default()).await?;
    let data = test_bytes(73, 2 * 1024 * 1024 + 1);
    let cid = node.upload_ok(data.clone()).await?;
    let resp = node.download(&format!("ipfs:{cid}")).await?;
    assert_eq!(resp.status(), 200, "{}", node.log());
    assert_eq!(resp.bytes().await?.to_vec(), data);
    let resp = node.download(&format!("ipfs:{}", mxcas_cas::raw_cid(b"elsewhere"))).await?;
    assert_eq!(resp.status(), 404);
    let body: serde_json::Value = resp.json().await?;
    assert!(body["error"].as_str().unwrap_or("").contains("no IPFS gateways"), "{body}");
    Ok(())
}

#[tokio::test]
async fn thumbnails_of_ipfs_media_are_made_from_its_verified_bytes() -> anyhow::Result<()> {
    let img = image::RgbImage::from_fn(400, 300, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)?;
    let file = write_temp(png.get_ref())?;
    let gw = PlainGateways::start(file.path(), false, &["ok"])?;
    let node = node_with(&gw.urls, "").await?;
    let url = node
        .url(&format!("/_matrix/client/v1/media/thumbnail/localhost/ipfs:{}?width=32&height=32&method=crop", gw.root));
    let resp = node.http.get(url).bearer_auth(mxcas_tests::node::ALICE).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    assert_eq!(status, 200, "{}\n{}", String::from_utf8_lossy(&body[..body.len().min(300)]), node.log());
    let thumb = image::load_from_memory(&body)?;
    assert_eq!((thumb.width(), thumb.height()), (32, 32), "the 32x32 crop");
    assert_eq!(metric(&node, "ipfs_fetches", "stored").await?, 1.0, "the source was fetched and stored");
    Ok(())
}

#[tokio::test]
async fn a_download_gets_ipfs_media_while_it_is_fetched_and_never_more_than_verified() -> anyhow::Result<()> {
    // 13 leaves of 256 KiB; the gateway never answers for the last, so the fetch cannot end
    // while the client reads everything before it.
    let data = test_bytes(75, 3 * 1024 * 1024 + 100);
    let last_leaf = data.len() - 12 * 256 * 1024;
    let file = write_temp(&data)?;
    let held = PlainGateways::start(file.path(), false, &["hold-last"])?;
    let node = Node::start(NodeOptions {
        extra: format!("[ipfs]\ngateways = [\"{}\"]\nblock_timeout = \"2s\"\n", held.urls[0]),
        ..Default::default()
    })
    .await?;
    let id = format!("ipfs:{}", held.root);
    let mut resp = node.download(&id).await?;
    assert_eq!(resp.status(), 200, "answered before the fetch ends: {}", node.log());
    assert_eq!(resp.content_length(), Some(data.len() as u64), "the size the root gave");
    assert!(resp.headers().get("etag").is_none(), "no ETag before the stored CID is known");
    let mut got = Vec::new();
    while got.len() < data.len() - last_leaf {
        match resp.chunk().await? {
            Some(chunk) => got.extend_from_slice(&chunk),
            None => anyhow::bail!("the body ended after {} bytes", got.len()),
        }
    }
    assert!(got[..] == data[..got.len()], "every byte so far is the file's, in order");
    assert_eq!(
        metric(&node, "ipfs_fetches", "stored").await?,
        0.0,
        "the client has all but the held block, and nothing is stored yet"
    );
    // The held block never comes: the body is cut short of its length, nothing is stored.
    let mut cut = false;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => got.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    assert!(cut && got.len() < data.len(), "cut at {} of {} bytes", got.len(), data.len());
    assert_eq!(metric(&node, "ipfs_fetches", "stored").await?, 0.0);
    drop(node);

    // An honest gateway: the first download streams the whole file, later ones are served
    // from the store.
    let ok = PlainGateways::start(file.path(), false, &["ok"])?;
    let node = node_with(&ok.urls, "").await?;
    let resp = node.download(&id).await?;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("etag").is_none(), "answered live");
    let live_type = resp.headers().get("content-type").cloned();
    assert!(resp.bytes().await?.as_ref() == data.as_slice());
    mxcas_tests::wait_for("the fetch to be stored", std::time::Duration::from_secs(10), || async {
        (metric(&node, "ipfs_fetches", "stored").await.ok()? == 1.0).then_some(())
    })
    .await?;
    let resp = node.download(&id).await?;
    assert!(resp.headers().get("etag").is_some(), "from the store");
    assert_eq!(resp.headers().get("content-type").cloned(), live_type, "recorded as it was answered live");
    assert!(resp.bytes().await?.as_ref() == data.as_slice());
    Ok(())
}
