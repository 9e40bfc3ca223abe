//! The Matrix media API of a real `mxcas serve` process: every endpoint, header and error.
//! Reproduce one test: `scripts/test.sh <test name>`.

use std::time::Duration;

use mxcas_tests::node::{ALICE, BOB};
use mxcas_tests::{Node, NodeOptions, test_bytes};
use serde_json::Value;

type R = anyhow::Result<()>;

async fn json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn errcode(v: &Value) -> &str {
    v["errcode"].as_str().unwrap_or("<none>")
}

#[tokio::test]
async fn upload_returns_the_cid_and_downloads_byte_identical() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    let data = b"hello mxcas".to_vec();
    let (status, body) = json(node.upload(data.clone(), "text/plain", Some("hello.txt")).await?).await;
    assert_eq!(status, 200, "{body}");
    let want = format!("mxc://localhost/{}", mxcas_cas::cid_of(&data));
    assert_eq!(body["content_uri"], want.as_str());
    let id = want.rsplit('/').next().unwrap_or_default();
    assert!(id.starts_with("bafkrei"));

    for path in [
        format!("/_matrix/client/v1/media/download/localhost/{id}"),
        format!("/_matrix/client/v1/media/download/localhost/{id}/other.txt"),
        format!("/_matrix/media/v3/download/localhost/{id}"),
        format!("/_matrix/media/v3/download/localhost/{id}/other.txt"),
    ] {
        let resp = node.http.get(node.url(&path)).bearer_auth(ALICE).send().await?;
        assert_eq!(resp.status(), 200, "{path}");
        let h = resp.headers().clone();
        // Named by its CID: the bytes decide the type, and only the URL names the file.
        assert_eq!(h["content-type"], "text/plain; charset=utf-8");
        let disposition = h["content-disposition"].to_str()?;
        let want = if path.ends_with("other.txt") { "inline; filename*=utf-8''other.txt" } else { "inline" };
        assert_eq!(disposition, want, "{path}");
        assert_eq!(h["etag"], format!("\"{id}\"").as_str());
        assert!(h["cache-control"].to_str()?.contains("immutable"));
        assert!(h["content-security-policy"].to_str()?.starts_with("sandbox;"));
        assert_eq!(h["cross-origin-resource-policy"], "cross-origin");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["access-control-allow-origin"], "*");
        assert_eq!(resp.bytes().await?.as_ref(), data.as_slice());
    }
    Ok(())
}

#[tokio::test]
async fn unsafe_types_download_as_attachments_and_filenames_are_encoded() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    let resp = node.upload(b"<script>alert(1)</script>".to_vec(), "text/html", Some("x%22%3B%0Ay.html")).await?;
    let (status, body) = json(resp).await;
    assert_eq!((status, errcode(&body)), (400, "M_INVALID_PARAM"), "control characters in filenames are refused");
    // Named by its CID, markup is text: served as text/plain, whatever was declared.
    let resp = node.upload(b"<script>alert(1)</script>".to_vec(), "text/html", Some("x%22%3B%20%C3%BCy.html")).await?;
    let (status, body) = json(resp).await;
    assert_eq!(status, 200, "{body}");
    let id = body["content_uri"].as_str().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_owned();
    let resp = node.download(&id).await?;
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    // Under a reserved ID the uploader's type is kept: an unsafe one is an attachment, and its
    // filename is encoded.
    let (_, created) =
        json(node.http.post(node.url("/_matrix/media/v1/create")).bearer_auth(ALICE).send().await?).await;
    let reserved =
        created["content_uri"].as_str().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_owned();
    let put = node.url(&format!("/_matrix/media/v3/upload/localhost/{reserved}?filename=x%22%3B%20%C3%BCy.html"));
    let resp =
        node.http.put(put).bearer_auth(ALICE).header("content-type", "text/html").body("<script>alert(2)</script>");
    assert_eq!(resp.send().await?.status(), 200);
    let resp = node.download(&reserved).await?;
    assert_eq!(resp.headers()["content-type"], "text/html");
    assert_eq!(resp.headers()["content-disposition"], "attachment; filename*=utf-8''x%22%3B%20%C3%BCy.html");
    Ok(())
}

