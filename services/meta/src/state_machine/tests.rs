use cid::Cid;
use multihash::Multihash;

use super::*;
use crate::command::Changed;

fn cid(n: u8) -> Cid {
    Cid::new_v1(0x55, Multihash::<64>::wrap(0x12, &[n; 32]).expect("digest fits"))
}

/// An object key of generation 1 (the first generation of a new state).
fn key(name: &str) -> String {
    blob_key::new(1, name)
}

fn content(n: u8, blob: &str) -> ContentRecord {
    ContentRecord {
        cid: cid(n),
        size: 100,
        chunk_size: 1 << 20,
        blob_key: key(blob),
        index_key: None,
        refcount: 0,
        created_at_ms: 0,
        lost: false,
    }
}

fn commit(media_id: Option<&str>, user: &str, now: u64, c: ContentRecord) -> Command {
    Command::CommitUpload {
        server_name: "hs".into(),
        media_id: media_id.map(Into::into),
        user_id: user.into(),
        now_ms: now,
        content: c,
        content_type: "text/plain".into(),
        filename: Some("a.txt".into()),
        lost_key: None,
    }
}

fn repair(c: ContentRecord, lost: &str) -> Command {
    let mut cmd = commit(None, "@a:hs", 0, c);
    if let Command::CommitUpload { lost_key, .. } = &mut cmd {
        *lost_key = Some(key(lost));
    }
    cmd
}

fn pending(id: &str, user: &str, now: u64, ttl: u64, max: u32) -> Command {
    Command::CreatePending {
        media: MediaKey::new("hs", id),
        user_id: user.into(),
        now_ms: now,
        ttl_ms: ttl,
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

    fn sweep(&mut self, now: u64, min_interval: u64) -> Generations {
        match self.apply(Command::BeginSweep { now_ms: now, min_interval_ms: min_interval }) {
            Ok(CommandOutput::Sweep(g)) => g,
            other => panic!("expected generations, got {other:?}"),
        }
    }
}

#[test]
fn sync_upload_is_named_by_its_cid_and_deduplicated() {
    let mut f = Fixture::new();
    let first = f.committed(commit(None, "@a:hs", 10, content(1, "1")));
    assert_eq!(first.media.key, MediaKey::new("hs", cid(1).to_string()));
    assert!(!first.deduplicated);
    assert_eq!(first.content.refcount, 1);
    assert_eq!(first.generation, 1);

    // Same bytes again (another blob key): same mxc, the new blob is released for good.
    let second = f.committed(commit(None, "@b:hs", 20, content(1, "2")));
    assert_eq!(second.media.key, first.media.key);
    assert!(second.deduplicated);
    assert_eq!(second.content.blob_key, key("1"));
    assert_eq!(second.content.refcount, 1, "the same mxc is not a second reference");
    assert!(f.sm.is_tombstoned(&key("2")).expect("read"));
    assert_eq!(f.sm.counts().expect("counts"), (1, 1));
    assert_eq!(f.sm.last_applied().expect("index"), 2);
}

#[test]
fn retried_commit_gets_the_same_answer_however_late_and_whatever_the_clocks() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 0, 1000, 5)).expect("pending");
    let once = f.committed(commit(Some("p1"), "@a:hs", 10, content(1, "1")));
    // Time jumps to the end of the world (a caller cannot do this any more: only the leader
    // stamps time, but even then): expiry must not change what a retry is told.
    f.apply(Command::Expire { now_ms: u64::MAX, limit: 1000 }).expect("expire");
    let again = f.committed(commit(Some("p1"), "@a:hs", 11, content(1, "1")));
    assert_eq!(again.media, once.media);
    assert_eq!(again.content, once.content);
    assert!(!again.deduplicated, "the retry's blob is the referenced one: it must not be deleted");
    let stored = f.sm.get_content(&cid(1)).expect("read").expect("exists");
    assert_eq!(stored.refcount, 1);

    // A sync upload retried after its rows would have expired: same answer, same blob kept.
    let s1 = f.committed(commit(None, "@a:hs", 20, content(2, "2")));
    let s2 = f.committed(commit(None, "@a:hs", 21, content(2, "2")));
    assert_eq!((s1.media.key, s1.deduplicated), (s2.media.key, s2.deduplicated));
    assert!(!s2.deduplicated);
}

