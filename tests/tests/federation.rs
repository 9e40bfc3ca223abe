//! mxcas as a Matrix server to other servers, against Synapse: Synapse fetches media hosted by
//! mxcas over signed federation (mxcas checks Synapse's `X-Matrix` signature with the keys it
//! fetches from Synapse; Synapse reads mxcas's `multipart/mixed` answer), mxcas's key document
//! and request signatures are checked by Synapse's own signing code, and unsigned, forged or
//! misdirected requests are refused with the spec's 401.
//! Reproduce one test: `scripts/test.sh <test name>`.

use std::process::{Command, Stdio};

use mxcas_federation::SigningKey;
use mxcas_federation::signing::encode_base64;
use mxcas_federation::x_matrix;
use mxcas_tests::nginx::Nginx;
use mxcas_tests::node::ALICE;
use mxcas_tests::pki::TestPki;
use mxcas_tests::synapse::Synapse;
use mxcas_tests::{Node, NodeOptions, test_bytes};

const SEED: [u8; 32] = [42; 32];

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Synapse's signing code (tests/clients/signing_oracle.py) on one JSON question.
fn oracle(command: &str, args: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let python = std::env::var("SYNAPSE_PYTHON")?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/signing_oracle.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), args.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "oracle failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// An mxcas node whose server name is `127.0.0.1:<port>`, behind nginx terminating TLS on that
/// port (a Matrix server name with a port is reached there directly), with a signing key.
struct Deployment {
    node: Node,
    tls: Option<Nginx>,
    server_name: String,
    _dir: tempfile::TempDir,
}

async fn deployment(pki: &TestPki) -> anyhow::Result<Deployment> {
    deployment_with(pki, "", "").await
}

/// [`deployment`] with more `[federation]` settings and more `[media]` settings.
async fn deployment_with(pki: &TestPki, federation: &str, media: &str) -> anyhow::Result<Deployment> {
    // The port is free when chosen and taken by nginx after the node starts: another test's
    // process may take it in between, and then the deployment starts again on another.
    let mut last = None;
    for _ in 0..5 {
        match deployment_on(pki, free_port()?, federation, media).await {
            Ok(d) => return Ok(d),
            Err(e) if e.to_string().contains("Address already in use") => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no free port")))
}

async fn deployment_on(pki: &TestPki, port: u16, federation: &str, media: &str) -> anyhow::Result<Deployment> {
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("signing.key");
    std::fs::write(&key_file, format!("ed25519 a_mx {}\n", encode_base64(&SEED)))?;
    let server_name = format!("127.0.0.1:{port}");
    let ca = pki.config.ca.as_ref().expect("ca").display().to_string();
    let node = Node::start(NodeOptions {
        server_name: Some(server_name.clone()),
        extra: format!(
            "[federation]\nsigning_key_file = \"{}\"\nallow_private_addresses = true\nca_file = \"{ca}\"\n{federation}\n",
            key_file.display()
        ),
        media: media.to_owned(),
        ..Default::default()
    })
    .await?;
    let tls = Nginx::start_tls(
        port,
        &node.api,
        pki.config.cert.as_ref().expect("cert"),
        pki.config.key.as_ref().expect("key"),
    )
    .await?;
    Ok(Deployment { node, tls: Some(tls), server_name, _dir: dir })
}

async fn upload(d: &Deployment, body: Vec<u8>) -> anyhow::Result<String> {
    let resp = d
        .node
        .http
        .post(d.node.url("/_matrix/media/v3/upload"))
        .bearer_auth(ALICE)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 200, "upload: {}", resp.status());
    let json: serde_json::Value = resp.json().await?;
    let uri = json["content_uri"].as_str().unwrap_or_default();
    Ok(uri.rsplit('/').next().unwrap_or_default().to_owned())
}

/// Synapse with its own media repository, federating over TLS on its server name's port,
/// trusting the test CA, and allowed to reach loopback.
async fn federating_synapse(pki: &TestPki) -> anyhow::Result<Synapse> {
    let fed_port = free_port()?;
    Synapse::start_with(
        &format!("127.0.0.1:{fed_port}"),
        serde_json::json!({
            "enable_media_repo": true,
            "tls_certificate_path": pki.config.cert,
            "tls_private_key_path": pki.config.key,
            "federation_custom_ca_list": [pki.config.ca],
            "federation_verify_certificates": true,
            // Synapse blocks IP-literal server names in blocked ranges whatever its allowlist
            // says: loopback comes off the blocklist for this test.
            "ip_range_blacklist": [],
            "_listeners": [{"port": fed_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": true,
                            "resources": [{"names": ["federation"], "compress": false}]}],
        }),
    )
    .await
}

#[tokio::test]
async fn mxcas_fetches_synapse_media_over_signed_federation() -> anyhow::Result<()> {
    let pki = TestPki::generate("federation")?;
    let mut ours = deployment(&pki).await?;
    let synapse = federating_synapse(&pki).await?;
    synapse.register("carol", "carol-password-1")?;
    let token = synapse.login("carol", "carol-password-1").await?;
    let http = reqwest::Client::new();
    let file = test_bytes(7, 2 * 1024 * 1024 + 99);
    let resp = http
        .post(format!("{}/_matrix/media/v3/upload", synapse.url))
        .bearer_auth(&token)
        .header("content-type", "application/octet-stream")
        .body(file.clone())
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 200, "upload to Synapse: {}", resp.status());
    let json: serde_json::Value = resp.json().await?;
    let mxc = json["content_uri"].as_str().unwrap_or_default().to_owned();
    let (server, id) = mxc.strip_prefix("mxc://").and_then(|r| r.rsplit_once('/')).expect("an mxc");
    assert_eq!(server, synapse.server_name);
    // An mxcas user downloads it: mxcas asks Synapse over signed federation (Synapse checks
    // our signature with the key it fetches from us), stores it, and serves it.
    let url = ours.node.url(&format!("/_matrix/client/v1/media/download/{server}/{id}"));
    for round in 0..2 {
        let resp = ours.node.http.get(&url).bearer_auth(ALICE).send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        assert_eq!(
            status,
            200,
            "round {round}: {}\n--- synapse ---\n{}\n--- mxcas ---\n{}",
            String::from_utf8_lossy(&body[..body.len().min(500)]),
            synapse.log(),
            ours.node.log()
        );
        assert!(body.as_ref() == file.as_slice(), "round {round}: Synapse's bytes");
    }
    assert_eq!(
        ours.node.metric("mxcas_edge_remote_fetches_total{result=\"stored\"}").await?,
        1.0,
        "fetched once, then served from the store"
    );
    // Lost from our store: reported as data loss, and fetched again from the origin, which
    // repairs the stored content.
    let blobs: Vec<_> = ours
        .node
        .local_blobs()
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == file.len() as u64))
        .collect();
    assert!(!blobs.is_empty(), "the fetched file is stored: {:?}", ours.node.local_blobs());
    for blob in &blobs {
        std::fs::remove_file(blob)?;
    }
    ours.restart(&pki).await?;
    let url = ours.node.url(&format!("/_matrix/client/v1/media/download/{server}/{id}"));
    let resp = ours.node.http.get(&url).bearer_auth(ALICE).send().await?;
    assert_eq!(resp.status(), 200, "{}", ours.node.log());
    assert!(resp.bytes().await?.as_ref() == file.as_slice(), "the origin's bytes again");
    // (The node's counters started again with it.)
    assert!(ours.node.metric("mxcas_edge_data_loss_total").await? >= 1.0, "the loss was reported");
    assert_eq!(ours.node.metric("mxcas_edge_remote_fetches_total{result=\"stored\"}").await?, 1.0, "fetched again");
    let resp = ours.node.http.get(&url).bearer_auth(ALICE).send().await?;
    assert!(resp.bytes().await?.as_ref() == file.as_slice(), "served from the repaired store");
    assert_eq!(ours.node.metric("mxcas_edge_remote_fetches_total{result=\"stored\"}").await?, 1.0);
    // A thumbnail of a Synapse-hosted image (as Element asks for avatars): fetched whole over
    // federation and thumbnailed here.
    let resp = http
        .post(format!("{}/_matrix/media/v3/upload", synapse.url))
        .bearer_auth(&token)
        .header("content-type", "image/png")
        .body(png(300, 200)?)
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 200, "upload to Synapse: {}", resp.status());
    let json: serde_json::Value = resp.json().await?;
    let png_id = json["content_uri"].as_str().and_then(|u| u.rsplit('/').next()).unwrap_or_default().to_owned();
    let url =
        ours.node.url(&format!("/_matrix/client/v1/media/thumbnail/{server}/{png_id}?width=32&height=32&method=crop"));
    let resp = ours.node.http.get(&url).bearer_auth(ALICE).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body[..body.len().min(300)]));
    let thumb = image::load_from_memory(&body)?;
    assert_eq!((thumb.width(), thumb.height()), (32, 32), "the 32x32 crop of Synapse's image");
    // Unknown media on the origin is the origin's 404.
    let missing = ours
        .node
        .http
        .get(ours.node.url(&format!("/_matrix/client/v1/media/download/{server}/nonexistent")))
        .bearer_auth(ALICE)
        .send()
        .await?;
    assert_eq!(missing.status(), 404);
    Ok(())
}