#[tokio::test]
async fn no_uploader_changes_how_the_same_bytes_are_served_to_others() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    let png: Vec<u8> =
        [&[0x89u8, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H', b'D', b'R'][..], &[7u8; 200]]
            .concat();
    // The first upload of a sticker's bytes claims they are a Windows program named run.exe...
    let (status, first) = json(node.upload(png.clone(), "application/x-msdownload", Some("run.exe")).await?).await;
    assert_eq!(status, 200, "{first}");
    // ...the next one says what they are: both get the same mxc, served the same way.
    let (status, second) = json(node.upload(png.clone(), "image/png", Some("sticker.png")).await?).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(first["content_uri"], second["content_uri"]);
    let id = first["content_uri"].as_str().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_owned();
    let resp = node.download(&id).await?;
    assert_eq!(resp.headers()["content-type"], "image/png", "the bytes decide, not the first uploader");
    assert_eq!(resp.headers()["content-disposition"], "inline", "no uploader's filename is served to others");
    assert_eq!(resp.bytes().await?.as_ref(), png.as_slice());
    // A real executable is served as one (an attachment), however it is declared.
    let (_, exe) = json(node.upload(b"MZ\x90\x00\x03\x00\x00\x00 program".to_vec(), "image/png", None).await?).await;
    let exe_id = exe["content_uri"].as_str().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_owned();
    let resp = node.download(&exe_id).await?;
    assert_eq!(resp.headers()["content-type"], "application/vnd.microsoft.portable-executable");
    assert!(resp.headers()["content-disposition"].to_str()?.starts_with("attachment"));
    Ok(())
}

#[tokio::test]
async fn auth_errors() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    let up = node.url("/_matrix/media/v3/upload");
    let (s, b) = json(node.http.post(&up).body("x").send().await?).await;
    assert_eq!((s, errcode(&b)), (401, "M_MISSING_TOKEN"));
    let (s, b) = json(node.http.post(&up).bearer_auth("wrong-token-123").body("x").send().await?).await;
    assert_eq!((s, errcode(&b)), (401, "M_UNKNOWN_TOKEN"));
    let id = node.upload_ok(b"x".to_vec()).await?;
    let url = node.url(&format!("/_matrix/client/v1/media/download/localhost/{id}"));
    let (s, b) = json(node.http.get(&url).send().await?).await;
    assert_eq!((s, errcode(&b)), (401, "M_MISSING_TOKEN"));
    // The scheme is case-insensitive; the deprecated query parameter still works.
    for auth in ["bearer", "BEARER"] {
        let resp = node.http.get(&url).header("authorization", format!("{auth} {ALICE}")).send().await?;
        assert_eq!(resp.status(), 200, "{auth}");
    }
    assert_eq!(node.http.get(format!("{url}?access_token={ALICE}")).send().await?.status(), 200);
    for path in ["/_matrix/client/v1/media/config", "/_matrix/media/v3/config", "/_matrix/media/v1/create"] {
        let req = if path.ends_with("create") { node.http.post(node.url(path)) } else { node.http.get(node.url(path)) };
        let (s, b) = json(req.send().await?).await;
        assert_eq!((s, errcode(&b)), (401, "M_MISSING_TOKEN"), "{path}");
    }
    Ok(())
}

#[tokio::test]
async fn config_reports_the_upload_limit() -> R {
    let node = Node::start(NodeOptions { media: "max_upload_size = \"2 MiB\"".into(), ..Default::default() }).await?;
    for path in ["/_matrix/client/v1/media/config", "/_matrix/media/v3/config"] {
        let (s, b) = json(node.http.get(node.url(path)).bearer_auth(ALICE).send().await?).await;
        assert_eq!(s, 200);
        assert_eq!(b["m.upload.size"], 2 * 1024 * 1024);
    }
    Ok(())
}

