//! The IPFS trustless gateway (`/ipfs/{cid}`) over real uploads: every block of a stored DAG
//! (roots, leaves, by CIDv0 or v1) as a raw block, and CARs of it (`dag-scope`,
//! `entity-bytes`, `dups`), checked by mxcas's own CAR reader and by `@ipld/car`;
//! `@helia/verified-fetch` reads uploaded media with the gateway as its only source; access
//! per tenant; and a stored block that no longer verifies is never sent.
//! Reproduce one test: `scripts/test.sh <test name>`.

use cid::Cid;
use mxcas_cas::car;
use mxcas_cas::{CHUNK_SIZE, DagBuilder, FileRange, Limits, RAW, cid_from_digest};
use mxcas_tests::node::ALICE;
use mxcas_tests::{Node, NodeOptions, oracle, test_bytes};
use sha2::{Digest, Sha256};

const PUBLIC: &str = "ipfs_gateway = \"public\"\n";

async fn public_node() -> anyhow::Result<Node> {
    Node::start(NodeOptions { media: PUBLIC.into(), ..Default::default() }).await
}

async fn get(
    node: &Node,
    path: &str,
    accept: Option<&str>,
) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Vec<u8>)> {
    let mut req = node.http.get(node.url(path));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    Ok((status, headers, resp.bytes().await?.to_vec()))
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

type Blocks = Vec<(Cid, Vec<u8>)>;

/// The roots and blocks of a CAR, verified by mxcas's reader.
fn read_car(bytes: &[u8]) -> anyhow::Result<(Vec<Cid>, Blocks)> {
    let (roots, blocks) = car::read(bytes, Limits::default())?;
    Ok((roots, blocks.into_iter().map(|b| (*b.cid(), b.into_bytes())).collect()))
}

/// The file a CAR of a whole DAG holds, read through FileRange (which proves every byte).
fn file_of(root: Cid, size: u64, blocks: &[(Cid, Vec<u8>)]) -> anyhow::Result<Vec<u8>> {
    let mut range = FileRange::new(root, 0..size, Limits::default())?;
    let mut out = Vec::new();
    for (cid, bytes) in blocks {
        // A block sent again (dups=y) is one the range holds already.
        if !range.wants().contains(cid) {
            continue;
        }
        range.add(mxcas_cas::VerifiedBlock::verify(*cid, bytes.clone(), &Limits::default())?)?;
        while let Some(b) = range.next_bytes() {
            out.extend_from_slice(&b);
        }
    }
    anyhow::ensure!(range.is_done(), "the CAR does not hold the whole file");
    Ok(out)
}

/// The CIDs of every whole section of a CAR (header skipped), without checking any block.
fn section_cids(car_bytes: &[u8]) -> Vec<Cid> {
    fn varint(b: &[u8]) -> Option<(u64, usize)> {
        let mut v = 0u64;
        for (i, byte) in b.iter().enumerate().take(10) {
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some((v, i + 1));
            }
        }
        None
    }
    let mut out = Vec::new();
    let Some((len, n)) = varint(car_bytes) else { return out };
    let mut rest = &car_bytes[n + len as usize..];
    while let Some((len, n)) = varint(rest) {
        let Some(section) = rest.get(n..n + len as usize) else { break };
        let mut cursor = std::io::Cursor::new(section);
        if let Ok(cid) = Cid::read_bytes(&mut cursor) {
            out.push(cid);
        }
        rest = &rest[n + len as usize..];
    }
    out
}