#[test]
fn the_clock_only_moves_forward() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 1_000, 500, 5)).expect("pending");
    // A command stamped earlier (a leader with a slow clock) runs at the latest time seen.
    match f.apply(pending("p2", "@a:hs", 10, 500, 5)) {
        Ok(CommandOutput::Pending(m)) => assert_eq!(m.created_at_ms, 1_000),
        other => panic!("{other:?}"),
    }
}

#[test]
fn async_upload_rules() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 0, 1000, 5)).expect("pending");
    assert_eq!(f.apply(commit(Some("p1"), "@b:hs", 10, content(1, "1"))), Err(CommandError::PermissionDenied));
    assert_eq!(f.apply(commit(Some("nope"), "@a:hs", 10, content(1, "1"))), Err(CommandError::NotFound));
    let ok = f.committed(commit(Some("p1"), "@a:hs", 10, content(1, "1")));
    assert_eq!(ok.media.key.media_id, "p1");
    assert_eq!(ok.media.created_at_ms, 0, "keeps the reservation time");
    assert_eq!(f.apply(commit(Some("p1"), "@a:hs", 11, content(2, "2"))), Err(CommandError::AlreadyExists));
    // The same content through a sync upload is a second reference to one blob.
    let sync = f.committed(commit(None, "@a:hs", 12, content(1, "3")));
    assert!(sync.deduplicated);
    assert_eq!(sync.content.refcount, 2);
}

#[test]
fn async_commit_to_a_cid_named_id_needs_a_reservation() {
    let mut f = Fixture::new();
    let id = cid(1).to_string();
    assert_eq!(f.apply(commit(Some(&id), "@a:hs", 10, content(1, "1"))), Err(CommandError::NotFound));
    f.committed(commit(None, "@a:hs", 10, content(1, "1")));
    assert_eq!(
        f.apply(commit(Some(&id), "@a:hs", 10, content(1, "2"))),
        Err(CommandError::AlreadyExists),
        "a PUT to an existing mxc is never a silent success"
    );
}

#[test]
fn expiry_reads_the_index_in_bounded_batches() {
    let mut f = Fixture::new();
    for i in 0..5 {
        f.apply(pending(&format!("p{i}"), "@a:hs", 0, 100 + i, 9)).expect("pending");
    }
    f.apply(pending("late", "@a:hs", 0, 10_000, 9)).expect("pending");
    assert_eq!(f.apply(commit(Some("p0"), "@a:hs", 100, content(1, "1"))), Err(CommandError::NotFound));
    assert_eq!(f.apply(Command::Expire { now_ms: 200, limit: 3 }), Ok(CommandOutput::Expired { removed: 3 }));
    assert_eq!(f.apply(Command::Expire { now_ms: 200, limit: 3 }), Ok(CommandOutput::Expired { removed: 2 }));
    assert_eq!(f.apply(Command::Expire { now_ms: 200, limit: 3 }), Ok(CommandOutput::Expired { removed: 0 }));
    assert!(f.sm.get_media(&MediaKey::new("hs", "p0")).expect("read").is_none());
    assert!(f.sm.get_media(&MediaKey::new("hs", "late")).expect("read").is_some());
    // A filled reservation leaves the index: expiry never removes uploaded media.
    f.committed(commit(Some("late"), "@a:hs", 300, content(2, "2")));
    assert_eq!(f.apply(Command::Expire { now_ms: 20_000, limit: 3 }), Ok(CommandOutput::Expired { removed: 0 }));
    assert!(f.sm.get_media(&MediaKey::new("hs", "late")).expect("read").is_some());
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
    let _ = f.apply(commit(Some("p1"), "@b:hs", 10, content(9, "b")));
    assert_eq!(f.sm.counts().expect("counts"), before);
    assert!(f.sm.get_content(&cid(9)).expect("read").is_none());
    assert_eq!(f.sm.referenced(&[key("b")]).expect("referenced"), vec![false]);
}