#[tokio::test]
async fn not_found_and_malformed_ids() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    let missing = mxcas_cas::cid_of(b"never uploaded").to_string();
    let (s, b) = json(node.download(&missing).await?).await;
    assert_eq!((s, errcode(&b)), (404, "M_NOT_FOUND"));
    let (s, b) =
        json(node.http.get(node.url(&format!("/_matrix/media/v3/download/other.example/{missing}"))).send().await?)
            .await;
    assert_eq!((s, errcode(&b)), (404, "M_NOT_FOUND"));
    for bad in ["a.b", "x%2Fy", "%00", "a%20b", "%C3%BC"] {
        let (s, b) =
            json(node.http.get(node.url(&format!("/_matrix/media/v3/download/localhost/{bad}"))).send().await?).await;
        assert_eq!((s, errcode(&b)), (400, "M_INVALID_PARAM"), "media id {bad}");
    }
    for bad in ["bad%20host", "a..b", "a%2Fb", "host:99999"] {
        let (s, b) =
            json(node.http.get(node.url(&format!("/_matrix/media/v3/download/{bad}/abc"))).send().await?).await;
        assert_eq!((s, errcode(&b)), (400, "M_INVALID_PARAM"), "server {bad}");
    }
    // Path traversal never reaches a handler as a file path.
    let resp = node.http.get(node.url("/_matrix/media/v3/download/localhost/../../../etc/passwd")).send().await?;
    assert!(resp.status() == 404 || resp.status() == 400, "{}", resp.status());
    for path in ["/_matrix/media/v3/download/localhost/%FF", "/_matrix/media/v3/download/%FF/abc"] {
        let (s, b) = json(node.http.get(node.url(path)).send().await?).await;
        assert_eq!((s, errcode(&b)), (400, "M_INVALID_PARAM"), "{path}");
    }
    let (s, b) = json(node.http.get(node.url("/_matrix/media/v3/thumbnail_nope")).send().await?).await;
    assert_eq!((s, errcode(&b)), (404, "M_UNRECOGNIZED"));
    let (s, b) = json(node.http.delete(node.url("/_matrix/media/v3/upload")).send().await?).await;
    assert_eq!((s, errcode(&b)), (405, "M_UNRECOGNIZED"));
    Ok(())
}

#[tokio::test]
async fn content_types_must_be_one_media_type() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    for bad in ["text/plain;a=b,text/html", "text/plain, text/html", "html", "text/plain;x"] {
        let (s, b) = json(node.upload(b"<b>x</b>".to_vec(), bad, None).await?).await;
        assert_eq!((s, errcode(&b)), (400, "M_INVALID_PARAM"), "{bad}");
    }
    let (s, _) = json(node.upload(b"x".to_vec(), "text/plain; charset=\"utf-8\"", None).await?).await;
    assert_eq!(s, 200);
    Ok(())
}

#[tokio::test]
async fn stalled_uploads_time_out_and_store_nothing() -> R {
    let node = Node::start(NodeOptions { media: "upload_idle_timeout = \"1s\"".into(), ..Default::default() }).await?;
    let started = std::time::Instant::now();
    let answer = raw_request(&node, "Content-Length: 1000\r\n", b"only a little").await?;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(node.local_blobs().is_empty(), "{:?}", node.local_blobs());
    Ok(())
}

#[tokio::test]
async fn cors_preflight() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    let resp = node.http.request(reqwest::Method::OPTIONS, node.url("/_matrix/media/v3/upload")).send().await?;
    assert!(resp.status().is_success());
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    assert!(resp.headers()["access-control-allow-headers"].to_str()?.contains("Authorization"));
    Ok(())
}

#[tokio::test]
async fn same_bytes_twice_are_stored_once_and_give_the_same_mxc() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    let data = test_bytes(7, 3 * 1024 * 1024 + 17);
    let a = node.upload_ok(data.clone()).await?;
    let blobs_after_first = node.local_blobs().len();
    assert_eq!(blobs_after_first, 2, "blob + block index: {:?}", node.local_blobs());
    let b = node.upload_ok(data.clone()).await?;
    assert_eq!(a, b);
    // The duplicate's objects are deleted in the background.
    mxcas_tests::wait_for("duplicate blob removal", Duration::from_secs(10), || {
        let n = node.local_blobs().len();
        async move { (n == blobs_after_first).then_some(()) }
    })
    .await?;
    assert_eq!(node.metric("mxcas_edge_uploads_total{result=\"deduplicated\"}").await?, 1.0);
    assert_eq!(node.download(&a).await?.bytes().await?.as_ref(), data.as_slice());
    Ok(())
}