#[tokio::test]
async fn every_block_of_stored_media_is_served_raw_and_as_car() -> anyhow::Result<()> {
    let node = public_node().await?;
    let small = test_bytes(1, 100);
    let big = test_bytes(2, 3 * CHUNK_SIZE + 12_345);
    let small_id = node.upload_ok(small.clone()).await?;
    let big_id = node.upload_ok(big.clone()).await?;
    let mut dag = DagBuilder::new();
    dag.update(&big);
    let dag = dag.finish();
    assert_eq!(big_id, dag.root.to_string());

    // Raw blocks: a one-block file, a DAG root, each leaf, and the root by its CIDv0.
    let (status, h, body) = get(&node, &format!("/ipfs/{small_id}?format=raw"), None).await?;
    assert_eq!((status, body.as_slice()), (200, small.as_slice()));
    assert_eq!(header(&h, "content-type"), "application/vnd.ipld.raw");
    assert_eq!(header(&h, "etag"), format!("\"{small_id}.raw\""));
    assert_eq!(header(&h, "content-disposition"), format!("attachment; filename=\"{small_id}.bin\""));
    assert_eq!(header(&h, "x-content-type-options"), "nosniff");
    assert!(header(&h, "cache-control").contains("immutable"));
    let root_block = &dag.nodes.iter().find(|(c, _)| *c == dag.root).expect("root").1;
    let (status, _, body) = get(&node, &format!("/ipfs/{big_id}"), Some("application/vnd.ipld.raw")).await?;
    assert_eq!((status, &body), (200, root_block));
    for (i, digest) in dag.leaves.iter().enumerate() {
        let leaf = cid_from_digest(RAW, digest);
        let (status, _, body) = get(&node, &format!("/ipfs/{leaf}?format=raw"), None).await?;
        assert_eq!(status, 200, "leaf {i}");
        assert_eq!(body, big[i * CHUNK_SIZE..((i + 1) * CHUNK_SIZE).min(big.len())], "leaf {i}");
    }
    let v0 = Cid::new_v0(*dag.root.hash())?;
    let (status, _, body) = get(&node, &format!("/ipfs/{v0}?format=raw"), None).await?;
    assert_eq!((status, &body), (200, root_block), "a CIDv0 names the same block");
    let head = node.http.head(node.url(&format!("/ipfs/{big_id}?format=raw"))).send().await?;
    assert_eq!(head.status(), 200);
    assert_eq!(header(head.headers(), "content-length"), root_block.len().to_string());
    assert_eq!(
        header(&h, "cache-control"),
        "public, max-age=29030400, immutable",
        "a public gateway may be cached by anyone"
    );

    // A CAR of the whole DAG: the root, then the leaves, depth first; it holds the file.
    let (status, h, body) = get(&node, &format!("/ipfs/{big_id}?format=car"), None).await?;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), "application/vnd.ipld.car; version=1; order=dfs; dups=n");
    assert_eq!(header(&h, "content-length"), body.len().to_string());
    let (roots, blocks) = read_car(&body)?;
    assert_eq!(roots, vec![dag.root]);
    let mut want: Vec<Cid> = vec![dag.root];
    want.extend(dag.leaves.iter().map(|d| cid_from_digest(RAW, d)));
    assert_eq!(blocks.iter().map(|b| b.0).collect::<Vec<_>>(), want);
    assert_eq!(file_of(dag.root, big.len() as u64, &blocks)?, big);
    // IPFS's own CAR reader reads it and verifies every block.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("big.car");
    std::fs::write(&path, &body)?;
    let (js_roots, js_blocks) = oracle::read_car(&path)?;
    assert_eq!(js_roots, vec![big_id.clone()]);
    assert_eq!(
        js_blocks.iter().map(|b| b.0.clone()).collect::<Vec<_>>(),
        want.iter().map(Cid::to_string).collect::<Vec<_>>()
    );

    let head = node.http.head(node.url(&format!("/ipfs/{big_id}?format=car"))).send().await?;
    assert_eq!(
        (head.status().as_u16(), header(head.headers(), "content-length")),
        (200, body.len().to_string().as_str())
    );
    // The root by its CIDv0: the same blocks, under the name asked for.
    let (status, _, v0_car) = get(&node, &format!("/ipfs/{v0}?format=car"), None).await?;
    assert_eq!(status, 200);
    let (roots, v0_blocks) = read_car(&v0_car)?;
    assert_eq!((roots, v0_blocks.len(), &v0_blocks[1..]), (vec![v0], blocks.len(), &blocks[1..]));

    // entity-bytes keeps the blocks of the range; dag-scope=block the root alone.
    let range = format!("/ipfs/{big_id}?format=car&entity-bytes={}:{}", CHUNK_SIZE + 4, 2 * CHUNK_SIZE + 8);
    let (status, h, body) = get(&node, &range, None).await?;
    assert_eq!(status, 200);
    assert!(header(&h, "etag").contains("entity"), "the range is in the ETag: {:?}", header(&h, "etag"));
    let (_, blocks) = read_car(&body)?;
    assert_eq!(blocks.iter().map(|b| b.0).collect::<Vec<_>>(), vec![dag.root, want[2], want[3]]);
    let (_, _, body) = get(&node, &format!("/ipfs/{big_id}?format=car&entity-bytes=-10:*"), None).await?;
    assert_eq!(read_car(&body)?.1.iter().map(|b| b.0).collect::<Vec<_>>(), vec![dag.root, want[4]]);
    let (_, _, body) = get(&node, &format!("/ipfs/{big_id}?format=car&dag-scope=block"), None).await?;
    assert_eq!(read_car(&body)?.1.iter().map(|b| b.0).collect::<Vec<_>>(), vec![dag.root]);
    // A CAR of a leaf is the leaf.
    let (_, _, body) = get(&node, &format!("/ipfs/{}", want[1]), Some("application/vnd.ipld.car")).await?;
    let (roots, blocks) = read_car(&body)?;
    assert_eq!((roots, blocks.len()), (vec![want[1]], 1));

    // Repeated leaves: sent once (dups=n), or every time linked (dups=y).
    let zeros_id = node.upload_ok(vec![0; 3 * CHUNK_SIZE]).await?;
    let (_, _, body) = get(&node, &format!("/ipfs/{zeros_id}?format=car"), None).await?;
    assert_eq!(read_car(&body)?.1.len(), 2, "root and one leaf");
    let (_, h, body) =
        get(&node, &format!("/ipfs/{zeros_id}"), Some("application/vnd.ipld.car; version=1; order=dfs; dups=y"))
            .await?;
    assert_eq!(header(&h, "content-type"), "application/vnd.ipld.car; version=1; order=dfs; dups=y");
    let (_, blocks) = read_car(&body)?;
    assert_eq!(blocks.len(), 4, "root and three leaves");
    assert_eq!(file_of(blocks[0].0, 3 * CHUNK_SIZE as u64, &blocks)?, vec![0; 3 * CHUNK_SIZE]);

    // The probe, the empty identity CID.
    let (status, _, body) = get(&node, "/ipfs/bafkqaaa?format=raw", None).await?;
    assert_eq!((status, body.len()), (200, 0));
    let (status, _, body) = get(&node, "/ipfs/bafkqaaa?format=car", None).await?;
    assert_eq!(status, 200);
    assert_eq!(read_car(&body)?, (vec!["bafkqaaa".parse()?], vec![]));

    // Conditional requests, and what is refused.
    let etag = header(&h, "etag").to_owned();
    let again = node
        .http
        .get(node.url(&format!("/ipfs/{zeros_id}?format=car&car-dups=y")))
        .header("if-none-match", &etag)
        .send()
        .await?;
    assert_eq!(again.status(), 304);
    let unstored = mxcas_cas::cid_of(b"never uploaded");
    for (path, accept, want) in [
        (format!("/ipfs/{small_id}"), None, 400),
        (format!("/ipfs/{small_id}"), Some("text/html,*/*"), 400),
        (format!("/ipfs/{small_id}"), Some("application/vnd.ipld.car; version=2"), 406),
        (format!("/ipfs/{small_id}?format=tar"), None, 400),
        (format!("/ipfs/{unstored}?format=raw"), None, 404),
        ("/ipfs/not-a-cid?format=raw".to_owned(), None, 400),
        (format!("/ipfs/{small_id}/a/path?format=raw"), None, 400),
        (format!("/ipfs/{big_id}?format=car&entity-bytes={}:*", big.len()), None, 400),
        (format!("/ipfs/{big_id}?format=car&dag-scope=everything"), None, 400),
    ] {
        let (status, h, body) = get(&node, &path, accept).await?;
        assert_eq!(status, want, "{path} {accept:?}: {}", String::from_utf8_lossy(&body));
        assert!(header(&h, "content-type").starts_with("text/plain"), "{path}: errors are plain text");
    }
    assert!(node.metric("mxcas_edge_gateway_responses_total{result=\"car\"}").await? >= 6.0);
    assert!(node.metric("mxcas_edge_gateway_responses_total{result=\"not_found\"}").await? >= 1.0);
    Ok(())
}

