//! `CommitUploads` and the client that groups concurrent commits into it, against a real
//! one-node raft cluster served over gRPC on loopback: every commit keeps its own answer, the
//! same as it would get alone, whatever else shares its call.

use std::time::Duration;

use cid::Cid;
use mxcas_meta::client::{ClientConfig, CommitRequest};
use mxcas_meta::model::blob_key;
use mxcas_meta::raft::{BasicNode, RaftNode, RaftSettings};
use mxcas_meta::server::MetaService;
use mxcas_meta::{CommandError, ContentRecord, MetaClient, MetaError};
use mxcas_proto::meta as pb;
use tokio_util::sync::CancellationToken;

struct Cluster {
    _dir: tempfile::TempDir,
    addr: String,
    cancel: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn one_node() -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let cancel = CancellationToken::new();
    let node = RaftNode::start(1, &dir.path().join("meta"), &RaftSettings::default()).await.expect("raft");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let service = MetaService::new(node.clone()).into_server();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
    });
    node.initialize([(1, BasicNode { addr: addr.clone() })].into_iter().collect()).await.expect("init");
    node.wait_for_leader(Duration::from_secs(10)).await.expect("leader");
    Cluster { _dir: dir, addr, cancel }
}

fn cid(n: u8) -> Cid {
    Cid::new_v1(0x55, multihash::Multihash::<64>::wrap(0x12, &[n; 32]).expect("digest fits"))
}