#[tokio::test]
async fn too_large_uploads_are_refused_and_leave_nothing() -> R {
    let node = Node::start(NodeOptions { media: "max_upload_size = \"1 MiB\"".into(), ..Default::default() }).await?;
    // Declared too large: refused before any body byte is sent.
    let answer = raw_request(&node, "Content-Length: 1048577\r\n", &[]).await?;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("M_TOO_LARGE"), "{answer}");
    // Chunked (no Content-Length): refused once the body grows past the limit.
    let mut chunked = Vec::new();
    for _ in 0..11 {
        chunked.extend_from_slice(format!("{:x}\r\n", 100 * 1024).as_bytes());
        chunked.extend_from_slice(&[2u8; 100 * 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    let answer = raw_request(&node, "Transfer-Encoding: chunked\r\n", &chunked).await?;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("M_TOO_LARGE"), "{answer}");
    assert!(node.local_blobs().is_empty(), "{:?}", node.local_blobs());
    // Exactly at the limit is fine.
    node.upload_ok(vec![3u8; 1024 * 1024]).await?;
    Ok(())
}

#[tokio::test]
async fn truncated_bodies_store_nothing() -> R {
    use tokio::io::AsyncWriteExt;
    let node = Node::start(NodeOptions::default()).await?;
    let addr = node.api.trim_start_matches("http://").to_owned();
    for declared in [1000usize, 20 * 1024 * 1024] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await?;
        let head = format!(
            "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\nContent-Length: {declared}\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(&vec![9u8; declared / 2]).await?;
        conn.shutdown().await?;
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut answer))
                .await;
        let text = String::from_utf8_lossy(&answer);
        assert!(!text.starts_with("HTTP/1.1 200"), "a truncated body must not be acknowledged: {text}");
        if !text.is_empty() {
            assert!(text.starts_with("HTTP/1.1 400") && text.contains("M_UNKNOWN"), "{text}");
        }
    }
    // Give aborts a moment to finish, then nothing may remain: no blob, no staging file.
    mxcas_tests::wait_for("aborted uploads to be cleaned", Duration::from_secs(10), || {
        let empty = node.local_blobs().is_empty();
        async move { empty.then_some(()) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", node.local_blobs()))?;
    assert_eq!(node.metric("mxcas_edge_uploads_total{result=\"new\"}").await?, 0.0);
    Ok(())
}

#[tokio::test]
async fn async_upload_flow() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    let create = node.url("/_matrix/media/v1/create");
    let (s, b) = json(node.http.post(&create).bearer_auth(ALICE).send().await?).await;
    assert_eq!(s, 200, "{b}");
    let uri = b["content_uri"].as_str().unwrap_or_default().to_owned();
    assert!(b["unused_expires_at"].as_u64().unwrap_or(0) > 0);
    let id = uri.strip_prefix("mxc://localhost/").unwrap_or_default().to_owned();
    let put = node.url(&format!("/_matrix/media/v3/upload/localhost/{id}?filename=late.txt"));

    // Not uploaded yet: waits up to timeout_ms, then 504.
    let started = std::time::Instant::now();
    let url = node.url(&format!("/_matrix/client/v1/media/download/localhost/{id}?timeout_ms=300"));
    let (s, b) = json(node.http.get(&url).bearer_auth(ALICE).send().await?).await;
    assert_eq!((s, errcode(&b)), (504, "M_NOT_YET_UPLOADED"));
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A waiting download completes when the content arrives.
    let waiting = {
        let (http, url) = (
            node.http.clone(),
            node.url(&format!("/_matrix/client/v1/media/download/localhost/{id}?timeout_ms=10000")),
        );
        tokio::spawn(async move { http.get(url).bearer_auth(ALICE).send().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Another user may not fill it.
    let (s, b) = json(node.http.put(&put).bearer_auth(BOB).body("nope").send().await?).await;
    assert_eq!((s, errcode(&b)), (403, "M_FORBIDDEN"));
    let (s, b) =
        json(node.http.put(&put).bearer_auth(ALICE).header("content-type", "text/plain").body("late").send().await?)
            .await;
    assert_eq!(s, 200, "{b}");
    let resp = waiting.await??;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-disposition"], "inline; filename*=utf-8''late.txt");
    assert_eq!(resp.bytes().await?.as_ref(), b"late");

    let (s, b) = json(node.http.put(&put).bearer_auth(ALICE).body("again").send().await?).await;
    assert_eq!((s, errcode(&b)), (409, "M_CANNOT_OVERWRITE_MEDIA"));
    let unknown = node.url("/_matrix/media/v3/upload/localhost/NoSuchReservation123");
    let (s, b) = json(node.http.put(&unknown).bearer_auth(ALICE).body("x").send().await?).await;
    assert_eq!((s, errcode(&b)), (404, "M_NOT_FOUND"));
    // A media ID that happens to be a CID is not a reservation either, and an existing mxc
    // is never overwritten through PUT.
    let cid = mxcas_cas::cid_of(b"put without create").to_string();
    let put_cid = node.url(&format!("/_matrix/media/v3/upload/localhost/{cid}"));
    for _ in 0..2 {
        let (s, b) = json(node.http.put(&put_cid).bearer_auth(ALICE).body("put without create").send().await?).await;
        assert_eq!((s, errcode(&b)), (404, "M_NOT_FOUND"));
    }
    let existing = node.upload_ok(b"already here".to_vec()).await?;
    let put_existing = node.url(&format!("/_matrix/media/v3/upload/localhost/{existing}"));
    let (s, b) = json(node.http.put(&put_existing).bearer_auth(ALICE).body("already here").send().await?).await;
    assert_eq!((s, errcode(&b)), (409, "M_CANNOT_OVERWRITE_MEDIA"));
    Ok(())
}

#[tokio::test]
async fn pending_limit_and_expiry() -> R {
    let node = Node::start(NodeOptions {
        media: "max_pending_uploads_per_user = 2\nunused_expires_after = \"1s\"".into(),
        ..Default::default()
    })
    .await?;
    let create = node.url("/_matrix/media/v1/create");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (s, b) = json(node.http.post(&create).bearer_auth(ALICE).send().await?).await;
        assert_eq!(s, 200);
        ids.push(b["content_uri"].as_str().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_owned());
    }
    let resp = node.http.post(&create).bearer_auth(ALICE).send().await?;
    assert!(resp.headers().contains_key("retry-after"));
    let (s, b) = json(resp).await;
    assert_eq!((s, errcode(&b)), (429, "M_LIMIT_EXCEEDED"));
    let (s, _) = json(node.http.post(&create).bearer_auth(BOB).send().await?).await;
    assert_eq!(s, 200, "limits are per user");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let put = node.url(&format!("/_matrix/media/v3/upload/localhost/{}", ids[0]));
    let (s, b) = json(node.http.put(&put).bearer_auth(ALICE).body("too late").send().await?).await;
    assert_eq!((s, errcode(&b)), (404, "M_NOT_FOUND"));
    let (s, _) = json(node.http.post(&create).bearer_auth(ALICE).send().await?).await;
    assert_eq!(s, 200, "expired reservations free the quota");
    Ok(())
}

#[tokio::test]
async fn conditional_and_head_requests() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    let data = test_bytes(3, 5000);
    let id = node.upload_ok(data.clone()).await?;
    let url = node.url(&format!("/_matrix/client/v1/media/download/localhost/{id}"));
    let etag = format!("\"{id}\"");
    let resp = node.http.get(&url).bearer_auth(ALICE).header("if-none-match", &etag).send().await?;
    assert_eq!(resp.status(), 304);
    assert_eq!(resp.headers()["etag"], etag.as_str());
    let resp = node.http.get(&url).bearer_auth(ALICE).header("if-none-match", "\"other\"").send().await?;
    assert_eq!(resp.status(), 200);
    let resp = node.http.head(&url).bearer_auth(ALICE).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "5000");
    assert_eq!(resp.bytes().await?.len(), 0);
    Ok(())
}

#[tokio::test]
async fn range_requests() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    let data = test_bytes(11, 10_000);
    let id = node.upload_ok(data.clone()).await?;
    let url = node.url(&format!("/_matrix/client/v1/media/download/localhost/{id}"));
    let get = |range: &'static str| node.http.get(&url).bearer_auth(ALICE).header("range", range).send();

    type Case = (&'static str, u16, Option<(usize, usize)>);
    let cases: [Case; 8] = [
        ("bytes=0-0", 206, Some((0, 0))),
        ("bytes=100-199", 206, Some((100, 199))),
        ("bytes=9990-", 206, Some((9990, 9999))),
        ("bytes=-10", 206, Some((9990, 9999))),
        ("bytes=-20000", 206, Some((0, 9999))),
        ("bytes=5000-99999", 206, Some((5000, 9999))),
        ("bytes=0-1,5-6", 200, None),
        ("bytes=9-3", 200, None),
    ];
    for (range, status, span) in cases {
        let resp = get(range).await?;
        assert_eq!(resp.status().as_u16(), status, "{range}");
        let content_range = resp.headers().get("content-range").map(|v| v.to_str().unwrap_or("").to_owned());
        let body = resp.bytes().await?;
        match span {
            Some((a, b)) => {
                assert_eq!(content_range.as_deref(), Some(format!("bytes {a}-{b}/10000").as_str()), "{range}");
                assert_eq!(body.as_ref(), &data[a..=b], "{range}");
            }
            None => assert_eq!(body.as_ref(), data.as_slice(), "{range}"),
        }
    }
    for range in ["bytes=10000-", "bytes=20000-30000", "bytes=-0"] {
        let resp = get(range).await?;
        assert_eq!(resp.status(), 416, "{range}");
        assert_eq!(resp.headers()["content-range"], "bytes */10000");
        assert_eq!(resp.headers()["content-type"], "application/json", "an error is not the media");
        assert!(!resp.headers()["cache-control"].to_str()?.contains("immutable"));
    }
    // If-Range: the range only applies to the same representation.
    let etag = format!("\"{id}\"");
    let resp =
        node.http.get(&url).bearer_auth(ALICE).header("range", "bytes=0-9").header("if-range", &etag).send().await?;
    assert_eq!(resp.status(), 206);
    let resp = node
        .http
        .get(&url)
        .bearer_auth(ALICE)
        .header("range", "bytes=0-9")
        .header("if-range", "\"other\"")
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await?.len(), 10_000);
    Ok(())
}