#[test]
fn sealed_generations_and_released_keys_are_never_committed() {
    let mut f = Fixture::new();
    assert_eq!(f.sweep(0, 100), Generations { generation: 2, sealed: 0, store_id: 0 });
    assert_eq!(f.sweep(50, 100), Generations { generation: 2, sealed: 0, store_id: 0 }, "at most once per interval");
    // An upload stored under generation 1 commits while generation 1 is not sealed...
    let early = f.committed(commit(None, "@a:hs", 60, content(1, "1")));
    assert_eq!(early.generation, 2);
    // ...and its released duplicate is refused later, even to a retry.
    f.committed(commit(None, "@a:hs", 60, content(1, "dup")));
    assert!(f.sm.is_tombstoned(&key("dup")).expect("read"));
    let dup_as_new = ContentRecord { cid: cid(7), ..content(1, "dup") };
    assert_eq!(f.apply(commit(None, "@a:hs", 70, dup_as_new)), Err(CommandError::Reclaimed { generation: 2 }));

    assert_eq!(f.sweep(200, 100), Generations { generation: 3, sealed: 1, store_id: 0 });
    assert!(!f.sm.is_tombstoned(&key("dup")).expect("read"), "tombstones of sealed generations are dropped");
    // Generation 1 is sealed: an upload stored under it (a commit that was paused across two
    // sweeps) is refused, so the sweeper may delete its object.
    assert_eq!(f.apply(commit(None, "@a:hs", 210, content(2, "slow"))), Err(CommandError::Reclaimed { generation: 3 }));
    // A retry of a commit that did land is still answered (its content is referenced).
    let retry = f.committed(commit(None, "@a:hs", 210, content(1, "1")));
    assert!(!retry.deduplicated);
    // Keys of generations not issued yet are stored again under the current one; malformed
    // keys are refused.
    let future = ContentRecord { blob_key: blob_key::new(9, "x"), ..content(3, "") };
    assert_eq!(f.apply(commit(None, "@a:hs", 220, future)), Err(CommandError::Reclaimed { generation: 3 }));
    let odd = ContentRecord { blob_key: "elsewhere/x".into(), ..content(3, "") };
    assert!(matches!(f.apply(commit(None, "@a:hs", 220, odd)), Err(CommandError::InvalidArgument(_))));
    let current = ContentRecord { blob_key: blob_key::new(3, "x"), ..content(3, "") };
    assert!(!f.committed(commit(None, "@a:hs", 220, current)).deduplicated);
}

#[test]
fn lost_content_is_repaired_by_the_next_upload_of_the_same_bytes() {
    let mut f = Fixture::new();
    let first = f.committed(commit(None, "@a:hs", 10, content(1, "1")));
    // A re-upload that found the stored copy missing names the lost key: a fresh copy of its
    // bytes replaces it. Its released keys never come back (it may have deleted them).
    let dup = f.committed(commit(None, "@b:hs", 20, content(1, "dup")));
    assert!(dup.deduplicated);
    assert_eq!(f.apply(repair(content(1, "dup"), "1")), Err(CommandError::Reclaimed { generation: 1 }));
    let healed = f.committed(repair(content(1, "2"), "1"));
    assert!(!healed.deduplicated);
    assert_eq!(healed.media.key, first.media.key);
    assert_eq!(healed.content.blob_key, key("2"));
    assert_eq!(healed.content.refcount, 1);
    assert_eq!(f.sm.referenced(&[key("1"), key("2")]).expect("referenced"), vec![false, true]);
    assert!(!f.sm.is_tombstoned(&key("2")).expect("read"));
    // The same repair again (a retry) is the same answer; a late, stale repair of the old key
    // by someone else changes nothing and releases their copy.
    assert_eq!(f.committed(repair(content(1, "2"), "1")).content.blob_key, key("2"));
    let stale = f.committed(repair(content(1, "3"), "1"));
    assert!(stale.deduplicated);
    assert_eq!(stale.content.blob_key, key("2"));

    // Reported lost by a download: downloads see it, and a plain re-upload repairs it.
    assert_eq!(
        f.apply(Command::ReportLost { cid: cid(1), blob_key: key("9") }),
        Ok(CommandOutput::Lost { marked: false })
    );
    assert_eq!(
        f.apply(Command::ReportLost { cid: cid(1), blob_key: key("2") }),
        Ok(CommandOutput::Lost { marked: true })
    );
    assert!(f.sm.get_content(&cid(1)).expect("read").expect("exists").lost);
    let again = f.committed(commit(None, "@c:hs", 30, content(1, "4")));
    assert!(!again.deduplicated);
    assert!(!again.content.lost);
    assert_eq!(again.content.blob_key, key("4"));
}

