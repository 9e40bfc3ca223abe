use cid::Cid;
use multihash::Multihash;

use super::*;

fn cid(n: u8) -> Cid {
    Cid::new_v1(0x55, Multihash::<64>::wrap(0x12, &[n; 32]).expect("digest fits"))
}

fn content(n: u8, blob: &str) -> ContentRecord {
    ContentRecord {
        cid: cid(n),
        size: 100,
        chunk_size: 1 << 20,
        blob_key: blob.into(),
        index_key: None,
        refcount: 0,
        created_at_ms: 0,
    }
}

fn commit(upload: &str, media_id: Option<&str>, user: &str, now: u64, c: ContentRecord) -> Command {
    Command::CommitUpload {
        upload_id: upload.into(),
        server_name: "hs".into(),
        media_id: media_id.map(Into::into),
        user_id: user.into(),
        now_ms: now,
        content: c,
        content_type: "text/plain".into(),
        filename: Some("a.txt".into()),
    }
}

fn pending(id: &str, user: &str, now: u64, expires: u64, max: u32) -> Command {
    Command::CreatePending {
        media: MediaKey::new("hs", id),
        user_id: user.into(),
        now_ms: now,
        expires_at_ms: expires,
        max_pending_per_user: max,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    sm: StateMachine,
    next: u64,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm = StateMachine::open(&dir.path().join("m.redb")).expect("open");
        Self { _dir: dir, sm, next: 1 }
    }

    fn apply(&mut self, cmd: Command) -> Result<CommandOutput, CommandError> {
        let index = self.next;
        self.next += 1;
        self.sm.apply_batch(&[(index, cmd)]).expect("storage").remove(0)
    }

    fn committed(&mut self, cmd: Command) -> CommitOutcome {
        match self.apply(cmd) {
            Ok(CommandOutput::Committed(o)) => o,
            other => panic!("expected a commit, got {other:?}"),
        }
    }
}

#[test]
fn sync_upload_is_named_by_its_cid_and_deduplicated() {
    let mut f = Fixture::new();
    let first = f.committed(commit("u1", None, "@a:hs", 10, content(1, "blobs/1")));
    assert_eq!(first.media.key, MediaKey::new("hs", cid(1).to_string()));
    assert!(!first.deduplicated);
    assert_eq!(first.content.refcount, 1);

    // Same bytes again (another blob key): same mxc, the new blob is not referenced.
    let second = f.committed(commit("u2", None, "@b:hs", 20, content(1, "blobs/2")));
    assert_eq!(second.media.key, first.media.key);
    assert!(second.deduplicated);
    assert_eq!(second.content.blob_key, "blobs/1");
    assert_eq!(second.content.refcount, 1, "the same mxc is not a second reference");
    assert_eq!(f.sm.counts().expect("counts"), (1, 1));
    assert_eq!(f.sm.last_applied().expect("index"), 2);
}

#[test]
fn retried_commit_returns_the_first_answer_without_double_counting() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 0, 1000, 5)).expect("pending");
    let once = f.committed(commit("same", Some("p1"), "@a:hs", 10, content(1, "blobs/1")));
    let again = f.committed(commit("same", Some("p1"), "@a:hs", 11, content(1, "blobs/1")));
    assert_eq!(once, again);
    let stored = f.sm.get_content(&cid(1)).expect("read").expect("exists");
    assert_eq!(stored.refcount, 1);
}

#[test]
fn async_upload_rules() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 0, 1000, 5)).expect("pending");
    assert_eq!(
        f.apply(commit("x1", Some("p1"), "@b:hs", 10, content(1, "blobs/1"))),
        Err(CommandError::PermissionDenied)
    );
    assert_eq!(f.apply(commit("x2", Some("nope"), "@a:hs", 10, content(1, "blobs/1"))), Err(CommandError::NotFound));
    let ok = f.committed(commit("x3", Some("p1"), "@a:hs", 10, content(1, "blobs/1")));
    assert_eq!(ok.media.key.media_id, "p1");
    assert_eq!(ok.media.created_at_ms, 0, "keeps the reservation time");
    assert_eq!(f.apply(commit("x4", Some("p1"), "@a:hs", 11, content(2, "blobs/2"))), Err(CommandError::AlreadyExists));
    // The same content through a sync upload is a second reference to one blob.
    let sync = f.committed(commit("x5", None, "@a:hs", 12, content(1, "blobs/3")));
    assert!(sync.deduplicated);
    assert_eq!(sync.content.refcount, 2);
}

#[test]
fn async_commit_to_a_cid_named_id_needs_a_reservation() {
    let mut f = Fixture::new();
    let id = cid(1).to_string();
    assert_eq!(f.apply(commit("a1", Some(&id), "@a:hs", 10, content(1, "blobs/1"))), Err(CommandError::NotFound));
    f.committed(commit("s1", None, "@a:hs", 10, content(1, "blobs/1")));
    assert_eq!(
        f.apply(commit("a2", Some(&id), "@a:hs", 10, content(1, "blobs/2"))),
        Err(CommandError::AlreadyExists),
        "a PUT to an existing mxc is never a silent success"
    );
}