#[tokio::test]
async fn ranges_of_large_files_read_only_the_blocks_they_cover() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    const MIB: usize = 1024 * 1024;
    let data = test_bytes(5, 4 * MIB + 123);
    let id = node.upload_ok(data.clone()).await?;
    let url = node.url(&format!("/_matrix/client/v1/media/download/localhost/{id}"));
    let before = node.metric("mxcas_edge_store_read_bytes_total").await?;
    // Spans the end of block 1 and the start of block 2.
    let (a, b) = (2 * MIB - 10, 2 * MIB + 9);
    let resp = node.http.get(&url).bearer_auth(ALICE).header("range", format!("bytes={a}-{b}")).send().await?;
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await?.as_ref(), &data[a..=b]);
    let read = node.metric("mxcas_edge_store_read_bytes_total").await? - before;
    // Two 1 MiB blocks plus the block index (leaf hashes and the root node), not 4 MiB.
    assert!(read >= (2 * MIB) as f64 && read < (2 * MIB + 64 * 1024) as f64, "read {read} bytes");

    // The whole file, and a range at its very end, come back intact too.
    assert_eq!(node.download(&id).await?.bytes().await?.as_ref(), data.as_slice());
    let resp = node.http.get(&url).bearer_auth(ALICE).header("range", "bytes=-5").send().await?;
    assert_eq!(resp.bytes().await?.as_ref(), &data[data.len() - 5..]);
    Ok(())
}