#[tokio::test]
async fn synapse_fetches_mxcas_media_over_signed_federation() -> anyhow::Result<()> {
    let pki = TestPki::generate("federation")?;
    let ours = deployment(&pki).await?;
    let small = test_bytes(1, 10_000);
    let big = test_bytes(2, 3 * 1024 * 1024 + 5);
    let small_id = upload(&ours, small.clone()).await?;
    let big_id = upload(&ours, big.clone()).await?;
    let png_id = upload(&ours, png(200, 100)?).await?;

    let synapse = federating_synapse(&pki).await?;
    synapse.register("alice", "alice-password-1")?;
    let token = synapse.login("alice", "alice-password-1").await?;
    let http = reqwest::Client::new();
    for (id, want) in [(&small_id, &small), (&big_id, &big)] {
        let url = format!("{}/_matrix/client/v1/media/download/{}/{id}", synapse.url, ours.server_name);
        let resp = http.get(&url).bearer_auth(&token).send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        assert_eq!(
            status,
            200,
            "Synapse's download of our media: {}\n--- synapse ---\n{}\n--- mxcas ---\n{}",
            String::from_utf8_lossy(&body),
            synapse.log(),
            ours.node.log()
        );
        assert_eq!(body.len(), want.len());
        assert!(body.as_ref() == want.as_slice(), "the bytes Synapse serves are ours");
    }
    // A thumbnail of our image, asked of Synapse (which fetches the image over federation and
    // makes the thumbnail itself; our federation thumbnail endpoint is tested below).
    let url = format!(
        "{}/_matrix/client/v1/media/thumbnail/{}/{png_id}?width=32&height=32&method=crop",
        synapse.url, ours.server_name
    );
    let resp = http.get(&url).bearer_auth(&token).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    assert_eq!(status, 200, "{}\n{}", String::from_utf8_lossy(&body[..body.len().min(300)]), synapse.log());
    let img = image::load_from_memory(&body)?;
    assert_eq!((img.width(), img.height()), (32, 32), "the 32x32 crop");
    Ok(())
}

/// A PNG of `w`×`h` with some structure.
fn png(w: u32, h: u32) -> anyhow::Result<Vec<u8>> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