#[test]
fn state_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.redb");
    {
        let sm = StateMachine::open(&path).expect("open");
        sm.apply_batch(&[(1, commit(None, "@a:hs", 1, content(1, "1")))]).expect("apply");
    }
    let sm = StateMachine::open(&path).expect("reopen");
    assert_eq!(sm.last_applied().expect("index"), 1);
    assert!(sm.get_media(&MediaKey::new("hs", cid(1).to_string())).expect("read").is_some());
    assert_eq!(sm.referenced_keys().expect("keys"), vec![key("1")]);
    assert_eq!(sm.referenced(&[key("1"), key("2")]).expect("referenced"), vec![true, false]);
}

#[test]
fn export_then_import_reproduces_the_state() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 0, 1000, 5)).expect("pending");
    f.committed(commit(None, "@a:hs", 10, content(1, "1")));
    f.committed(commit(None, "@a:hs", 10, content(1, "dup")));
    f.committed(commit(Some("p1"), "@a:hs", 10, content(2, "2")));
    f.apply(pending("p2", "@b:hs", 0, 1000, 5)).expect("pending");
    f.apply(Command::IndexBlocks { root: cid(2), blocks: vec![cid(20), cid(21)] }).expect("indexed");
    f.sweep(20, 1);
    let mut snap = Vec::new();
    let Exported { records, extras, digest } = f.sm.export(&mut snap, &["nothing"], true).expect("export");
    assert_eq!(extras, vec![None]);
    assert_eq!(digest, Some(f.sm.digest().expect("digest")), "export gives the state digest");
    assert!(records >= 7, "{records}");

    let other = Fixture::new();
    other.sm.apply_batch(&[(1, commit(None, "@z:hs", 1, content(9, "9")))]).expect("apply");
    other.sm.import(&mut snap.as_slice(), &[("k", b"v".to_vec())]).expect("import");
    assert!(other.sm.get_content(&cid(9)).expect("read").is_none(), "import replaces the old state");
    assert_eq!(other.sm.counts().expect("counts"), f.sm.counts().expect("counts"));
    assert_eq!(other.sm.last_applied().expect("index"), f.sm.last_applied().expect("index"));
    assert_eq!(other.sm.generations().expect("gen"), f.sm.generations().expect("gen"));
    assert!(other.sm.is_tombstoned(&key("dup")).expect("read"));
    assert_eq!(other.sm.extra("k").expect("extra"), Some(b"v".to_vec()));
    assert_eq!(other.sm.referenced(&[key("1"), key("9")]).expect("referenced"), vec![true, false]);
    assert_eq!(other.sm.block_roots(&cid(21)).expect("read"), vec![cid(2)], "the block index came back");
    let mut again = Vec::new();
    other.sm.export(&mut again, &[], false).expect("export");
    assert_eq!(again, snap, "export is deterministic");
    // The expiry index came back with the reservations.
    let mut other = Fixture { next: 100, ..other };
    assert_eq!(other.apply(Command::Expire { now_ms: 5_000, limit: 10 }), Ok(CommandOutput::Expired { removed: 1 }));

    // A truncated snapshot is refused and leaves the state alone.
    let before = other.sm.counts().expect("counts");
    assert!(other.sm.import(&mut &snap[..snap.len() - 3], &[]).is_err());
    assert_eq!(other.sm.counts().expect("counts"), before);
}

#[test]
fn a_snapshot_in_the_canonical_form_of_earlier_versions_still_installs() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 0, 1000, 5)).expect("pending");
    f.committed(commit(None, "@a:hs", 10, content(1, "1")));
    f.committed(commit(None, "@b:hs", 10, content(1, "dup")));
    let mut canonical = Vec::new();
    f.sm.export_canonical(&mut canonical).expect("export");
    let mut compact = Vec::new();
    f.sm.export(&mut compact, &[], false).expect("export");
    assert!(compact.len() < canonical.len(), "{} vs {}", compact.len(), canonical.len());
    // The digest is the hash of the canonical form, whichever form is written.
    let hashed: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&canonical).into();
    assert_eq!(f.sm.digest().expect("digest"), hashed);

    let other = Fixture::new();
    other.sm.import(&mut canonical.as_slice(), &[]).expect("import");
    assert_eq!(other.sm.digest().expect("digest"), f.sm.digest().expect("digest"));
    let mut again = Vec::new();
    other.sm.export(&mut again, &[], false).expect("export");
    assert_eq!(again, compact, "an installed old snapshot is the same state");
}

