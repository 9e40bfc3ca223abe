//! One fetch per media on this edge, however many downloads want it, and the bytes of a fetch
//! streamed to the download that started it while they are being stored.
//!
//! A fetch ([`Flights::join`]) runs as a task of its own, holding one of the edge's
//! [`crate::remote::MAX_FETCHES`] slots: downloads that ask for the same media meanwhile wait
//! for its answer, and a download that goes away cancels nothing (the others still get the
//! answer, and no second fetch starts).
//!
//! A fetch whose bytes are verified as they arrive (block by block, [`crate::block_fetch`])
//! may hand them to the download that started it as they go to the store ([`tee`]): that
//! download answers at once with the size the root gave, and its body is those verified bytes
//! in order, never any other. A fetch that fails after that cuts the body (the client sees a
//! short response, never a complete wrong one). The store and the client share the pace: the
//! fetch waits for a client [`LIVE_CHUNKS`] chunks behind, but only briefly: a client that
//! goes away, or does not take a chunk within a grace, is cut, and the fetch finishes for
//! the store alone.
//! Downloads that join a fetch already under way wait for the stored media.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::{mpsc, oneshot};

use crate::api::error::ApiError;
use crate::media::Resolved;

/// Chunks (blocks, 2 MiB at most each) a live download may lag behind its fetch.
pub const LIVE_CHUNKS: usize = 4;

type Answer = Shared<BoxFuture<'static, Result<Arc<Resolved>, ApiError>>>;

/// Fetches in flight on this edge, by what they fetch.
pub struct Flights {
    running: std::sync::Mutex<HashMap<String, (u64, Answer)>>,
    next_id: AtomicU64,
    /// This edge's name in fetch claims ([`crate::remote::once_in_cluster`]).
    pub claimant: String,
}

/// This edge process's name in the metadata leader's claims (thumbnails and fetches): one per
/// process, so a restarted edge is a new claimant.
pub fn edge_claimant() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| format!("edge-{}-{:016x}", std::process::id(), rand::random::<u64>()))
}

impl Default for Flights {
    fn default() -> Self {
        Self { running: Default::default(), next_id: AtomicU64::new(0), claimant: edge_claimant().to_owned() }
    }
}

/// A download's part in a fetch.
pub struct Joined {
    /// The fetch's answer, once it ends.
    pub answer: Answer,
    /// Set for the download that started the fetch: its bytes while they are fetched, if
    /// the fetch streams them (the sender is dropped unsent otherwise).
    pub live: Option<oneshot::Receiver<Live>>,
}

/// Verified bytes of a media on their way to the store, for the download that started the
/// fetch.
pub struct Live {
    /// The whole file's size.
    pub size: u64,
    /// What the media will be served as (from its first bytes).
    pub content_type: String,
    chunks: mpsc::Receiver<Bytes>,
}

impl Flights {
    /// Joins the fetch of `key` under way, or starts `fetch` (given the sender of its live
    /// bytes) as a task holding one of `slots`.
    pub fn join<F, Fut>(self: &Arc<Self>, key: String, slots: &Arc<tokio::sync::Semaphore>, fetch: F) -> Joined
    where
        F: FnOnce(oneshot::Sender<Live>) -> Fut,
        Fut: std::future::Future<Output = Result<Resolved, ApiError>> + Send + 'static,
    {
        let mut running = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, answer)) = running.get(&key) {
            return Joined { answer: answer.clone(), live: None };
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (live_tx, live_rx) = oneshot::channel();
        let work = fetch(live_tx);
        let (flights, slots, done_key) = (self.clone(), slots.clone(), key.clone());
        // The entry is in the table before the task can end and take it out (the lock is held).
        let task = tokio::spawn(async move {
            // Out of the table however the fetch ends, a panic included.
            let _done = Done { flights, key: done_key, id };
            match slots.acquire_owned().await {
                Ok(_slot) => work.await.map(Arc::new),
                Err(_) => Err(ApiError::unavailable("Shutting down", 1000)),
            }
        });
        let answer: Answer =
            async move { task.await.unwrap_or_else(|e| Err(ApiError::internal(format!("remote fetch failed: {e}")))) }
                .boxed()
                .shared();
        running.insert(key, (id, answer.clone()));
        Joined { answer, live: Some(live_rx) }
    }

    fn finish(&self, key: &str, id: u64) {
        let mut running = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if running.get(key).is_some_and(|(running_id, _)| *running_id == id) {
            running.remove(key);
        }
    }
}

/// Takes a fetch out of the table when its task ends.
struct Done {
    flights: Arc<Flights>,
    key: String,
    id: u64,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.flights.finish(&self.key, self.id);
    }
}