#[tokio::test]
async fn our_signatures_verify_with_synapses_code_and_bad_requests_are_refused() -> anyhow::Result<()> {
    let pki = TestPki::generate("federation")?;
    let ours = deployment(&pki).await?;
    let id = upload(&ours, test_bytes(3, 500)).await?;
    // The key document we serve, checked by signedjson.
    let doc: serde_json::Value =
        ours.node.http.get(ours.node.url("/_matrix/key/v2/server")).send().await?.json().await?;
    let checked = oracle("check-keys", serde_json::json!({"doc": doc, "server": ours.server_name}))?;
    assert_eq!(checked["ok"], true, "{checked}");
    let key = SigningKey::from_seed("a_mx", &SEED).map_err(anyhow::Error::msg)?;
    assert_eq!(doc["verify_keys"]["ed25519:a_mx"]["key"], encode_base64(&key.public_key()));
    // A request we sign, checked the way Synapse's Authenticator checks one.
    let uri = format!("/_matrix/federation/v1/media/download/{id}");
    let auth = x_matrix::authorization(&key, &ours.server_name, "other.example", "GET", &uri, None)?;
    let checked = oracle(
        "check-request",
        serde_json::json!({"authorization": auth, "method": "GET", "uri": uri, "destination": "other.example", "doc": doc}),
    )?;
    assert_eq!(checked["ok"], true, "{checked}");
    let forged = auth.replace("sig=\"", "sig=\"AAAA");
    let checked = oracle(
        "check-request",
        serde_json::json!({"authorization": forged, "method": "GET", "uri": uri, "destination": "other.example", "doc": doc}),
    )?;
    assert_eq!(checked["ok"], false, "a forged signature fails Synapse's check too");
    // A header Synapse's client writes parses and verifies with our code.
    let signed = oracle(
        "sign-request",
        serde_json::json!({"seed": encode_base64(&SEED), "key_id": "a_mx", "origin": "o.example",
                           "destination": ours.server_name, "method": "GET", "uri": uri}),
    )?;
    let parsed = x_matrix::parse(signed["authorization"].as_str().unwrap_or_default())?;
    x_matrix::verify_request(&parsed, &ours.server_name, "GET", &uri, None, &key.public_key())?;

    // Our federation endpoint refuses what it cannot verify, with the spec's 401.
    let url = ours.node.url(&uri);
    let refused = |auth: Option<String>| {
        let (http, url) = (ours.node.http.clone(), url.clone());
        async move {
            let mut req = http.get(&url);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await?;
            let status = resp.status().as_u16();
            let json: serde_json::Value = resp.json().await?;
            anyhow::Ok((status, json["errcode"].as_str().unwrap_or_default().to_owned()))
        }
    };
    let unauthorized = (401, "M_UNAUTHORIZED".to_owned());
    assert_eq!(refused(None).await?, unauthorized, "no signature");
    assert_eq!(refused(Some(format!("Bearer {ALICE}"))).await?, unauthorized, "a client token is no server signature");
    // Signed for another destination.
    let elsewhere = x_matrix::authorization(&key, &ours.server_name, "other.example", "GET", &uri, None)?;
    assert_eq!(refused(Some(elsewhere)).await?, unauthorized);
    // Signed by an origin whose keys cannot be fetched (nothing listens there).
    let nobody = format!("127.0.0.1:{}", free_port()?);
    let unknown = x_matrix::authorization(&key, &nobody, &ours.server_name, "GET", &uri, None)?;
    assert_eq!(refused(Some(unknown)).await?, unauthorized);
    // Signed by ourselves (our keys are fetchable over TLS), but for another URI, or forged.
    let other_uri = x_matrix::authorization(&key, &ours.server_name, &ours.server_name, "GET", "/x", None)?;
    assert_eq!(refused(Some(other_uri)).await?, unauthorized);
    let good = x_matrix::authorization(&key, &ours.server_name, &ours.server_name, "GET", &uri, None)?;
    assert_eq!(refused(Some(good.replace("sig=\"", "sig=\"AAAA"))).await?, unauthorized);
    // Only the first X-Matrix credential counts (one origin, one key fetch per request).
    let two = ours
        .node
        .http
        .get(&url)
        .header("authorization", good.replace("sig=\"", "sig=\"AAAA"))
        .header("authorization", good.clone())
        .send()
        .await?;
    assert_eq!(two.status(), 401);
    // And the same request, properly signed, is answered.
    let resp = ours.node.http.get(&url).header("authorization", good).send().await?;
    assert_eq!(resp.status(), 200, "{}", ours.node.log());
    let ct = resp.headers()["content-type"].to_str()?.to_owned();
    assert!(ct.starts_with("multipart/mixed; boundary="), "{ct}");
    let body = resp.bytes().await?;
    let boundary = mxcas_federation::multipart::boundary_of(&ct).expect("boundary");
    let mut reader = mxcas_federation::multipart::MultipartReader::new(&boundary);
    reader.push(&body);
    let mut bytes = Vec::new();
    while let Some(e) = reader.next_event()? {
        if let mxcas_federation::multipart::Event::Bytes(b) = e {
            bytes.extend(b);
        }
    }
    reader.finish()?;
    assert_eq!(bytes, test_bytes(3, 500));

    // The federation thumbnail endpoint: signed likewise, the client endpoint's parameters.
    let png_id = upload(&ours, png(300, 200)?).await?;
    let uri = format!("/_matrix/federation/v1/media/thumbnail/{png_id}?width=96&height=96&method=scale");
    let auth = x_matrix::authorization(&key, &ours.server_name, &ours.server_name, "GET", &uri, None)?;
    let resp = ours.node.http.get(ours.node.url(&uri)).header("authorization", auth).send().await?;
    assert_eq!(resp.status(), 200, "{}", ours.node.log());
    let ct = resp.headers()["content-type"].to_str()?.to_owned();
    let body = resp.bytes().await?;
    let mut reader = mxcas_federation::multipart::MultipartReader::new(
        &mxcas_federation::multipart::boundary_of(&ct).expect("boundary"),
    );
    reader.push(&body);
    let (mut thumb, mut kind) = (Vec::new(), None);
    while let Some(e) = reader.next_event()? {
        match e {
            mxcas_federation::multipart::Event::Head {
                media: mxcas_federation::multipart::MediaPart::Bytes { content_type, .. },
                ..
            } => kind = content_type,
            mxcas_federation::multipart::Event::Bytes(b) => thumb.extend(b),
            _ => {}
        }
    }
    assert!(kind.as_deref().is_some_and(|k| k.starts_with("image/")), "{kind:?}");
    let img = image::load_from_memory(&thumb)?;
    assert!(
        img.width() <= 300 && img.height() <= 200 && img.width().max(img.height()) >= 96,
        "{}x{}",
        img.width(),
        img.height()
    );
    let unsigned = ours.node.http.get(ours.node.url(&uri)).send().await?;
    assert_eq!(unsigned.status(), 401);
    Ok(())
}