#[tokio::test]
async fn concurrent_cold_gets_cause_one_store_read() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    let data = test_bytes(9, 100 * 1024);
    let id = node.upload_ok(data.clone()).await?;
    // Resolve the mxc once so every GET below misses only on the block itself.
    node.http
        .head(node.url(&format!("/_matrix/client/v1/media/download/localhost/{id}")))
        .bearer_auth(ALICE)
        .send()
        .await?;
    let reads_before = node.metric("mxcas_edge_store_reads_total").await?;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (http, url) = (node.http.clone(), node.url(&format!("/_matrix/client/v1/media/download/localhost/{id}")));
        tasks.push(tokio::spawn(async move { http.get(url).bearer_auth(ALICE).send().await?.bytes().await }));
    }
    for t in tasks {
        assert_eq!(t.await??.as_ref(), data.as_slice());
    }
    let reads = node.metric("mxcas_edge_store_reads_total").await? - reads_before;
    assert_eq!(reads, 1.0, "100 concurrent GETs of a cold block must read the store once");
    let miss = node.metric("mxcas_edge_cache_requests_total{result=\"miss\"}").await?;
    let coalesced = node.metric("mxcas_edge_cache_requests_total{result=\"coalesced\"}").await?;
    let hit = node.metric("mxcas_edge_cache_requests_total{result=\"hit\"}").await?;
    assert_eq!(miss, 1.0);
    assert_eq!(miss + coalesced + hit, 100.0);
    Ok(())
}