#[test]
fn changes_are_recorded_for_resuming_watchers_and_gaps_say_resync() {
    let mut f = Fixture::new();
    f.committed(commit(None, "@a:hs", 10, content(1, "1")));
    f.apply(Command::ReportLost { cid: cid(1), blob_key: key("1") }).expect("report");
    f.apply(Command::Expire { now_ms: 20, limit: 10 }).expect("no change");
    f.committed(commit(None, "@b:hs", 30, content(1, "2")));
    let (complete, all) = f.sm.changes_since(0, 100).expect("read");
    assert!(complete);
    let media = MediaKey::new("hs", cid(1).to_string());
    assert_eq!(
        all,
        vec![(1, Changed::Ready(media.clone())), (2, Changed::Content(cid(1))), (4, Changed::Content(cid(1))),],
        "the repair (entry 4) is announced; an entry without changes is not"
    );
    let (complete, after_two) = f.sm.changes_since(2, 100).expect("read");
    assert!(complete);
    assert_eq!(after_two, vec![(4, Changed::Content(cid(1)))]);

    // A node that installed a snapshot has no history before it: older resumes must resync.
    let mut snap = Vec::new();
    f.sm.export(&mut snap, &[], false).expect("export");
    let other = Fixture::new();
    other.sm.import(&mut snap.as_slice(), &[]).expect("import");
    assert_eq!(other.sm.changes_since(2, 100).expect("read"), (false, vec![]));
    assert_eq!(other.sm.changes_since(4, 100).expect("read"), (true, vec![]));
    // And the history is not part of the replicated state.
    assert_eq!(other.sm.digest().expect("digest"), f.sm.digest().expect("digest"));
}

#[test]
fn the_store_identity_is_recorded_once() {
    let mut f = Fixture::new();
    assert_eq!(f.apply(Command::RegisterStore { id: 7 }), Ok(CommandOutput::StoreId(7)));
    assert_eq!(f.apply(Command::RegisterStore { id: 9 }), Ok(CommandOutput::StoreId(7)), "the first one stays");
    assert_eq!(f.sm.generations().expect("read").store_id, 7);
}

#[test]
fn a_database_of_another_format_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.redb");
    {
        let db = redb::Database::create(&path).expect("create");
        let txn = db.begin_write().expect("txn");
        txn.open_table(META).expect("meta").insert("last_applied", 5).expect("insert");
        txn.commit().expect("commit");
    }
    let err = StateMachine::open(&path).err().expect("an old layout is refused");
    assert!(err.to_string().contains("format 1"), "{err}");
}

#[test]
fn a_batch_applies_each_command_as_its_own_entry_would() {
    let mut f = Fixture::new();
    f.apply(pending("p1", "@a:hs", 0, 1000, 5)).expect("pending");
    let batch = Command::Batch(vec![
        commit(None, "@a:hs", 10, content(1, "1")),
        commit(Some("p1"), "@b:hs", 10, content(2, "2")),
        commit(None, "@b:hs", 10, content(1, "1b")),
        Command::Batch(vec![]),
        commit(Some("p1"), "@a:hs", 10, content(2, "2")),
    ]);
    let outcomes = match f.apply(batch) {
        Ok(CommandOutput::Batch(o)) => o,
        other => panic!("{other:?}"),
    };
    assert_eq!(outcomes.len(), 5);
    assert!(matches!(&outcomes[0], Ok(CommandOutput::Committed(o)) if !o.deduplicated));
    assert_eq!(outcomes[1], Err(CommandError::PermissionDenied), "a refusal stays its own");
    assert!(matches!(&outcomes[2], Ok(CommandOutput::Committed(o)) if o.deduplicated), "sees the first");
    assert!(matches!(&outcomes[3], Err(CommandError::InvalidArgument(_))), "no nesting");
    assert!(matches!(&outcomes[4], Ok(CommandOutput::Committed(o)) if o.media.key.media_id == "p1"));
    assert_eq!(f.sm.counts().expect("counts"), (2, 2));
    // All changes of the entry are recorded under its index.
    let (_, changes) = f.sm.changes_since(1, 100).expect("read");
    assert_eq!(changes.iter().filter(|(i, _)| *i == 2).count(), 2, "{changes:?}");
}