/// A remote that answers every request with one fixed HTTP response (behind TLS): a server
/// that lies, or breaks off. Answers its TLS front, its server name and its request count.
async fn fixed_origin(
    pki: &TestPki,
    response: Vec<u8>,
) -> anyhow::Result<(Nginx, String, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    let (tls, name, hits, open) = gated_origin(pki, response).await?;
    // Open from the start (a closed gate answers nobody).
    open.send(true)?;
    Ok((tls, name, hits))
}

/// nginx terminating TLS for `upstream` on a free port, and the server name it answers as.
async fn tls_front(pki: &TestPki, upstream: &str) -> anyhow::Result<(Nginx, String)> {
    let port = free_port()?;
    let (cert, key) = (pki.config.cert.as_ref().expect("cert"), pki.config.key.as_ref().expect("key"));
    Ok((Nginx::start_tls(port, upstream, cert, key).await?, format!("127.0.0.1:{port}")))
}

fn multipart_response(body_bytes: &[u8], declared_len: Option<usize>) -> Vec<u8> {
    let b = "fixedboundary";
    let mut body = mxcas_federation::multipart::head(b, &serde_json::json!({}), "application/octet-stream", None);
    body.extend_from_slice(body_bytes);
    body.extend_from_slice(&mxcas_federation::multipart::tail(b));
    let len = declared_len.unwrap_or(body.len());
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: multipart/mixed; boundary={b}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

#[tokio::test]
async fn a_remote_that_lies_about_a_cid_or_breaks_off_is_never_stored_or_served() -> anyhow::Result<()> {
    let pki = TestPki::generate("federation")?;
    let ours = deployment(&pki).await?;
    let want = test_bytes(8, 5000);
    let cid = mxcas_cas::cid_of(&want).to_string();
    // Wrong bytes for the CID.
    let (_liar, liar_name, _) = fixed_origin(&pki, multipart_response(&test_bytes(9, 5000), None)).await?;
    let url = ours.node.url(&format!("/_matrix/client/v1/media/download/{liar_name}/{cid}"));
    for _ in 0..2 {
        let resp = ours.node.http.get(&url).bearer_auth(ALICE).send().await?;
        assert_eq!(resp.status(), 502, "{}", resp.text().await?);
    }
    assert_eq!(
        ours.node.metric("mxcas_edge_remote_fetches_total{result=\"mismatch\"}").await?,
        2.0,
        "asked again: nothing was kept"
    );
    assert_eq!(ours.node.metric("mxcas_edge_remote_fetches_total{result=\"stored\"}").await?, 0.0);
    // A body that stops before its Content-Length (the multipart never closes).
    let mut short = multipart_response(&want, None);
    short.truncate(short.len() - 40);
    let (_cut, cut_name, _) = fixed_origin(&pki, short).await?;
    let get = |url: String| {
        let http = ours.node.http.clone();
        async move {
            let resp = http.get(&url).bearer_auth(ALICE).send().await?;
            anyhow::Ok((resp.status().as_u16(), resp.bytes().await?))
        }
    };
    let (status, _) = get(ours.node.url(&format!("/_matrix/client/v1/media/download/{cut_name}/{cid}"))).await?;
    assert_eq!(status, 502);
    assert_eq!(
        ours.node.metric("mxcas_edge_remote_fetches_total{result=\"broken\"}").await?,
        1.0,
        "the answer broke off"
    );
    // A CID mxcas cannot check (a blake3 multihash) is not even fetched.
    let (_other, other_name, other_hits) = fixed_origin(&pki, multipart_response(&want, None)).await?;
    let blake3 = cid::Cid::new_v1(0x55, cid::multihash::Multihash::<64>::wrap(0x1e, &[7; 32])?).to_string();
    let (status, _) = get(ours.node.url(&format!("/_matrix/client/v1/media/download/{other_name}/{blake3}"))).await?;
    assert_eq!(status, 502);
    assert_eq!(other_hits.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing was asked of the origin");
    // An origin that fails (500) is left alone for a while: the next download does not ask it.
    let (_down, down_name, down_hits) = fixed_origin(
        &pki,
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await?;
    let down_url = ours.node.url(&format!("/_matrix/client/v1/media/download/{down_name}/{cid}"));
    assert_eq!(get(down_url.clone()).await?.0, 502);
    let again = ours.node.http.get(&down_url).bearer_auth(ALICE).send().await?;
    assert_eq!(again.status(), 502);
    assert!(again.headers().contains_key("retry-after"), "it says when to retry");
    assert_eq!(down_hits.load(std::sync::atomic::Ordering::SeqCst), 1, "asked once, then left alone");
    // An honest answer for the same CID is stored and served; eight downloads at once make one
    // fetch.
    let (_honest, honest_name, honest_hits) = fixed_origin(&pki, multipart_response(&want, None)).await?;
    let url = ours.node.url(&format!("/_matrix/client/v1/media/download/{honest_name}/{cid}"));
    let downloads = (0..8).map(|_| get(url.clone()));
    for (status, body) in futures::future::try_join_all(downloads).await? {
        assert_eq!(status, 200);
        assert!(body.as_ref() == want.as_slice());
    }
    assert_eq!(honest_hits.load(std::sync::atomic::Ordering::SeqCst), 1, "one fetch for all");
    assert_eq!(ours.node.metric("mxcas_edge_remote_fetches_total{result=\"stored\"}").await?, 1.0);
    Ok(())
}

impl Deployment {
    /// Restarts its node (a cold cache) and its TLS front, on the same server-name port.
    async fn restart(&mut self, pki: &TestPki) -> anyhow::Result<()> {
        self.node.restart().await?;
        self.tls = None;
        let port: u16 = self.server_name.rsplit(':').next().unwrap_or_default().parse()?;
        let (cert, key) = (pki.config.cert.as_ref().expect("cert"), pki.config.key.as_ref().expect("key"));
        self.tls = Some(Nginx::start_tls(port, &self.node.api, cert, key).await?);
        Ok(())
    }
}

/// A download through deployment `d` of `mxc://{server}/{id}` with query `query` (`?…` or empty).
async fn download_from(d: &Deployment, server: &str, id: &str, query: &str) -> anyhow::Result<(u16, bytes::Bytes)> {
    let url = d.node.url(&format!("/_matrix/client/v1/media/download/{server}/{id}{query}"));
    let resp = d.node.http.get(url).bearer_auth(ALICE).send().await?;
    Ok((resp.status().as_u16(), resp.bytes().await?))
}

/// The value of `sample` on `d` once it is `want` (a fetch streamed to its download is
/// counted when it is stored, just after the download's last byte).
async fn settled(d: &Deployment, sample: &str, want: f64) -> anyhow::Result<()> {
    let got =
        mxcas_tests::wait_for(&format!("{sample} to reach {want}"), std::time::Duration::from_secs(10), || async {
            (d.node.metric(sample).await.ok()? == want).then_some(())
        })
        .await;
    match got {
        Ok(()) => Ok(()),
        Err(e) => anyhow::bail!("{e}: {sample} is {:?}", d.node.metric(sample).await.ok()),
    }
}

const STORED: &str = "mxcas_edge_remote_fetches_total{result=\"stored\"}";

/// MSC2846: media named by a CID outlives its origin. Deployment B fetched two files from A;
/// C cannot reach A (its address for A is a dead port), and its users get them through `via`
/// B (B's trustless gateway, open to other servers, serves their blocks to C's signed
/// requests; C verifies each block), past a `via` that serves wrong bytes for everything. A
/// `via` is never passed on: B could fetch more from A, and does not for C. A server whose
/// gateway does not serve other servers refuses C's signed requests; an identity CID needs no
/// server at all.
#[tokio::test]
async fn with_its_origin_gone_media_downloads_via_servers_that_hold_it() -> anyhow::Result<()> {
    let pki = TestPki::generate("federation")?;
    let open = "ipfs_gateway = \"federation\"\n";
    let a = deployment(&pki).await?;
    let b = deployment_with(&pki, "", open).await?;
    let closed = deployment(&pki).await?;
    let origin = a.server_name.clone();
    let c = deployment_with(&pki, &format!("resolve = {{ \"{origin}\" = \"127.0.0.1:1\" }}\n"), "").await?;
    let big = test_bytes(11, 3 * 1024 * 1024 + 17);
    let small = test_bytes(12, 20_000);
    let only_a = test_bytes(13, 9_000);
    let big_id = upload(&a, big.clone()).await?;
    let small_id = upload(&a, small.clone()).await?;
    let only_a_id = upload(&a, only_a.clone()).await?;
    assert!(big_id.starts_with("bafy") && small_id.starts_with("bafk"), "a DAG and a raw block: {big_id} {small_id}");
    for (id, want) in [(&big_id, &big), (&small_id, &small)] {
        let (status, body) = download_from(&b, &origin, id, "").await?;
        assert_eq!(status, 200, "B fetches from A: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
        assert!(body.as_ref() == want.as_slice());
    }
    assert_eq!(b.node.metric(STORED).await?, 2.0);

    let (status, _) = download_from(&c, &origin, &big_id, "").await?;
    assert_eq!(status, 502, "C cannot reach the origin and no other server was named");
    let (_liar, liar, liar_hits) = fixed_origin(
        &pki,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ipld.raw\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlies!"
            .to_vec(),
    )
    .await?;
    let via = format!("?via={liar}&via={}", b.server_name);
    for (id, want) in [(&big_id, &big), (&small_id, &small)] {
        let (status, body) = download_from(&c, &origin, id, &via).await?;
        assert_eq!(
            status,
            200,
            "{}\n--- C ---\n{}\n--- B ---\n{}",
            String::from_utf8_lossy(&body[..body.len().min(300)]),
            c.node.log(),
            b.node.log()
        );
        assert!(body.as_ref() == want.as_slice(), "C serves exactly A's bytes");
        // One fetch at a time, so the liar is asked for each root in turn.
        settled(&c, STORED, if id == &big_id { 1.0 } else { 2.0 }).await?;
    }
    let liar_asked = liar_hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        c.node.metric("mxcas_edge_gateway_blocks_total{result=\"bad\"}").await?,
        2.0,
        "the liar, named first, was asked for each root once, then dropped ({liar_asked} requests)"
    );
    assert!(c.node.metric("mxcas_edge_gateway_blocks_total{result=\"verified\"}").await? >= 5.0);
    // Held now: served again with no server named and none asked.
    let (status, body) = download_from(&c, &origin, &big_id, "").await?;
    assert_eq!(status, 200);
    assert!(body.as_ref() == big.as_slice());
    assert_eq!(liar_hits.load(std::sync::atomic::Ordering::SeqCst), liar_asked);

    // What B never fetched, B does not go and get for C, though it could reach A: its gateway
    // serves what it holds.
    let b_not_found = b.node.metric("mxcas_edge_gateway_responses_total{result=\"not_found\"}").await?;
    let (status, _) = download_from(&c, &origin, &only_a_id, &format!("?via={}", b.server_name)).await?;
    assert_eq!(status, 502, "the origin is unreachable and B does not have it: ask again later");
    assert_eq!(
        b.node.metric("mxcas_edge_gateway_responses_total{result=\"not_found\"}").await?,
        b_not_found + 1.0,
        "C asked B for the root"
    );
    assert_eq!(b.node.metric(STORED).await?, 2.0, "B passed nothing on");
    // A server holding the file whose gateway serves users only refuses C's signed requests.
    upload(&closed, only_a.clone()).await?;
    let refused = "mxcas_edge_gateway_responses_total{result=\"refused\"}";
    let (status, _) = download_from(&c, &origin, &only_a_id, &format!("?via={}", closed.server_name)).await?;
    assert_eq!(status, 502);
    assert_eq!(closed.node.metric(refused).await?, 1.0, "refused once, then not asked again by that fetch");
    assert_eq!(c.node.metric(STORED).await?, 2.0);
    // A refusal is not a failure to answer: C does not back the refusing server off.
    let (status, _) = download_from(&c, &origin, &only_a_id, &format!("?via={}", closed.server_name)).await?;
    assert_eq!(status, 502);
    assert_eq!(closed.node.metric(refused).await?, 2.0, "asked again by the next fetch");
    // Unsigned, B's gateway wants a user's token.
    let unsigned = b.node.http.get(b.node.url(&format!("/ipfs/{small_id}?format=raw"))).send().await?;
    assert_eq!(unsigned.status(), 401);
    // An identity CID carries its bytes: no server is asked (the origin is backed off anyway).
    let inline = cid::Cid::new_v1(0x55, cid::multihash::Multihash::<64>::wrap(0x00, b"carried in the CID")?);
    let (status, body) = download_from(&c, &origin, &inline.to_string(), "").await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body.as_ref(), b"carried in the CID");
    Ok(())
}

/// A client's `via` list cannot make the edge connect to private addresses (without
/// `allow_private_addresses`), and a `via` that never answers costs one deadline
/// (`remote_media_timeout`), after which nothing is stored.
#[tokio::test]
async fn via_servers_are_bounded_by_the_address_rules_and_the_deadline() -> anyhow::Result<()> {
    let pki = TestPki::generate("federation")?;
    let cid = mxcas_cas::cid_of(&test_bytes(16, 5000)).to_string();
    let (_holder, holder, holder_hits) = fixed_origin(&pki, multipart_response(b"x", None)).await?;
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("signing.key");
    std::fs::write(&key_file, format!("ed25519 a_mx {}\n", encode_base64(&SEED)))?;
    // It trusts the test CA: only the address rules stand between it and the holder.
    let strict = Node::start(NodeOptions {
        extra: format!(
            "[federation]\nsigning_key_file = \"{}\"\nca_file = \"{}\"\n",
            key_file.display(),
            pki.config.ca.as_ref().expect("ca").display()
        ),
        ..Default::default()
    })
    .await?;
    let url = strict.url(&format!("/_matrix/client/v1/media/download/public.example/{cid}?via={holder}&via=10.1.2.3"));
    let resp = strict.http.get(url).bearer_auth(ALICE).send().await?;
    assert_eq!(resp.status(), 502);
    assert_eq!(holder_hits.load(std::sync::atomic::Ordering::SeqCst), 0, "a loopback via is never connected to");

    // A via that takes requests and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent_url = format!("http://{}", silent.local_addr()?);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let (_tls, silent_name) = tls_front(&pki, &silent_url).await?;
    let ours = deployment_with(&pki, "remote_media_timeout = \"2s\"\n", "").await?;
    let started = std::time::Instant::now();
    let (status, _) = download_from(&ours, "127.0.0.1:1", &cid, &format!("?via={silent_name}")).await?;
    assert_eq!(status, 502);
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "bounded: {:?}", started.elapsed());
    assert_eq!(ours.node.metric(STORED).await?, 0.0);
    Ok(())
}

/// Remote media named by a CID of another layout than mxcas's (the IPFS importer's defaults:
/// 256 KiB chunks; kubo's legacy CIDv0 with dag-pb leaves) cannot be checked whole: the bytes
/// its origin serves over federation are discarded, then it is fetched by blocks from the
/// origin's trustless gateway, each verified, stored and served.
#[tokio::test]
async fn media_named_by_a_cid_of_another_layout_is_fetched_by_verified_blocks() -> anyhow::Result<()> {
    let pki = TestPki::generate("federation")?;
    let ours = deployment(&pki).await?;
    for legacy in [false, true] {
        let want = test_bytes(14 + u64::from(legacy), 1536 * 1024 + 3);
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), &want)?;
        // The plain gateway also answers the federation download, with the whole file.
        let gw = mxcas_tests::oracle::PlainGateways::start(file.path(), legacy, &["ok"])?;
        let (_tls, origin) = tls_front(&pki, &gw.urls[0]).await?;
        let (status, body) = download_from(&ours, &origin, &gw.root, "").await?;
        assert_eq!(
            status,
            200,
            "legacy {legacy}: {}\n{}",
            String::from_utf8_lossy(&body[..body.len().min(300)]),
            ours.node.log()
        );
        assert!(body.as_ref() == want.as_slice(), "legacy {legacy}: the bytes its CID names");
    }
    settled(&ours, STORED, 2.0).await?;
    assert_eq!(
        ours.node.metric("mxcas_edge_remote_fetches_total{result=\"mismatch\"}").await?,
        2.0,
        "each origin's whole bytes were asked first, and could not be proven whole"
    );
    assert_eq!(ours.node.metric("mxcas_edge_gateway_blocks_total{result=\"bad\"}").await?, 0.0);
    Ok(())
}

