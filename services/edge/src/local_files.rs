//! Durable writes of new files into the local blob directory, with directory fsyncs shared
//! between concurrent writers.
//!
//! A new object is written straight to its key's path (created exclusively: its key is fresh,
//! so nothing else writes it), fsynced, and then its directory is fsynced so the entry naming
//! it survives a power loss. Every upload of a generation lands in the same directory, so
//! concurrent uploads share that last fsync (group commit): a writer asks for a directory sync
//! after its file is in place, and returns once a sync that *started after its request*
//! has finished. One already running when it asked may have missed its entry, so it never
//! counts; no timing is involved.
//!
//! A write that fails (or a process killed mid-write) can leave a partial file under its fresh
//! key. No metadata names that key (the commit only happens after the write returns), and the
//! orphan sweeper reclaims it once its generation is sealed, as it does any unreferenced object.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// How a directory is made durable: `fsync` on it in production; injectable for tests.
pub type SyncDir = Arc<dyn Fn(&Path) -> std::io::Result<()> + Send + Sync>;

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes new files under `root`.
pub struct LocalFiles {
    root: PathBuf,
    sync_dir: SyncDir,
    syncs: Mutex<HashMap<PathBuf, Arc<DirSync>>>,
    /// Directories made durable (created if needed, then their parents fsynced) by this
    /// writer; held while one is made, so concurrent first writes do it once.
    durable_dirs: tokio::sync::Mutex<HashSet<PathBuf>>,
}

impl LocalFiles {
    pub fn new(root: PathBuf) -> Self {
        Self::with_sync(root, Arc::new(fsync_dir))
    }

    pub fn with_sync(root: PathBuf, sync_dir: SyncDir) -> Self {
        Self { root, sync_dir, syncs: Mutex::default(), durable_dirs: tokio::sync::Mutex::default() }
    }

    /// The directory objects live under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of `key`, if it is one this writer handles: relative segments of letters,
    /// digits and `._-` (what `object_store`'s local backend maps to the same path unescaped),
    /// none of them `.` or `..`.
    pub fn path_of(&self, key: &str) -> Option<PathBuf> {
        let plain = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        key.split('/').all(plain).then(|| self.root.join(key))
    }

    /// Writes `bytes` as the new file `path` (which must not exist) and makes it durable:
    /// the file and the directory entry naming it are on disk when this returns `Ok`.
    pub async fn write_new(&self, path: PathBuf, bytes: Bytes) -> std::io::Result<()> {
        let dir = path.parent().ok_or_else(|| std::io::Error::other("an object path has a directory"))?.to_owned();
        self.ensure_dir(&dir).await?;
        let written = path.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&written)?;
            file.write_all(&bytes)?;
            file.sync_all()
        })
        .await
        .map_err(std::io::Error::other)
        .flatten();
        if let Err(e) = result {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                let _ = tokio::fs::remove_file(&path).await;
            }
            return Err(e);
        }
        self.dir_sync(&dir).sync().await
    }

    fn dir_sync(&self, dir: &Path) -> Arc<DirSync> {
        let mut syncs = self.syncs.lock().unwrap_or_else(|p| p.into_inner());
        syncs
            .entry(dir.to_owned())
            .or_insert_with(|| Arc::new(DirSync::new(dir.to_owned(), self.sync_dir.clone())))
            .clone()
    }

    /// Creates `dir` if needed and makes its entry durable (fsyncing each parent up to the
    /// root), once per directory for the life of this writer. (A directory found already there
    /// is fsynced all the same: the process that made it may have died before doing so.)
    async fn ensure_dir(&self, dir: &Path) -> std::io::Result<()> {
        let mut durable = self.durable_dirs.lock().await;
        if durable.contains(dir) {
            return Ok(());
        }
        let (owned, root, sync) = (dir.to_owned(), self.root.clone(), self.sync_dir.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&owned)?;
            let mut at = owned.as_path();
            while at != root {
                let Some(parent) = at.parent() else { break };
                sync(parent)?;
                at = parent;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(std::io::Error::other)??;
        if durable.len() >= 64 {
            // Old generations' directories: at worst one is made durable again.
            durable.clear();
        }
        durable.insert(dir.to_owned());
        Ok(())
    }
}