#[tokio::test]
async fn helia_verified_fetch_reads_uploaded_media_through_the_gateway() -> anyhow::Result<()> {
    let node = public_node().await?;
    let files = [test_bytes(10, 5_000), test_bytes(11, 3 * CHUNK_SIZE + 777)];
    let mut ids = Vec::new();
    for f in &files {
        ids.push(node.upload_ok(f.clone()).await?);
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let got = tokio::task::spawn_blocking({
        let api = node.api.clone();
        let refs: Vec<String> = refs.iter().map(|s| (*s).to_owned()).collect();
        move || oracle::verified_fetch(&api, &refs.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await??;
    assert_eq!(got.len(), files.len());
    for ((len, sha), file) in got.iter().zip(&files) {
        assert_eq!(*len, file.len() as u64);
        assert_eq!(*sha, format!("{:x}", Sha256::digest(file)));
    }
    // It read the multi-block file block by block, each one checked on arrival.
    assert!(node.metric("mxcas_edge_gateway_responses_total{result=\"raw\"}").await? >= 5.0);
    Ok(())
}

#[tokio::test]
async fn who_may_use_the_gateway_is_configured() -> anyhow::Result<()> {
    // The default: the media API's authentication.
    let node = Node::start(NodeOptions::default()).await?;
    let id = node.upload_ok(test_bytes(20, 1000)).await?;
    let url = node.url(&format!("/ipfs/{id}?format=raw"));
    let anonymous = node.http.get(&url).send().await?;
    assert_eq!(anonymous.status(), 401);
    let json: serde_json::Value = anonymous.json().await?;
    assert_eq!(json["errcode"], "M_MISSING_TOKEN");
    let alice = node.http.get(&url).bearer_auth(ALICE).send().await?;
    assert_eq!(alice.status(), 200);
    assert!(
        header(alice.headers(), "cache-control").starts_with("private"),
        "no shared cache may keep an authenticated answer"
    );
    let car = node.http.get(node.url(&format!("/ipfs/{id}?format=car"))).send().await?;
    assert_eq!(car.status(), 401, "CARs need the token too");
    assert_eq!(alice.bytes().await?.to_vec(), test_bytes(20, 1000));
    drop(node);

    let off = Node::start(NodeOptions { media: "ipfs_gateway = \"off\"\n".into(), ..Default::default() }).await?;
    let id = off.upload_ok(test_bytes(21, 1000)).await?;
    let resp = off.http.get(off.url(&format!("/ipfs/{id}?format=raw"))).bearer_auth(ALICE).send().await?;
    assert_eq!(resp.status(), 404);
    Ok(())
}

#[tokio::test]
async fn a_stored_block_that_fails_verification_is_never_sent() -> anyhow::Result<()> {
    let node = public_node().await?;
    let big = test_bytes(30, 3 * CHUNK_SIZE + 10);
    let id = node.upload_ok(big.clone()).await?;
    // Corrupt leaf 2 in the stored object.
    let blob = node
        .local_blobs()
        .into_iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == big.len() as u64))
        .expect("the stored object");
    let mut stored = std::fs::read(&blob)?;
    stored[2 * CHUNK_SIZE + 100] ^= 0xff;
    std::fs::write(&blob, &stored)?;
    let leaf2 = mxcas_cas::raw_cid(&big[2 * CHUNK_SIZE..3 * CHUNK_SIZE]);
    let (status, _, body) = get(&node, &format!("/ipfs/{leaf2}?format=raw"), None).await?;
    assert_eq!(status, 500, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("lost"), "answered as data loss");
    // A CAR is cut short before the bad block: what arrived verifies, and is less than promised.
    let resp = node.http.get(node.url(&format!("/ipfs/{id}?format=car"))).send().await?;
    assert_eq!(resp.status(), 200);
    let promised: usize = header(resp.headers(), "content-length").parse()?;
    let mut got = Vec::new();
    let mut resp = resp;
    while let Ok(Some(chunk)) = resp.chunk().await {
        got.extend_from_slice(&chunk);
    }
    assert!(got.len() < promised, "{} of {promised} bytes", got.len());
    // Every section that went out, read without verifying (so a bad one would show).
    let sections = section_cids(&got);
    assert!(!sections.contains(&leaf2), "the corrupt leaf never went out: {sections:?}");
    assert!(sections.len() <= 3, "root and leaves before the bad one at most: {sections:?}");
    let mut reader = car::CarReader::new(Limits::default());
    reader.push(&got);
    while let Ok(Some(_)) = reader.next_block() {}
    // Cut between two sections, each of which verifies: only the Content-Length tells.
    assert_eq!(reader.finish(), Ok(()));
    assert!(node.metric("mxcas_edge_data_loss_total").await? >= 2.0, "both losses are counted");
    Ok(())
}