fn thumb(source: u8, w: u32, c: ContentRecord, lost: Option<&str>) -> Command {
    Command::CommitThumbnail {
        source: cid(source),
        spec: ThumbnailSpec { width: w, height: w, method: crate::model::ThumbnailMethod::Crop, animated: false },
        now_ms: 50,
        content: c,
        content_type: "image/jpeg".into(),
        width: w,
        height: w,
        animated: false,
        lost_key: lost.map(key),
    }
}

impl Fixture {
    fn thumbnail(&mut self, cmd: Command) -> ThumbnailOutcome {
        match self.apply(cmd) {
            Ok(CommandOutput::Thumbnail(o)) => o,
            other => panic!("expected a thumbnail, got {other:?}"),
        }
    }
}

#[test]
fn a_thumbnail_is_recorded_once_per_source_and_spec_and_shared() {
    let mut f = Fixture::new();
    // Only of stored content.
    assert_eq!(f.apply(thumb(1, 32, content(10, "t1"), None)), Err(CommandError::NotFound));
    f.committed(commit(None, "@a:hs", 10, content(1, "1")));
    let first = f.thumbnail(thumb(1, 32, content(10, "t1"), None));
    assert!(!first.deduplicated);
    assert_eq!((first.thumbnail.cid, first.content.refcount), (cid(10), 1));
    // A retry: the same answer, no new reference.
    let again = f.thumbnail(thumb(1, 32, content(10, "t1"), None));
    assert_eq!(again, first);
    // Another edge made other bytes for the same spec: the recorded one stays, theirs is
    // released (tombstoned: never referenced, so the caller may delete it).
    let other = f.thumbnail(thumb(1, 32, content(11, "t2"), None));
    assert!(other.deduplicated);
    assert_eq!(other.thumbnail, first.thumbnail);
    assert!(f.sm.is_tombstoned(&key("t2")).expect("read"));
    assert!(f.sm.get_content(&cid(11)).expect("read").is_none());
    // Another spec is its own record; the same thumbnail bytes are one content record.
    let big = f.thumbnail(thumb(1, 96, content(10, "t3"), None));
    assert!(big.deduplicated, "same bytes, stored once");
    assert_eq!(big.content.refcount, 2);
    let listed = f.sm.thumbnails(&cid(1)).expect("read");
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|(t, c)| t.source == cid(1) && c.as_ref().is_some_and(|c| c.cid == cid(10))));
    assert!(f.sm.thumbnails(&cid(2)).expect("read").is_empty());
    // Bounds are checked before anything is written.
    let mut huge = thumb(1, 20_000, content(12, "t4"), None);
    if let Command::CommitThumbnail { width, .. } = &mut huge {
        *width = 1;
    }
    assert!(matches!(f.apply(huge), Err(CommandError::InvalidArgument(_))));
}

#[test]
fn a_lost_thumbnail_is_repaired_or_replaced() {
    let mut f = Fixture::new();
    f.committed(commit(None, "@a:hs", 10, content(1, "1")));
    f.thumbnail(thumb(1, 32, content(10, "t1"), None));
    // Its bytes are found lost; the same bytes made again repair the content record.
    f.apply(Command::ReportLost { cid: cid(10), blob_key: key("t1") }).expect("lost");
    let repaired = f.thumbnail(thumb(1, 32, content(10, "t1b"), None));
    assert!(!repaired.deduplicated);
    assert_eq!(repaired.content.blob_key, key("t1b"));
    assert!(!repaired.content.lost);
    // Lost again, and this time the edge makes other bytes (a newer encoder): they replace
    // the record, and the lost content loses the reference.
    f.apply(Command::ReportLost { cid: cid(10), blob_key: key("t1b") }).expect("lost");
    let replaced = f.thumbnail(thumb(1, 32, content(11, "t2"), None));
    assert!(!replaced.deduplicated);
    assert_eq!(replaced.thumbnail.cid, cid(11));
    assert_eq!(f.sm.get_content(&cid(10)).expect("read").expect("kept").refcount, 0);
    // A caller that found the recorded copy missing (not yet reported) replaces it as well.
    let found_missing = f.thumbnail(thumb(1, 32, content(12, "t3"), Some("t2")));
    assert_eq!(found_missing.thumbnail.cid, cid(12));
    // Thumbnails travel in snapshots.
    let mut snap = Vec::new();
    f.sm.export(&mut snap, &[], true).expect("export");
    let other = Fixture::new();
    other.sm.import(&mut snap.as_slice(), &[]).expect("import");
    assert_eq!(other.sm.thumbnails(&cid(1)).expect("read"), f.sm.thumbnails(&cid(1)).expect("read"));
    assert_eq!(other.sm.digest().expect("digest"), f.sm.digest().expect("digest"));
}