/// Group commit of one directory's fsync.
struct DirSync {
    dir: PathBuf,
    sync_dir: SyncDir,
    state: Mutex<SyncState>,
    /// Bumped whenever a sync finishes, to wake waiters.
    finished: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct SyncState {
    /// Requests so far (each request's ticket is its number).
    requested: u64,
    /// Every request up to this ticket is covered by a finished sync.
    synced: u64,
    running: bool,
    /// A sync failed: what the directory holds is unknown, so every later request fails too
    /// (the error is not retried away: after a failed fsync the kernel may have dropped what
    /// it could not write, and a later fsync could succeed without it).
    failed: Option<String>,
}

impl DirSync {
    fn new(dir: PathBuf, sync_dir: SyncDir) -> Self {
        Self { dir, sync_dir, state: Mutex::default(), finished: tokio::sync::watch::channel(0).0 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once a sync of the directory that started after this call has finished.
    ///
    /// The sync itself runs in a task of its own: a caller that gives up (its client went
    /// away and its future was dropped) cannot leave the sync half done and the others waiting.
    async fn sync(self: Arc<Self>) -> std::io::Result<()> {
        let mut finished = self.finished.subscribe();
        let ticket = {
            let mut s = self.lock();
            s.requested += 1;
            s.requested
        };
        loop {
            {
                let mut s = self.lock();
                if let Some(e) = &s.failed {
                    return Err(std::io::Error::other(format!(
                        "fsync of {} failed earlier ({e}); new uploads into it fail until the next generation or a restart: check the disk",
                        self.dir.display()
                    )));
                }
                if s.synced >= ticket {
                    return Ok(());
                }
                if !s.running {
                    s.running = true;
                    // Covers every request made so far, ours included: their files are in place.
                    let target = s.requested;
                    tokio::spawn(self.clone().run(target));
                }
            }
            // A sync is running; wait for it (or any) to finish, then look again. The sender
            // lives in `self`, so this cannot fail while we hold it.
            let _ = finished.changed().await;
        }
    }

    /// One fsync of the directory, covering requests up to `target`.
    async fn run(self: Arc<Self>, target: u64) {
        let (dir, sync) = (self.dir.clone(), self.sync_dir.clone());
        let result = tokio::task::spawn_blocking(move || sync(&dir)).await.map_err(std::io::Error::other).flatten();
        {
            let mut s = self.lock();
            s.running = false;
            match &result {
                Ok(()) => s.synced = s.synced.max(target),
                Err(e) => {
                    tracing::error!(dir = %self.dir.display(), error = %e, "directory fsync failed: new uploads into it fail until the next generation or a restart");
                    s.failed = Some(e.to_string());
                }
            }
        }
        self.finished.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory sync that blocks until released, counting calls.
    struct Gate {
        calls: AtomicUsize,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    fn gated(root: &Path) -> (Arc<LocalFiles>, Arc<Gate>, std::sync::mpsc::Sender<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let gate = Arc::new(Gate { calls: AtomicUsize::new(0), release: Mutex::new(rx) });
        let g = gate.clone();
        let sync: SyncDir = Arc::new(move |dir: &Path| {
            g.calls.fetch_add(1, Ordering::SeqCst);
            g.release.lock().expect("gate").recv().map_err(std::io::Error::other)?;
            fsync_dir(dir)
        });
        (Arc::new(LocalFiles::with_sync(root.to_owned(), sync)), gate, tx)
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..2000 {
            if f() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        panic!("never happened: {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_waits_for_a_directory_sync_that_started_after_its_file_was_in_place() {
        let root = tempfile::tempdir().expect("tempdir");
        let (files, gate, release) = gated(root.path());
        // Making the directory durable fsyncs its two parents (blobs/, the root) through the
        // gate: let those through first.
        let warm = tokio::spawn({
            let (files, dir) = (files.clone(), root.path().join("blobs/g"));
            async move { files.ensure_dir(&dir).await }
        });
        release.send(()).expect("release");
        release.send(()).expect("release");
        warm.await.expect("join").expect("directory");
        assert_eq!(gate.calls.swap(0, Ordering::SeqCst), 2);

        let first = tokio::spawn({
            let files = files.clone();
            let path = files.path_of("blobs/g/a").expect("plain key");
            async move { files.write_new(path, Bytes::from_static(b"first")).await }
        });
        // The first write's sync is running (held at the gate)...
        until("first sync starts", || gate.calls.load(Ordering::SeqCst) == 1).await;
        // ...when a second write puts its file in place and asks.
        let second = tokio::spawn({
            let files = files.clone();
            let path = files.path_of("blobs/g/b").expect("plain key");
            async move { files.write_new(path, Bytes::from_static(b"second")).await }
        });
        until("second file in place", || root.path().join("blobs/g/b").exists()).await;
        // Let the running sync finish: it covers the first write only.
        release.send(()).expect("release");
        first.await.expect("join").expect("first write");
        until("a second sync starts", || gate.calls.load(Ordering::SeqCst) == 2).await;
        assert!(!second.is_finished(), "the second write must not count a sync that started before it asked");
        release.send(()).expect("release");
        second.await.expect("join").expect("second write");
        assert_eq!(std::fs::read(root.path().join("blobs/g/b")).expect("read"), b"second");
        assert_eq!(gate.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_that_gives_up_while_its_sync_runs_does_not_stall_the_others() {
        let root = tempfile::tempdir().expect("tempdir");
        let (files, gate, release) = gated(root.path());
        let warm = tokio::spawn({
            let (files, dir) = (files.clone(), root.path().join("d"));
            async move { files.ensure_dir(&dir).await }
        });
        release.send(()).expect("release");
        warm.await.expect("join").expect("directory");
        assert_eq!(gate.calls.swap(0, Ordering::SeqCst), 1);

        // The first writer starts the sync, then is dropped (its client went away) while the
        // sync is held; a second writer asks meanwhile.
        let first = tokio::spawn({
            let files = files.clone();
            let path = files.path_of("d/a").expect("plain key");
            async move { files.write_new(path, Bytes::from_static(b"a")).await }
        });
        until("first sync starts", || gate.calls.load(Ordering::SeqCst) == 1).await;
        first.abort();
        assert!(first.await.expect_err("aborted").is_cancelled());
        let second = tokio::spawn({
            let files = files.clone();
            let path = files.path_of("d/b").expect("plain key");
            async move { files.write_new(path, Bytes::from_static(b"b")).await }
        });
        until("second file in place", || root.path().join("d/b").exists()).await;
        // The abandoned sync still finishes, and the second writer gets one of its own.
        release.send(()).expect("release");
        until("a second sync starts", || gate.calls.load(Ordering::SeqCst) == 2).await;
        release.send(()).expect("release");
        tokio::time::timeout(std::time::Duration::from_secs(10), second)
            .await
            .expect("the second write must not hang")
            .expect("join")
            .expect("second write");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_directory_syncs() {
        let root = tempfile::tempdir().expect("tempdir");
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let sync: SyncDir = Arc::new(move |dir: &Path| {
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            fsync_dir(dir)
        });
        let files = Arc::new(LocalFiles::with_sync(root.path().to_owned(), sync));
        let writes: Vec<_> = (0..64)
            .map(|i| {
                let files = files.clone();
                tokio::spawn(async move {
                    let path = files.path_of(&format!("blobs/000000000001/{i:032x}")).expect("plain key");
                    files.write_new(path, Bytes::from(vec![i as u8; 1000])).await
                })
            })
            .collect();
        for w in writes {
            w.await.expect("join").expect("write");
        }
        for i in 0..64u8 {
            let bytes = std::fs::read(root.path().join(format!("blobs/000000000001/{i:032x}"))).expect("read");
            assert_eq!(bytes, vec![i; 1000]);
        }
        // Two parents of the new directory, then far fewer than one sync per write.
        let n = calls.load(Ordering::SeqCst);
        assert!(n < 2 + 32, "{n} directory syncs for 64 concurrent writes");
    }

    #[tokio::test]
    async fn an_existing_key_is_refused_and_left_alone_and_odd_keys_are_not_handled() {
        let root = tempfile::tempdir().expect("tempdir");
        let files = LocalFiles::new(root.path().to_owned());
        let path = files.path_of("blobs/x/y").expect("plain key");
        files.write_new(path.clone(), Bytes::from_static(b"one")).await.expect("write");
        let err = files.write_new(path.clone(), Bytes::from_static(b"two")).await.expect_err("exists");
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("read"), b"one");
        for odd in ["../x", "a/../b", "a//b", "/abs", "a/b#1", "a/b c", "a/%2e"] {
            assert!(files.path_of(odd).is_none(), "{odd}");
        }
    }

    #[tokio::test]
    async fn a_failed_directory_sync_fails_that_write_and_every_later_one_in_the_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = fail.clone();
        let sync: SyncDir = Arc::new(move |dir: &Path| {
            if f.load(Ordering::SeqCst) { Err(std::io::Error::other("injected EIO")) } else { fsync_dir(dir) }
        });
        let files = LocalFiles::with_sync(root.path().to_owned(), sync);
        files.write_new(files.path_of("d/a").expect("key"), Bytes::from_static(b"a")).await.expect("write");
        fail.store(true, Ordering::SeqCst);
        let err = files.write_new(files.path_of("d/b").expect("key"), Bytes::from_static(b"b")).await.expect_err("eio");
        assert!(err.to_string().contains("injected EIO"), "{err}");
        fail.store(false, Ordering::SeqCst);
        let err =
            files.write_new(files.path_of("d/c").expect("key"), Bytes::from_static(b"c")).await.expect_err("sticky");
        assert!(err.to_string().contains("failed earlier"), "{err}");
    }
}