fn commit(n: u8, key: String) -> CommitRequest {
    CommitRequest {
        server_name: "hs".into(),
        media_id: None,
        user_id: "@a:hs".into(),
        content: ContentRecord {
            cid: cid(n),
            size: 10,
            chunk_size: 1 << 20,
            blob_key: key,
            index_key: None,
            refcount: 0,
            created_at_ms: 0,
            lost: false,
        },
        content_type: "application/octet-stream".into(),
        filename: None,
        lost_key: None,
        quota: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_share_calls_and_keep_their_own_answers() {
    let cluster = one_node().await;
    let client = MetaClient::new(std::slice::from_ref(&cluster.addr), ClientConfig::default()).expect("client");
    // 40 distinct contents; 20 more copies of content 0 under their own keys; 3 keys of no
    // generation; 1 key of generation 0, sealed from the start.
    let mut commits: Vec<(&str, CommitRequest)> = Vec::new();
    for n in 0..40u8 {
        commits.push(("new", commit(n, blob_key::new(1, &format!("k{n}")))));
    }
    for i in 0..20 {
        commits.push(("copy of 0", commit(0, blob_key::new(1, &format!("copy{i}")))));
    }
    for i in 0..3u8 {
        commits.push(("malformed", commit(100 + i, format!("not-a-blob-key-{i}"))));
    }
    commits.push(("sealed", commit(200, blob_key::new(0, "old"))));
    let answers = futures::future::join_all(commits.iter().map(|(_, c)| client.commit_upload(c))).await;

    let mut holders_of_0 = Vec::new();
    for ((kind, c), answer) in commits.iter().zip(&answers) {
        match (*kind, answer) {
            ("new" | "copy of 0", Ok(o)) => {
                assert_eq!(o.media.key.media_id, c.content.cid.to_string(), "{kind}: named by its CID");
                assert_eq!(o.content.cid, c.content.cid, "{kind}: another commit's answer");
                if c.content.cid == cid(0) {
                    if !o.deduplicated {
                        holders_of_0.push(c.content.blob_key.clone());
                    }
                    assert!(o.deduplicated || o.content.blob_key == c.content.blob_key);
                } else {
                    assert!(!o.deduplicated, "distinct content 'deduplicated'");
                    assert_eq!(o.content.blob_key, c.content.blob_key, "{kind}: another commit's objects");
                }
            }
            ("malformed", Err(MetaError::Rejected(CommandError::InvalidArgument(m)))) => {
                assert!(m.contains("malformed blob key"), "{m}");
            }
            ("sealed", Err(MetaError::Rejected(CommandError::Reclaimed { .. }))) => {}
            (kind, other) => panic!("{kind} commit answered {other:?}"),
        }
    }
    // Of the 21 commits of content 0, exactly one holds it; the others may delete theirs.
    assert_eq!(holders_of_0.len(), 1, "{holders_of_0:?}");

    // Committed again together (a retry of a whole call whose answer was lost), every commit
    // gets the same answer as the first time.
    let again = futures::future::join_all(commits.iter().map(|(_, c)| client.commit_upload(c))).await;
    for (((kind, _), first), second) in commits.iter().zip(&answers).zip(&again) {
        match (first, second) {
            (Ok(a), Ok(b)) => {
                assert_eq!(
                    (&a.media, &a.content.blob_key, a.deduplicated),
                    (&b.media, &b.content.blob_key, b.deduplicated),
                    "{kind}"
                )
            }
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{kind}"),
            (a, b) => panic!("{kind}: {a:?} then {b:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_the_limit_is_refused_whole_and_per_commit_errors_stay_per_commit() {
    let cluster = one_node().await;
    let mut raw = pb::meta_client::MetaClient::connect(format!("http://{}", cluster.addr)).await.expect("connect");
    let wire = |c: &CommitRequest| pb::CommitUploadRequest::from(c);
    let too_many: Vec<_> = (0..1025u32).map(|i| wire(&commit(1, blob_key::new(1, &format!("x{i}"))))).collect();
    let refused = raw.commit_uploads(pb::CommitUploadsRequest { commits: too_many }).await.expect_err("over the limit");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // A commit without content next to a good one: the bad one is answered on its own.
    let mut missing = wire(&commit(2, blob_key::new(1, "y")));
    missing.content = None;
    let good = wire(&commit(3, blob_key::new(1, "z")));
    let results = raw
        .commit_uploads(pb::CommitUploadsRequest { commits: vec![missing, good] })
        .await
        .expect("a call with one bad commit")
        .into_inner()
        .results;
    assert_eq!(results.len(), 2);
    match &results[0].result {
        Some(pb::commit_result::Result::Failed(f)) => assert_eq!(f.code, tonic::Code::InvalidArgument as i32, "{f:?}"),
        other => panic!("a commit without content answered {other:?}"),
    }
    match &results[1].result {
        Some(pb::commit_result::Result::Committed(c)) => assert!(!c.deduplicated),
        other => panic!("the good commit answered {other:?}"),
    }
    // The limit is checked before anything is proposed: nothing of the refused call was
    // applied (content 1 was never committed).
    let client = MetaClient::new(std::slice::from_ref(&cluster.addr), ClientConfig::default()).expect("client");
    assert!(client.get_content(&cid(1)).await.expect("read").is_none(), "a refused call left a trace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_call_retried_after_part_of_it_committed_answers_each_commit_as_the_first_time() {
    let cluster = one_node().await;
    let mut raw = pb::meta_client::MetaClient::connect(format!("http://{}", cluster.addr)).await.expect("connect");
    let client = MetaClient::new(std::slice::from_ref(&cluster.addr), ClientConfig::default()).expect("client");
    // A call of 20 whose first answer was lost after its first 10 commits went through (each
    // with its own CommitUpload, as a leader stepping down mid-call leaves it): 5 new, 5 copies
    // of content already held under other keys.
    for n in 0..5u8 {
        client.commit_upload(&commit(50 + n, blob_key::new(1, &format!("held{n}")))).await.expect("held");
    }
    let call: Vec<CommitRequest> = (0..20u8)
        .map(|i| match i {
            0..5 => commit(i, blob_key::new(1, &format!("a{i}"))),
            5..10 => commit(50 + i - 5, blob_key::new(1, &format!("b{i}"))),
            _ => commit(i, blob_key::new(1, &format!("c{i}"))),
        })
        .collect();
    let mut first = Vec::new();
    for c in &call[..10] {
        let r = raw.commit_upload(pb::CommitUploadRequest::from(c)).await.expect("committed alone").into_inner();
        first.push((r.deduplicated, r.content.expect("content").blob_key));
    }
    // The retry of the whole call.
    let retried = futures::future::join_all(call.iter().map(|c| client.commit_upload(c))).await;
    for (i, (c, r)) in call.iter().zip(&retried).enumerate() {
        let r = r.as_ref().unwrap_or_else(|e| panic!("commit {i}: {e}"));
        match first.get(i) {
            // Committed the first time: the same answer again, so an edge that deleted its
            // objects after a "deduplicated" (or kept them after "ours") stays right.
            Some((deduplicated, key)) => {
                assert_eq!((r.deduplicated, &r.content.blob_key), (*deduplicated, key), "commit {i}");
                assert_eq!(r.deduplicated, (5..10).contains(&i), "commit {i}");
            }
            None => {
                assert!(!r.deduplicated, "commit {i}: new content deduplicated");
                assert_eq!(r.content.blob_key, c.content.blob_key, "commit {i}: another commit's objects");
            }
        }
    }
}
