//! The media API as a public server: connections that never finish their headers, and uploads
//! that trickle, do not take the service away from everyone else.

use std::time::{Duration, Instant};

use mxcas_tests::node::{ALICE, BOB};
use mxcas_tests::{Node, NodeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(node: &Node) -> String {
    node.api.trim_start_matches("http://").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_are_closed_and_others_are_served() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions {
        extra: "[http]\nheader_read_timeout = \"2s\"\nmax_connections = 100\n".into(),
        ..Default::default()
    })
    .await?;
    // 300 connections that send half a request and then nothing (three times the limit).
    let mut idle = Vec::new();
    let connecting = async {
        for _ in 0..300 {
            let mut tcp = TcpStream::connect(addr(&node)).await?;
            tcp.write_all(b"GET /_matrix/client/v1/media/config HTTP/1.1\r\nHost: x\r\n").await?;
            idle.push(tcp);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), connecting).await.map_err(|_| {
        anyhow::anyhow!("300 connections could not even connect in 30 s: half-open ones are never closed")
    })??;
    // A real client is still answered: at worst it waits for the first ones to time out.
    let started = Instant::now();
    let request = node.http.get(node.url("/_matrix/client/v1/media/config")).bearer_auth(ALICE).send();
    let resp = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .map_err(|_| anyhow::anyhow!("a real client was not answered within 10 s"))??;
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(10), "answered only after {:?}", started.elapsed());
    // Every half-open connection is closed by the server (read gives EOF or a reset) once
    // its headers are overdue.
    let deadline = Instant::now() + Duration::from_secs(20);
    for mut tcp in idle {
        let mut buf = [0u8; 256];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {}
            Err(_) => panic!("a connection without complete headers was left open for 20 s"),
        }
    }
    Ok(())
}