#[test]
fn usage_of_past_windows_is_pruned_by_later_quota_commands() {
    use crate::model::Quota;
    let mut f = Fixture::new();
    let q = Quota { period_ms: 1000, user_bytes: 0, user_files: 100, tenant_bytes: 0, tenant_files: 0 };
    // Twenty users upload in window 0: twenty rows and the tenant's.
    for i in 0..20u8 {
        let user = format!("@u{i}:hs");
        f.committed(limited(&q, &user, commit(None, &user, 10 + u64::from(i), content(i, &i.to_string()))));
    }
    assert_eq!(f.sm.usage_rows().expect("rows"), 21);
    // In window 5 one user keeps uploading: each of its commands removes past rows, a batch
    // at a time, until only the current window's are left.
    let user = "@u0:hs";
    let mut rows = Vec::new();
    for i in 0..4u8 {
        f.committed(limited(&q, user, commit(None, user, 5000 + u64::from(i), content(100 + i, &format!("n{i}")))));
        rows.push(f.sm.usage_rows().expect("rows"));
    }
    assert_eq!(rows, [15, 7, 2, 2], "past rows drain {USAGE_PRUNE_BATCH} per command; the current two stay");
    let (u, t) = f.sm.usage(user, "hs", 1000, 5003).expect("usage");
    assert_eq!((u.files, t.files), (4, 4), "the current window counts on");
    assert_eq!(f.sm.usage("@u1:hs", "hs", 1000, 5003).expect("usage").0.files, 0);
    // A quota of another period (edges mid-rollout) keeps rows of its own: a day's usage is
    // not pruned by hourly windows ending.
    let day = Quota { period_ms: 86_400_000, ..q.clone() };
    f.committed(limited(&day, "@d:hs", commit(None, "@d:hs", 5100, content(120, "d1"))));
    for i in 0..3u8 {
        let at = 10_000 * (u64::from(i) + 1);
        f.committed(limited(&q, user, commit(None, user, at, content(130 + i, &format!("h{i}")))));
    }
    assert_eq!(f.sm.usage("@d:hs", "hs", 86_400_000, 40_000).expect("usage").0.files, 1);
    assert_eq!(f.sm.usage("@d:hs", "hs", 1000, 40_000).expect("usage").0.files, 0);
}

fn limited(quota: &crate::model::Quota, user: &str, cmd: Command) -> Command {
    Command::Limited { quota: quota.clone(), user: user.into(), tenant: "hs".into(), command: Box::new(cmd) }
}

