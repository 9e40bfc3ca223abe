//! Pause points: named places in the upload and sweep paths where a test can stop one task,
//! act while it is stopped, and let it go on. This is how interleavings that could lose data
//! are forced in tests instead of hoped for with sleeps. Nothing is armed in production: a
//! pass through an unarmed point is one uncontended lock.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// Between an upload's bytes being durable in the store and its commit being sent.
pub const BEFORE_COMMIT: &str = "before_commit";

/// Between a download reading a media record from the metadata service and caching it.
pub const RECORD_READ: &str = "record_read";

#[derive(Default)]
pub struct PausePoints {
    armed: Mutex<HashMap<&'static str, Gate>>,
}

/// The task's side of an armed point: tell the test it arrived, wait to be let go.
type Gate = (oneshot::Sender<()>, oneshot::Receiver<()>);

/// An armed point, held by the test.
pub struct Paused {
    reached: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

impl Paused {
    /// Waits until a task reaches the point (and stops there).
    pub async fn reached(&mut self) {
        let _ = (&mut self.reached).await;
    }

    /// Lets the stopped task go on.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

impl PausePoints {
    /// The next task to pass `name` stops there until the returned handle is released (or
    /// dropped).
    pub fn arm(&self, name: &'static str) -> Paused {
        let (reached_tx, reached) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        self.armed.lock().unwrap_or_else(|p| p.into_inner()).insert(name, (reached_tx, release_rx));
        Paused { reached, release }
    }

    /// Passes `name`: stops here if a test armed it.
    pub async fn pass(&self, name: &'static str) {
        let armed = self.armed.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        if let Some((reached, release)) = armed {
            let _ = reached.send(());
            let _ = release.await;
        }
    }
}