/// Sends an upload's headers and then one byte per `every`, for as long as the server takes
/// it; returns the status the server answered with.
async fn trickle(node: &Node, token: &str, every: Duration) -> anyhow::Result<u16> {
    let mut tcp = TcpStream::connect(addr(node)).await?;
    let head = format!(
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await?;
    let mut answer = Vec::new();
    loop {
        // The server answers (and may close) while we are still sending.
        if tcp.write_all(b"1\r\nx\r\n").await.is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(every, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => {}
        }
    }
    if !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    status.ok_or_else(|| anyhow::anyhow!("no HTTP answer to a trickled upload: {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_uploads_are_cut_off_and_one_user_cannot_take_every_slot() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions {
        media: "upload_idle_timeout = \"4s\"\nmin_upload_rate = \"1 KiB\"\nmax_concurrent_uploads = 3\n\
                max_concurrent_uploads_per_user = 2\n"
            .into(),
        ..Default::default()
    })
    .await?;
    // Alice starts two uploads that send a byte every 500 ms: never idle for 4 s, far below
    // 1 KiB/s.
    let started = Instant::now();
    let every = Duration::from_millis(500);
    let all = async {
        let ended = std::sync::atomic::AtomicUsize::new(0);
        let traced = |status| {
            ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            status
        };
        tokio::join!(
            async { traced(trickle(&node, ALICE, every).await) },
            async { traced(trickle(&node, ALICE, every).await) },
            async {
                // Once both are under way (the edge says two uploads are in progress), a third of
                // Alice's is refused, and Bob's goes through.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let metrics = node.metrics().await.expect("metrics");
                    if metrics.lines().any(|l| l == "mxcas_edge_uploads_in_progress 2") {
                        break;
                    }
                    let ended = ended.load(std::sync::atomic::Ordering::SeqCst);
                    assert!(ended == 0 && Instant::now() < deadline, "the two trickling uploads never both started");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let third =
                    node.http.post(node.url("/_matrix/media/v3/upload")).bearer_auth(ALICE).body("third").send().await;
                let third = third.expect("third upload");
                let status = third.status().as_u16();
                let json: serde_json::Value = third.json().await.expect("json");
                assert_eq!((status, json["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "{json}");
                assert!(json["retry_after_ms"].is_u64(), "{json}");
                let bob =
                    node.http.post(node.url("/_matrix/media/v3/upload")).bearer_auth(BOB).body("bob's").send().await;
                assert_eq!(bob.expect("bob upload").status(), 200, "another user must still upload");
            }
        )
    };
    let (a, b, ()) = tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .map_err(|_| anyhow::anyhow!("trickling uploads were still held after 30 s"))?;
    // Both trickles were cut off as too slow (408), at the end of their first 4 s window.
    assert_eq!((a?, b?), (408, 408));
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    // And the slots came back: Alice uploads again.
    let again = node.http.post(node.url("/_matrix/media/v3/upload")).bearer_auth(ALICE).body("again").send().await?;
    assert_eq!(again.status(), 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_for_a_free_slot() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions {
        extra: "[http]\nheader_read_timeout = \"3s\"\nmax_connections = 5\n".into(),
        ..Default::default()
    })
    .await?;
    // Five connections hold every slot (half a request each, until their headers are overdue).
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut tcp = TcpStream::connect(addr(&node)).await?;
        tcp.write_all(b"GET /_matrix/client/v1/media/config HTTP/1.1\r\n").await?;
        held.push(tcp);
    }
    let started = Instant::now();
    let request = node.http.get(node.url("/_matrix/client/v1/media/config")).bearer_auth(ALICE).send();
    let resp = tokio::time::timeout(Duration::from_secs(15), request)
        .await
        .map_err(|_| anyhow::anyhow!("the sixth connection was never served"))??;
    assert_eq!(resp.status(), 200);
    // It was served only once a held one had been closed (3 s after they opened): the limit
    // held it back. (A lower bound: a slow machine only makes it later.)
    assert!(started.elapsed() >= Duration::from_millis(1500), "served after {:?}: no limit", started.elapsed());
    drop(held);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_never_read_are_cut_off_and_give_their_slot_back() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions {
        extra: "[http]\nwrite_timeout = \"2s\"\nheader_read_timeout = \"60s\"\nmax_connections = 3\n".into(),
        ..Default::default()
    })
    .await?;
    let id = node.upload_ok(mxcas_tests::test_bytes(77, 24 << 20)).await?;
    // The upload's keep-alive connection holds one slot; two connections (the other slots)
    // ask for the 24 MiB file, pipelined, and never read.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(addr(&node)).await?;
        let get = format!("GET /_matrix/media/v3/download/localhost/{id} HTTP/1.1\r\nHost: x\r\n\r\n");
        tcp.write_all(get.repeat(3).as_bytes()).await?;
        stalled.push(tcp);
    }
    // A new client is served once the stalled writes time out (the idle keep-alive would
    // only be closed after the 60 s header timeout).
    let fresh = reqwest::Client::new();
    let request = fresh.get(node.url("/_matrix/client/v1/media/config")).bearer_auth(ALICE).send();
    let resp = tokio::time::timeout(Duration::from_secs(15), request)
        .await
        .map_err(|_| anyhow::anyhow!("slots held by readers that never read were never freed"))??;
    assert_eq!(resp.status(), 200);
    drop(stalled);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_get_matrix_errors_with_cors() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let long = format!("/_matrix/client/v1/media/config?pad={}", "a".repeat(9000));
    let resp = node.http.get(node.url(&long)).bearer_auth(ALICE).send().await?;
    assert_eq!(resp.status(), 414);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    let json: serde_json::Value = resp.json().await?;
    assert_eq!(json["errcode"], "M_UNKNOWN", "{json}");
    let mut req = node.http.get(node.url("/_matrix/client/v1/media/config")).bearer_auth(ALICE);
    for i in 0..120 {
        req = req.header(format!("x-pad-{i}"), "x");
    }
    let resp = req.send().await?;
    assert_eq!(resp.status(), 431);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    let json: serde_json::Value = resp.json().await?;
    assert_eq!(json["errcode"], "M_UNKNOWN", "{json}");
    let resp = node
        .http
        .get(node.url("/_matrix/client/v1/media/config"))
        .bearer_auth(ALICE)
        .header("x-big", "b".repeat(20_000))
        .send()
        .await?;
    assert_eq!(resp.status(), 431);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_request_rates_answer_429_with_the_wait() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions {
        media: "uploads_per_minute_per_user = 3\ndownloads_per_minute_per_user = 5\n".into(),
        ..Default::default()
    })
    .await?;
    let upload = |token: &'static str, n: u32| {
        node.http.post(node.url("/_matrix/media/v3/upload")).bearer_auth(token).body(format!("rate {token} {n}")).send()
    };
    let mut ids = Vec::new();
    for n in 0..3 {
        let resp = upload(ALICE, n).await?;
        assert_eq!(resp.status(), 200);
        let json: serde_json::Value = resp.json().await?;
        ids.push(json["content_uri"].as_str().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_owned());
    }
    let resp = upload(ALICE, 3).await?;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let json: serde_json::Value = resp.json().await?;
    assert_eq!(json["errcode"], "M_LIMIT_EXCEEDED", "{json}");
    let wait = json["retry_after_ms"].as_u64().unwrap_or(0);
    assert!((1..=20_000).contains(&wait), "one upload token every 20 s: {json}");
    // Bob has his own budget.
    assert_eq!(upload(BOB, 0).await?.status(), 200);
    // Downloads have theirs: 5, then 429.
    let download = || {
        node.http
            .get(node.url(&format!("/_matrix/client/v1/media/download/localhost/{}", ids[0])))
            .bearer_auth(ALICE)
            .send()
    };
    for _ in 0..5 {
        assert_eq!(download().await?.status(), 200);
    }
    let resp = download().await?;
    assert_eq!(resp.status(), 429);
    let json: serde_json::Value = resp.json().await?;
    assert_eq!(json["errcode"], "M_LIMIT_EXCEEDED", "{json}");
    Ok(())
}