impl Joined {
    /// The fetch's bytes as they arrive if this download started it and it streams them
    /// (`want_live`), else its stored media once it ends.
    pub async fn wait(self, want_live: bool) -> Result<Arrival, ApiError> {
        if let (true, Some(live)) = (want_live, self.live) {
            // The sender is dropped unsent when the fetch does not stream (or ends first).
            if let Ok(live) = live.await {
                return Ok(Arrival::Live(live));
            }
        }
        self.answer.await.map(|r| Arrival::Held((*r).clone())).map_err(|e| e.clone())
    }
}

/// What a download of media that was not held gets.
// Built once per download and moved, as `Resolved` itself is everywhere: no box.
#[allow(clippy::large_enum_variant)]
pub enum Arrival {
    /// Stored and recorded.
    Held(Resolved),
    /// On its way, verified.
    Live(Live),
}

impl Arrival {
    /// The stored media (a caller that did not ask for live bytes never gets them).
    pub fn held(self) -> Result<Resolved, ApiError> {
        match self {
            Arrival::Held(r) => Ok(r),
            Arrival::Live(_) => Err(ApiError::internal("live bytes where stored media was asked for")),
        }
    }
}

/// `body`, the verified bytes of a fetch (`size` in all), on its way to the store, also sent
/// to the download waiting on `live`: the first [`crate::sniff::HEAD`] bytes decide the type
/// (`type_of`), which is answered with the stream so that the store records the same. Without
/// a first chunk (an empty file, an error) nothing is sent live.
///
/// The client never holds the store up for long: a chunk it does not take within `grace`
/// (with [`LIVE_CHUNKS`] already waiting for it) cuts its body, and the fetch goes on for the
/// store alone; the client can download the stored media again.
pub async fn tee<S>(
    mut body: S,
    size: u64,
    live: oneshot::Sender<Live>,
    grace: std::time::Duration,
    type_of: impl FnOnce(&[u8]) -> String,
) -> (BoxStream<'static, Result<Bytes, String>>, Option<String>)
where
    S: futures::Stream<Item = Result<Bytes, String>> + Send + Unpin + 'static,
{
    let first = match body.next().await {
        Some(Ok(first)) if !first.is_empty() => first,
        other => return (stream::iter(other).chain(body).boxed(), None),
    };
    let content_type = type_of(&first[..first.len().min(crate::sniff::HEAD)]);
    let (tx, chunks) = mpsc::channel(LIVE_CHUNKS);
    let to_client = live.send(Live { size, content_type: content_type.clone(), chunks }).is_ok().then_some(tx);
    let body = stream::once(futures::future::ready(Ok(first))).chain(body);
    let body = stream::unfold((body, to_client), move |(mut body, mut to_client)| async move {
        let item = body.next().await?;
        let delivered = match (&item, &to_client) {
            (Ok(bytes), Some(tx)) => matches!(tokio::time::timeout(grace, tx.send(bytes.clone())).await, Ok(Ok(()))),
            // An error ends the client's bytes short of the size: its body is cut.
            (Err(_), _) => false,
            (Ok(_), None) => false,
        };
        if !delivered {
            to_client = None;
        }
        Some((item, (body, to_client)))
    })
    .boxed();
    (body, Some(content_type))
}

impl Live {
    /// The response body: the bytes as they come, ending in an error if they stop short of
    /// the size (so the connection is cut, not the file taken for whole).
    pub fn body(self) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let size = self.size;
        stream::unfold((self.chunks, 0u64, false), move |(mut chunks, got, over)| async move {
            if over {
                return None;
            }
            match chunks.recv().await {
                Some(bytes) => {
                    let got = got + bytes.len() as u64;
                    Some((Ok(bytes), (chunks, got, false)))
                }
                None if got == size => None,
                None => {
                    let e = std::io::Error::other(format!("the fetch stopped after {got} of {size} bytes"));
                    Some((Err(e), (chunks, got, true)))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: std::time::Duration = std::time::Duration::from_secs(5);

    fn chunks(parts: &[&'static [u8]]) -> impl futures::Stream<Item = Result<Bytes, String>> + Send + Unpin + 'static {
        stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn a_tee_gives_the_store_and_the_client_the_same_bytes() {
        let (tx, rx) = oneshot::channel();
        let (store, recorded) =
            tee(chunks(&[b"abc", b"de", b"f"]), 6, tx, GRACE, |head| format!("head {}", head.len())).await;
        assert_eq!(recorded.as_deref(), Some("head 3"), "the store records the live answer's type");
        let stored = tokio::spawn(store.map(|c| c.expect("chunk").to_vec()).concat());
        let live = rx.await.expect("live");
        assert_eq!(live.content_type, "head 3");
        let got: Vec<Bytes> = live.body().map(|c| c.expect("chunk")).collect().await;
        assert_eq!(got.concat(), b"abcdef");
        assert_eq!(stored.await.expect("store"), b"abcdef");
    }

    #[tokio::test]
    async fn a_fetch_that_fails_cuts_the_live_body() {
        let (tx, rx) = oneshot::channel();
        let failing = stream::iter(vec![Ok(Bytes::from_static(b"abc")), Err("a block never verified".to_owned())]);
        let (store, _) = tee(failing, 10, tx, GRACE, |_| String::new()).await;
        let stored: Vec<_> = tokio::spawn(store.collect::<Vec<_>>()).await.expect("store");
        assert!(stored.last().expect("items").is_err(), "the store sees the error");
        let got: Vec<_> = rx.await.expect("live").body().collect().await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_ref().expect("verified bytes").as_ref(), b"abc");
        assert!(got[1].is_err(), "short of the size: the body ends in an error");
    }

    #[tokio::test]
    async fn a_client_gone_leaves_the_fetch_to_the_store() {
        let (tx, rx) = oneshot::channel();
        drop(rx);
        let (store, _) = tee(chunks(&[b"abc", b"def"]), 6, tx, GRACE, |_| String::new()).await;
        let stored: Vec<Bytes> = store.map(|c| c.expect("chunk")).collect().await;
        assert_eq!(stored.concat(), b"abcdef");
        // A client that goes away mid-way: the store still gets everything.
        let (tx, rx) = oneshot::channel();
        let many: Vec<&'static [u8]> = vec![b"x"; LIVE_CHUNKS * 4];
        let (store, _) = tee(chunks(&many), many.len() as u64, tx, GRACE, |_| String::new()).await;
        let live = rx.await.expect("live");
        let consumer = tokio::spawn(store.collect::<Vec<_>>());
        drop(live);
        assert_eq!(consumer.await.expect("store").len(), many.len());
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_after_the_grace_and_the_store_goes_on() {
        // The client never reads, so the outcome does not depend on how long the grace is.
        let (tx, rx) = oneshot::channel();
        let many: Vec<&'static [u8]> = vec![b"x"; LIVE_CHUNKS * 4];
        let grace = std::time::Duration::from_millis(20);
        let (store, _) = tee(chunks(&many), many.len() as u64, tx, grace, |_| String::new()).await;
        let live = rx.await.expect("live");
        let stored = store.collect::<Vec<_>>().await;
        assert_eq!(stored.len(), many.len(), "the store got every chunk while the client read none");
        let got: Vec<_> = live.body().collect().await;
        assert_eq!(got.len(), LIVE_CHUNKS + 1, "the chunks it had room for, then the cut");
        assert!(got.last().expect("items").is_err());
    }

    #[tokio::test]
    async fn a_fetch_that_panics_leaves_the_table() {
        let flights = Arc::new(Flights::default());
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let joined = flights.join("k".into(), &slots, |_live| async { panic!("a bug in a fetch") });
        assert!(joined.wait(false).await.is_err());
        let again = flights.join("k".into(), &slots, |_live| async { Err(ApiError::not_found("second")) });
        assert!(again.live.is_some(), "the next download starts a new fetch");
    }

    #[tokio::test]
    async fn one_fetch_per_key_and_a_waiter_gone_cancels_nothing() {
        let flights = Arc::new(Flights::default());
        let slots = Arc::new(tokio::sync::Semaphore::new(2));
        let (release, hold) = oneshot::channel::<()>();
        let runs = Arc::new(AtomicU64::new(0));
        let started = {
            let runs = runs.clone();
            flights.join("k".into(), &slots, move |_live| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let _ = hold.await;
                Err(ApiError::not_found("held until released"))
            })
        };
        assert!(started.live.is_some(), "the first download starts the fetch");
        let second = flights.join("k".into(), &slots, |_live| async { unreachable!("joined, not started") });
        assert!(second.live.is_none());
        // The starter goes away; the fetch goes on, and the other download gets its answer.
        drop(started);
        release.send(()).expect("fetch waiting");
        let answer = second.wait(false).await;
        assert!(answer.is_err_and(|e| e.status == axum::http::StatusCode::NOT_FOUND));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Ended: the next download starts a new fetch.
        let third = flights.join("k".into(), &slots, |_live| async { Err(ApiError::not_found("again")) });
        assert!(third.live.is_some());
    }
}