#[test]
fn quotas_count_new_media_per_window_and_refuse_what_does_not_fit() {
    use crate::model::{Quota, QuotaScope};
    let mut f = Fixture::new();
    let q = Quota { period_ms: 1000, user_bytes: 250, user_files: 0, tenant_bytes: 0, tenant_files: 3 };
    // 100 + 100 fit alice's 250 bytes; a third 100 does not.
    f.committed(limited(&q, "@a:hs", commit(None, "@a:hs", 10, content(1, "1"))));
    f.committed(limited(&q, "@a:hs", commit(None, "@a:hs", 20, content(2, "2"))));
    let over = f.apply(limited(&q, "@a:hs", commit(None, "@a:hs", 30, content(3, "3"))));
    assert_eq!(over, Err(CommandError::QuotaExceeded { scope: QuotaScope::User }));
    assert!(f.sm.get_content(&cid(3)).expect("read").is_none(), "a refused commit leaves no trace");
    // A retry, or the same bytes again, makes no new record: never refused, never counted.
    f.committed(limited(&q, "@a:hs", commit(None, "@a:hs", 40, content(1, "1"))));
    f.committed(limited(&q, "@a:hs", commit(None, "@a:hs", 40, content(2, "2b"))));
    let (u, t) = f.sm.usage("@a:hs", "hs", 1000, 40).expect("usage");
    assert_eq!((u.bytes, u.files, t.files), (200, 2, 2));
    // Once a quota is used up, a reservation is refused too.
    let full = Quota { user_files: 2, ..q.clone() };
    assert_eq!(
        f.apply(limited(&full, "@a:hs", pending("p1", "@a:hs", 50, 1000, 5))),
        Err(CommandError::QuotaExceeded { scope: QuotaScope::User })
    );
    // The tenant's quota counts everyone: bob's first file is the tenant's third, his second
    // is over it.
    f.committed(limited(&q, "@b:hs", commit(None, "@b:hs", 60, content(4, "4"))));
    assert_eq!(
        f.apply(limited(&q, "@b:hs", commit(None, "@b:hs", 70, content(5, "5")))),
        Err(CommandError::QuotaExceeded { scope: QuotaScope::Tenant })
    );
    // Usage travels in snapshots.
    let mut snap = Vec::new();
    f.sm.export(&mut snap, &[], true).expect("export");
    let other = Fixture::new();
    other.sm.import(&mut snap.as_slice(), &[]).expect("import");
    assert_eq!(
        other.sm.usage("@a:hs", "hs", 1000, 70).expect("usage"),
        f.sm.usage("@a:hs", "hs", 1000, 70).expect("usage")
    );
    // The next window (by the leader's clock) starts afresh.
    f.committed(limited(&q, "@a:hs", commit(None, "@a:hs", 1500, content(3, "3"))));
    let (u, t) = f.sm.usage("@a:hs", "hs", 1000, 1500).expect("usage");
    assert_eq!((u.bytes, u.files, t.files), (100, 1, 1));
    // A quota is its command's user's and server name's.
    assert!(matches!(
        f.apply(limited(&q, "@b:hs", commit(None, "@a:hs", 1600, content(6, "6")))),
        Err(CommandError::InvalidArgument(_))
    ));
    // Only uploads and reservations take a quota.
    assert!(matches!(
        f.apply(limited(&q, "@a:hs", Command::RegisterStore { id: 5 })),
        Err(CommandError::InvalidArgument(_))
    ));
}

#[test]
fn blocks_are_found_by_their_own_cid_in_every_dag_that_holds_them() {
    let mut f = Fixture::new();
    f.committed(commit(None, "@a:hs", 10, content(1, "1")));
    f.committed(commit(None, "@a:hs", 10, content(2, "2")));
    let index = |root: u8, blocks: &[u8]| Command::IndexBlocks {
        root: cid(root),
        blocks: blocks.iter().map(|&b| cid(b)).collect(),
    };
    assert_eq!(f.apply(index(1, &[10, 11, 12])), Ok(CommandOutput::Indexed { added: 3 }));
    // Idempotent: a retry adds nothing; a block shared by two files is found in both.
    assert_eq!(f.apply(index(1, &[10, 11, 12])), Ok(CommandOutput::Indexed { added: 0 }));
    assert_eq!(f.apply(index(2, &[12, 13, 2])), Ok(CommandOutput::Indexed { added: 2 }), "a root is not its own block");
    assert_eq!(f.sm.block_roots(&cid(12)).expect("read"), vec![cid(1), cid(2)]);
    assert_eq!(f.sm.block_roots(&cid(10)).expect("read"), vec![cid(1)]);
    assert_eq!(f.sm.block_roots(&cid(99)).expect("read"), vec![]);
    assert_eq!(f.sm.block_roots(&cid(2)).expect("read"), vec![]);
    // Only stored content has blocks, and one command carries a bounded number of them.
    assert_eq!(f.apply(index(7, &[70])), Err(CommandError::NotFound));
    assert!(f.sm.block_roots(&cid(70)).expect("read").is_empty());
    let too_many =
        Command::IndexBlocks { root: cid(1), blocks: vec![cid(5); crate::command::MAX_BLOCKS_PER_INDEX + 1] };
    assert!(matches!(f.apply(too_many), Err(CommandError::InvalidArgument(_))));
    // At most MAX_BLOCK_ROOTS roots are answered for one block.
    for n in 30..30 + MAX_BLOCK_ROOTS as u8 + 2 {
        f.committed(commit(None, "@a:hs", 10, content(n, &n.to_string())));
        f.apply(index(n, &[50])).expect("indexed");
    }
    assert_eq!(f.sm.block_roots(&cid(50)).expect("read").len(), MAX_BLOCK_ROOTS);
}