#[tokio::test]
async fn frozen_legacy_endpoints_serve_only_older_media() -> R {
    let node = Node::start(NodeOptions {
        media: "freeze_legacy_download_after = \"2020-01-01T00:00:00Z\"".into(),
        ..Default::default()
    })
    .await?;
    let id = node.upload_ok(b"new media".to_vec()).await?;
    let (s, b) =
        json(node.http.get(node.url(&format!("/_matrix/media/v3/download/localhost/{id}"))).send().await?).await;
    assert_eq!((s, errcode(&b)), (404, "M_NOT_FOUND"));
    assert_eq!(node.download(&id).await?.status(), 200);
    // Frozen by default.
    // (The harness unfreezes unless a test's [media] names the freeze; a comment does.)
    let media = "# freeze_legacy_download_after: the default\n".to_owned();
    let default = Node::start(NodeOptions { media, ..Default::default() }).await?;
    let id = default.upload_ok(b"media under the default freeze".to_vec()).await?;
    let legacy = default.http.get(default.url(&format!("/_matrix/media/v3/download/localhost/{id}"))).send().await?;
    assert_eq!(legacy.status(), 404);
    Ok(())
}

/// The freeze is judged by when the upload arrived, not by the age of the record: a media ID
/// reserved before the freeze and filled after it is new media.
#[tokio::test]
async fn a_reservation_made_before_the_freeze_and_filled_after_it_is_frozen() -> R {
    let mut node = Node::start(NodeOptions::default()).await?;
    let before = node.upload_ok(b"uploaded before the freeze".to_vec()).await?;
    let created: serde_json::Value =
        node.http.post(node.url("/_matrix/media/v1/create")).bearer_auth(ALICE).send().await?.json().await?;
    let reserved =
        created["content_uri"].as_str().unwrap_or_default().trim_start_matches("mxc://localhost/").to_owned();
    // The freeze: a whole second after both, then the reservation is filled past it (by the
    // wall clock the leader stamps uploads with).
    let secs = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs());
    let freeze_at = secs()? + 1;
    while secs()? <= freeze_at {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let put = node
        .http
        .put(node.url(&format!("/_matrix/media/v3/upload/localhost/{reserved}")))
        .bearer_auth(ALICE)
        .body(b"uploaded after the freeze".to_vec())
        .send()
        .await?;
    assert_eq!(put.status(), 200);
    let freeze = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(freeze_at));
    node.restart_with(NodeOptions {
        media: format!("freeze_legacy_download_after = \"{freeze}\""),
        ..Default::default()
    })
    .await?;
    let legacy = |id: &str| node.http.get(node.url(&format!("/_matrix/media/v3/download/localhost/{id}"))).send();
    assert_eq!(legacy(&before).await?.status(), 200, "uploaded before: still served unauthenticated");
    let (s, b) = json(legacy(&reserved).await?).await;
    assert_eq!((s, errcode(&b)), (404, "M_NOT_FOUND"), "reserved before, uploaded after: frozen");
    assert_eq!(node.download(&reserved).await?.status(), 200);
    Ok(())
}

#[tokio::test]
async fn metrics_and_health_endpoints() -> R {
    let node = Node::start(NodeOptions::default()).await?;
    node.upload_ok(b"m".to_vec()).await?;
    assert_eq!(node.http.get(format!("{}/livez", node.admin)).send().await?.status(), 200);
    assert_eq!(node.http.get(format!("{}/readyz", node.admin)).send().await?.status(), 200);
    let text = node.metrics().await?;
    assert!(
        text.contains("mxcas_edge_http_requests_total{route=\"/_matrix/media/v3/upload\",status=\"2xx\"} 1"),
        "{text}"
    );
    assert!(text.contains("mxcas_edge_store_reads_total"));
    Ok(())
}

/// Sends an upload's head and `body` on a raw connection (leaving the body unfinished) and
/// returns what the server answers.
async fn raw_request(node: &Node, extra_headers: &str, body: &[u8]) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(node.api.trim_start_matches("http://")).await?;
    let head = format!(
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n{extra_headers}\r\n"
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body).await?;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer)).await??;
    Ok(String::from_utf8_lossy(&answer[..n]).into_owned())
}