/// Every byte but ASCII letters and digits percent-encoded (room and event IDs in a URL).
fn enc(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// A JSON call to a Synapse's client API, answering the JSON of a 200.
async fn client_call(
    method: reqwest::Method,
    url: String,
    token: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let resp = reqwest::Client::new().request(method, &url).bearer_auth(token).json(&body).send().await?;
    let status = resp.status();
    let json: serde_json::Value = resp.json().await?;
    anyhow::ensure!(status == 200, "{url}: {status} {json}");
    Ok(json)
}

/// MSC2846's room hint: media sent in a room, whose origin is gone, downloads from the servers
/// that were in that room. Two Synapses federate, and a user of each is in a public room when
/// the media is sent; then homeserver one's user leaves. Homeserver
/// `one`'s media repository is mxcas B (its federation port sends the media prefixes and
/// `/ipfs/` to B), which holds the file; `two`'s users download through mxcas C, which checks
/// their tokens with `two`, learns the room's servers from `two` with the user's token, and
/// asks B's gateway with requests signed as `two` (B checks them with `two`'s published key).
#[tokio::test]
async fn with_its_origin_gone_media_downloads_from_the_servers_of_its_room() -> anyhow::Result<()> {
    let pki = TestPki::generate("federation")?;
    let (cert, key) = (pki.config.cert.clone().expect("cert"), pki.config.key.clone().expect("key"));
    let ca = pki.config.ca.clone().expect("ca");
    let federation = |key_file: &std::path::Path| {
        format!(
            "[federation]\nsigning_key_file = \"{}\"\nallow_private_addresses = true\nca_file = \"{}\"\n",
            key_file.display(),
            ca.display()
        )
    };
    // Homeserver one and its media repository B, which holds the file.
    let (one_port, one_federation) = (free_port()?, free_port()?);
    let one_name = format!("127.0.0.1:{one_port}");
    let one = Synapse::start_with(
        &one_name,
        serde_json::json!({
            "federation_custom_ca_list": [ca],
            "federation_verify_certificates": true,
            "ip_range_blacklist": [],
            "_listeners": [{"port": one_federation, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": false,
                            "resources": [{"names": ["federation"], "compress": false}]}],
        }),
    )
    .await?;
    let b = Node::start(NodeOptions {
        server_name: Some(one_name.clone()),
        extra: federation(&one.signing_key_file()?),
        media: "ipfs_gateway = \"federation\"\n".to_owned(),
        ..Default::default()
    })
    .await?;
    let file = test_bytes(21, 2 * 1024 * 1024 + 9);
    let cid = b.upload_ok(file.clone()).await?;
    let _one_front =
        Nginx::start_tls_split(one_port, &format!("http://127.0.0.1:{one_federation}"), Some(&b.api), &cert, &key)
            .await?;
    // Homeserver two and its media repository C.
    let two = federating_synapse(&pki).await?;
    let c = Node::start(NodeOptions {
        server_name: Some(two.server_name.clone()),
        auth: format!("homeserver_url = \"{}\"\n", two.url),
        static_tokens: false,
        extra: federation(&two.signing_key_file()?),
        ..Default::default()
    })
    .await?;
    one.register("alice", "alice-password-1")?;
    two.register("bob", "bob-password-1")?;
    two.register("carol", "carol-password-1")?;
    let alice = one.login("alice", "alice-password-1").await?;
    let bob = two.login("bob", "bob-password-1").await?;
    let carol = two.login("carol", "carol-password-1").await?;

    // The media was announced from a server that is gone (nothing listens on port 1).
    let origin = "127.0.0.1:1";
    let post = reqwest::Method::POST;
    let room = client_call(
        post.clone(),
        format!("{}/_matrix/client/v3/createRoom", one.url),
        &alice,
        serde_json::json!({"preset": "public_chat"}),
    )
    .await?["room_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    client_call(
        post,
        format!("{}/_matrix/client/v3/join/{}?server_name={}", two.url, enc(&room), enc(&one_name)),
        &bob,
        serde_json::json!({}),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n--- one ---\n{}\n--- two ---\n{}", one.log(), two.log()))?;
    let event = client_call(
        reqwest::Method::PUT,
        format!("{}/_matrix/client/v3/rooms/{}/send/m.room.message/t1", one.url, enc(&room)),
        &alice,
        serde_json::json!({"msgtype": "m.file", "body": "the file", "url": format!("mxc://{origin}/{cid}")}),
    )
    .await?["event_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let context = format!("{}/_matrix/client/v3/rooms/{}/context/{}?limit=0", two.url, enc(&room), enc(&event));
    mxcas_tests::wait_for("the event to reach homeserver two", std::time::Duration::from_secs(30), || {
        let (url, bob) = (context.clone(), bob.clone());
        async move {
            let resp = reqwest::Client::new().get(&url).bearer_auth(&bob).send().await.ok()?;
            (resp.status() == 200).then_some(())
        }
    })
    .await?;
    // Alice leaves: homeserver one was in the room when the media was sent, and is not now, so
    // only the room's state at the event (`/context`) names it.
    client_call(
        reqwest::Method::POST,
        format!("{}/_matrix/client/v3/rooms/{}/leave", one.url, enc(&room)),
        &alice,
        serde_json::json!({}),
    )
    .await?;
    let members = format!("{}/_matrix/client/v3/rooms/{}/joined_members", two.url, enc(&room));
    mxcas_tests::wait_for("alice's leave to reach homeserver two", std::time::Duration::from_secs(30), || {
        let (url, bob) = (members.clone(), bob.clone());
        async move {
            let json: serde_json::Value =
                reqwest::Client::new().get(&url).bearer_auth(&bob).send().await.ok()?.json().await.ok()?;
            let joined = json["joined"].as_object()?;
            (joined.len() == 1).then_some(())
        }
    })
    .await?;

    let download = |token: String, query: String| {
        let url = c.url(&format!("/_matrix/client/v1/media/download/{origin}/{cid}{query}"));
        let http = c.http.clone();
        async move {
            let resp = http.get(url).bearer_auth(token).send().await?;
            anyhow::Ok((resp.status().as_u16(), resp.bytes().await?))
        }
    };
    let hint = format!("?room={}&event={}", enc(&room), enc(&event));
    let (status, _) = download(bob.clone(), String::new()).await?;
    assert_eq!(status, 502, "no hint: only the origin, which is gone");
    let (status, _) = download(carol.clone(), hint.clone()).await?;
    assert_eq!(status, 502, "carol is not in the room: its servers are not hers to learn");
    let raw_before = b.metric("mxcas_edge_gateway_responses_total{result=\"raw\"}").await?;
    let (status, body) = download(bob.clone(), hint).await?;
    assert_eq!(
        status,
        200,
        "{}\n--- C ---\n{}\n--- B ---\n{}",
        String::from_utf8_lossy(&body[..body.len().min(300)]),
        c.log(),
        b.log()
    );
    assert!(body.as_ref() == file.as_slice(), "the bytes the CID names");
    assert!(
        b.metric("mxcas_edge_gateway_responses_total{result=\"raw\"}").await? >= raw_before + 3.0,
        "the blocks came from B, homeserver one's media repository"
    );
    Ok(())
}

/// A remote that answers `response` to every request, but only once `open` is set: a fetch
/// that is certainly still running while the test looks.
async fn gated_origin(
    pki: &TestPki,
    response: Vec<u8>,
) -> anyhow::Result<(Nginx, String, std::sync::Arc<std::sync::atomic::AtomicUsize>, tokio::sync::watch::Sender<bool>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = format!("http://{}", listener.local_addr()?);
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (open, gate) = tokio::sync::watch::channel(false);
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (response, mut gate, counter) = (response.clone(), gate.clone(), counter.clone());
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if gate.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let _ = socket.write_all(&response).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    let (tls, name) = tls_front(pki, &upstream).await?;
    Ok((tls, name, hits, open))
}

/// Two edges of one cluster asked for the same remote media at once fetch it once: the second
/// finds the first's claim with the metadata leader and waits for its record. The origin
/// holds its answer until the second edge is seen waiting, so the fetches certainly overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_fetch_remote_media_once_for_the_cluster() -> anyhow::Result<()> {
    use mxcas_tests::cluster::{Cluster, MetaOptions};
    let pki = TestPki::generate("federation")?;
    let want = test_bytes(17, 300_000);
    let cid = mxcas_cas::cid_of(&want).to_string();
    let (_origin, origin, hits, open) = gated_origin(&pki, multipart_response(&want, None)).await?;
    let s3 = mxcas_tests::s3::SeaweedFs::start().await?;
    let cluster = Cluster::start(1, MetaOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("signing.key");
    std::fs::write(&key_file, format!("ed25519 a_mx {}\n", encode_base64(&SEED)))?;
    let edge = || {
        Node::start(NodeOptions {
            store: s3.store(),
            edge_meta: cluster.endpoints(),
            extra: format!(
                "[federation]\nsigning_key_file = \"{}\"\nallow_private_addresses = true\nca_file = \"{}\"\n",
                key_file.display(),
                pki.config.ca.as_ref().expect("ca").display()
            ),
            ..Default::default()
        })
    };
    let (a, b) = (edge().await?, edge().await?);
    let get = |node: &Node| {
        let (http, url) = (node.http.clone(), node.url(&format!("/_matrix/client/v1/media/download/{origin}/{cid}")));
        tokio::spawn(async move {
            let resp = http.get(url).bearer_auth(ALICE).send().await?;
            anyhow::Ok((resp.status().as_u16(), resp.bytes().await?))
        })
    };
    let first = get(&a);
    mxcas_tests::wait_for("edge A to ask the origin", std::time::Duration::from_secs(10), || async {
        (hits.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    })
    .await?;
    let second = get(&b);
    let waited = "mxcas_edge_remote_fetches_total{result=\"waited\"}";
    mxcas_tests::wait_for("edge B to wait for A's fetch", std::time::Duration::from_secs(10), || async {
        (b.metric(waited).await.ok()? == 1.0).then_some(())
    })
    .await?;
    open.send(true)?;
    for answer in [first.await??, second.await??] {
        assert_eq!(answer.0, 200, "{}", String::from_utf8_lossy(&answer.1));
        assert!(answer.1.as_ref() == want.as_slice());
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1, "the origin was asked once for the cluster");
    assert_eq!(a.metric(STORED).await?, 1.0);
    assert_eq!(b.metric(STORED).await?, 0.0, "B served A's record");
    Ok(())
}