#[test]
fn expired_reservations_are_not_found_and_get_removed() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 0, 100, 5)).expect("pending");
    assert_eq!(f.apply(commit("x", Some("p1"), "@a:hs", 100, content(1, "b"))), Err(CommandError::NotFound));
    assert_eq!(f.apply(Command::ExpirePending { now_ms: 100 }), Ok(CommandOutput::Expired { removed: 1 }));
    assert!(f.sm.get_media(&MediaKey::new("hs", "p1")).expect("read").is_none());

    // Idempotency records live a day: a retry within it gets the first answer, after it the
    // record is gone (and the same upload ID is a new commit).
    let first = f.committed(commit("u-day", None, "@a:hs", 1_000, content(5, "blobs/5")));
    f.apply(Command::ExpirePending { now_ms: 1_000 + 23 * 3_600_000 }).expect("expire");
    assert_eq!(f.committed(commit("u-day", None, "@a:hs", 2_000, content(6, "blobs/6"))), first);
    f.apply(Command::ExpirePending { now_ms: 1_001 + 24 * 3_600_000 }).expect("expire");
    let later = f.committed(commit("u-day", None, "@a:hs", 3_000, content(6, "blobs/6")));
    assert_ne!(later, first);
}

#[test]
fn pending_limit_counts_only_live_reservations() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 0, 100, 2)).expect("1");
    f.apply(pending("p2", "@a:hs", 0, 1000, 2)).expect("2");
    assert_eq!(f.apply(pending("p3", "@a:hs", 50, 1000, 2)), Err(CommandError::PendingLimit { limit: 2 }));
    f.apply(pending("p4", "@b:hs", 50, 1000, 2)).expect("other users are separate");
    f.apply(pending("p3", "@a:hs", 150, 1000, 2)).expect("p1 expired, so there is room");
    assert_eq!(f.apply(pending("p2", "@a:hs", 150, 1000, 9)), Err(CommandError::AlreadyExists));
}

#[test]
fn rejected_commands_leave_no_trace() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 0, 1000, 5)).expect("pending");
    let before = f.sm.counts().expect("counts");
    let _ = f.apply(commit("x", Some("p1"), "@b:hs", 10, content(9, "b")));
    assert_eq!(f.sm.counts().expect("counts"), before);
    assert!(f.sm.get_content(&cid(9)).expect("read").is_none());
}

#[test]
fn state_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.redb");
    {
        let sm = StateMachine::open(&path).expect("open");
        sm.apply_batch(&[(1, commit("u", None, "@a:hs", 1, content(1, "blobs/1")))]).expect("apply");
    }
    let sm = StateMachine::open(&path).expect("reopen");
    assert_eq!(sm.last_applied().expect("index"), 1);
    assert!(sm.get_media(&MediaKey::new("hs", cid(1).to_string())).expect("read").is_some());
    assert_eq!(sm.referenced_keys().expect("keys"), vec!["blobs/1".to_string()]);
    assert_eq!(sm.referenced(&["blobs/1".into(), "blobs/2".into()]).expect("referenced"), vec![true, false]);
}

#[test]
fn export_then_import_reproduces_the_state() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 0, 1000, 5)).expect("pending");
    f.committed(commit("u1", None, "@a:hs", 10, content(1, "blobs/1")));
    f.committed(commit("u2", Some("p1"), "@a:hs", 10, content(2, "blobs/2")));
    f.apply(pending("p2", "@b:hs", 0, 1000, 5)).expect("pending");
    let mut snap = Vec::new();
    let (records, extras) = f.sm.export(&mut snap, &["nothing"]).expect("export");
    assert_eq!(extras, vec![None]);
    assert!(records >= 6, "{records}");

    let other = Fixture::new();
    other.sm.apply_batch(&[(1, commit("zz", None, "@z:hs", 1, content(9, "blobs/9")))]).expect("apply");
    other.sm.import(&mut snap.as_slice(), &[("k", b"v".to_vec())]).expect("import");
    assert!(other.sm.get_content(&cid(9)).expect("read").is_none(), "import replaces the old state");
    assert_eq!(other.sm.counts().expect("counts"), f.sm.counts().expect("counts"));
    assert_eq!(other.sm.last_applied().expect("index"), f.sm.last_applied().expect("index"));
    assert_eq!(other.sm.extra("k").expect("extra"), Some(b"v".to_vec()));
    assert_eq!(other.sm.referenced(&["blobs/1".into(), "blobs/9".into()]).expect("referenced"), vec![true, false]);
    let mut again = Vec::new();
    other.sm.export(&mut again, &[]).expect("export");
    assert_eq!(again, snap, "export is deterministic");

    // A truncated snapshot is refused and leaves the state alone.
    let before = other.sm.counts().expect("counts");
    assert!(other.sm.import(&mut &snap[..snap.len() - 3], &[]).is_err());
    assert_eq!(other.sm.counts().expect("counts"), before);
}
