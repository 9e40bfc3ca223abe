//! Verified multi-source fetch of a UnixFS file from trustless gateways ("Media as Rooms",
//! with a merkle DAG).
//!
//! Given a root CID and a byte range, [`fetch`] asks several gateways for blocks at once
//! (`GET {gateway}/ipfs/{cid}?format=raw`, `Accept: application/vnd.ipld.raw`) and checks
//! each block against its CID as it arrives ([`FileRange`] plans which blocks cover the range
//! and takes them in any order). The caller receives the range's bytes in order, as soon as
//! they are contiguous, and only bytes that verified: a lying gateway's block is dropped and
//! asked of another source, a failing or silent one's blocks are re-assigned, a slow one's
//! block that holds up the output is asked of an idle source as well (first verified copy
//! wins). A range reads only the blocks it covers.
//!
//! Bounds: `window` blocks in flight in all, `per_source` per gateway, and only among the
//! `window` wanted blocks nearest the reader, so the verified blocks waiting for the caller are
//! at most about `window` (plus the channel's few): a slow reader slows the fetch instead of
//! filling memory, and a reader that goes away stops it. A gateway that sends a block that does
//! not verify is not asked again by this fetch; one that fails [`MAX_FAILURES`] times in a row
//! is dropped too.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cid::Cid;
use mxcas_cas::{FileRange, Limits, RangeError, VerifiedBlock};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Failures in a row (other than a block it does not have) after which a gateway is not asked
/// again by a fetch.
pub const MAX_FAILURES: u32 = 3;
/// Recent block times kept for the hedging delay.
const LATENCIES: usize = 64;

/// One trustless gateway: `base` is its URL without the `/ipfs/` path.
#[derive(Clone, Debug)]
pub struct Source {
    pub base: String,
    pub http: reqwest::Client,
    /// Set for another Matrix server's gateway: each request is signed with `X-Matrix`.
    pub signed: Option<std::sync::Arc<Signed>>,
}

/// How requests to a Matrix server's gateway are signed.
pub struct Signed {
    pub key: std::sync::Arc<mxcas_federation::SigningKey>,
    /// Our server name.
    pub origin: String,
    /// Its server name.
    pub destination: String,
    /// The `Host` header its federation address takes.
    pub host: String,
}

impl std::fmt::Debug for Signed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "signed by {} for {}", self.origin, self.destination)
    }
}

#[derive(Clone, Debug)]
pub struct FetchConfig {
    pub limits: Limits,
    /// Blocks being fetched at once, from all sources.
    pub window: usize,
    /// Blocks being fetched at once from one source.
    pub per_source: usize,
    /// Deadline of one block request.
    pub block_timeout: Duration,
    /// A block holding up the output is asked of another idle source after this long (or four
    /// times the median block time seen so far, if longer).
    pub hedge_after: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            window: 16,
            per_source: 4,
            block_timeout: Duration::from_secs(30),
            hedge_after: Duration::from_millis(500),
        }
    }
}

/// Why a fetch ended before its range was read.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    /// Every source still in use was asked for a block, and none had it (or a verified copy
    /// of it); `failing` sources had been dropped for failing to answer, so it may exist and
    /// be served another time.
    #[error("no source served block {cid} ({tried} asked, {failing} failing)")]
    NoSource { cid: Cid, tried: usize, failing: usize },
    /// The DAG itself cannot be read (blocks that verify but make no valid file).
    #[error(transparent)]
    Dag(#[from] RangeError),
    #[error("the fetch planner has nothing to ask for and is not done")]
    Stuck,
    #[error("the fetch ended without an answer")]
    Ended,
    /// Every source failed or was dropped before a block was found.
    #[error("every source failed or sent bad blocks ({0} asked)")]
    SourcesFailed(usize),
    #[error("the fetch took longer than it may")]
    Deadline,
}

/// What a fetch reports, in order: the file's size once the root is in, then the range's
/// bytes, then nothing (done) or an error.
#[derive(Debug)]
pub enum Fetched {
    Size(u64),
    Bytes(Bytes),
}

/// Per-source counts of one fetch, for logs and tests.
#[derive(Clone, Debug, Default)]
pub struct SourceReport {
    pub base: String,
    pub blocks: u64,
    pub bad_blocks: u64,
    pub failures: u32,
    /// It refused to serve (400, 401, 403, 405): not a failure to answer.
    pub refused: bool,
}

struct SourceState {
    source: Source,
    in_flight: usize,
    failures: u32,
    dropped: bool,
    report: SourceReport,
}

/// One wanted block's requests.
#[derive(Default)]
struct Want {
    /// Sources asked (answered or still asked).
    tried: HashSet<usize>,
    /// Requests to sources now: which source, since when, which task.
    asking: Vec<(usize, Instant, tokio::task::Id)>,
}

enum Answer {
    Block(Vec<u8>),
    /// The source does not have it (404/410).
    Absent,
    /// The source will not serve us (400, 401, 403, 405).
    Refused(u16),
    /// Anything else: timeouts, errors, oversized or broken bodies.
    Failed(String),
}

/// Where a fetch's [`Fetched`] arrive.
pub type Receiver = mpsc::Receiver<Result<Fetched, FetchError>>;

/// Starts fetching `range` of the file `root` from `sources`; the receiver yields what
/// [`Fetched`] says, or the error that ended the fetch. Dropping the receiver stops it (its
/// requests are aborted). The join handle answers each source's counts.
pub fn fetch(
    sources: Vec<Source>,
    root: Cid,
    range: Range<u64>,
    config: FetchConfig,
) -> Result<(Receiver, tokio::task::JoinHandle<Vec<SourceReport>>), FetchError> {
    let file = FileRange::new(root, range, config.limits)?;
    let (tx, rx) = mpsc::channel(4);
    let task = tokio::spawn(run(sources, file, config, tx));
    Ok((rx, task))
}

/// The file a fetch delivers: its size (known once the root is in, before any byte is read),
/// and its bytes, a stream that ends only once it has delivered that many (anything shorter
/// ends in an error, so a short file is never taken for the whole). Past `deadline` the
/// stream ends in an error too: whoever reads it (the store) sees a failed body and cleans up,
/// rather than being dropped mid-write.
pub async fn into_body(
    mut rx: Receiver,
    deadline: tokio::time::Instant,
) -> Result<(u64, impl futures::Stream<Item = Result<Bytes, String>> + Send + Unpin + 'static), FetchError> {
    let size = match tokio::time::timeout_at(deadline, rx.recv()).await {
        Ok(Some(Ok(Fetched::Size(size)))) => size,
        Ok(Some(Err(e))) => return Err(e),
        Ok(Some(Ok(Fetched::Bytes(_))) | None) => return Err(FetchError::Ended),
        Err(_) => return Err(FetchError::Deadline),
    };
    let body = futures::stream::unfold((rx, 0u64, false), move |(mut rx, got, over)| async move {
        if over {
            return None;
        }
        // Checked first too: with a slow reader the channel is always ready, so the timeout
        // alone would never fire.
        let next = match tokio::time::Instant::now() < deadline {
            true => tokio::time::timeout_at(deadline, rx.recv()).await.ok(),
            false => None,
        };
        let Some(next) = next else {
            return Some((Err(FetchError::Deadline.to_string()), (rx, got, true)));
        };
        match next {
            Some(Ok(Fetched::Bytes(b))) => {
                let got = got + b.len() as u64;
                Some((Ok(b), (rx, got, false)))
            }
            Some(Ok(Fetched::Size(_))) => Some((Err("block fetch sent the size twice".to_owned()), (rx, got, true))),
            Some(Err(e)) => Some((Err(e.to_string()), (rx, got, true))),
            None if got == size => None,
            None => Some((Err(format!("block fetch ended after {got} of {size} bytes")), (rx, got, true))),
        }
    });
    Ok((size, Box::pin(body)))
}

async fn run(
    sources: Vec<Source>,
    mut file: FileRange,
    config: FetchConfig,
    tx: mpsc::Sender<Result<Fetched, FetchError>>,
) -> Vec<SourceReport> {
    let mut sources: Vec<SourceState> = sources
        .into_iter()
        .map(|source| SourceState {
            report: SourceReport { base: source.base.clone(), ..SourceReport::default() },
            source,
            in_flight: 0,
            failures: 0,
            dropped: false,
        })
        .collect();
    let mut wants: HashMap<Cid, Want> = HashMap::new();
    let mut requests: JoinSet<(Answer, Duration)> = JoinSet::new();
    // Each request's source and block, by task.
    let mut asked: HashMap<tokio::task::Id, (usize, Cid)> = HashMap::new();
    let mut latencies: VecDeque<Duration> = VecDeque::with_capacity(LATENCIES);
    let mut size_sent = false;
    let outcome: Result<(), FetchError> = 'fetch: loop {
        // Bytes ready, in order, go out first (a gone receiver ends the fetch).
        if !size_sent && let Some(size) = file.file_size() {
            size_sent = true;
            if tx.send(Ok(Fetched::Size(size))).await.is_err() {
                break 'fetch Ok(());
            }
        }
        while let Some(bytes) = file.next_bytes() {
            if tx.send(Ok(Fetched::Bytes(Bytes::from(bytes)))).await.is_err() {
                break 'fetch Ok(());
            }
        }
        if file.is_done() {
            break Ok(());
        }
        // Only the blocks nearest the reader: what arrives early waits in memory, so no more
        // than the window of it.
        let wanted = file.first_wants(config.window);
        let wanted_set: HashSet<Cid> = wanted.iter().copied().collect();
        wants.retain(|cid, _| wanted_set.contains(cid));
        let in_flight: usize = sources.iter().map(|s| s.in_flight).sum();
        let mut free = config.window.saturating_sub(in_flight);
        let hedge_after = hedge_delay(&latencies, config.hedge_after);
        for (position, cid) in wanted.iter().enumerate() {
            if free == 0 || !usable(&sources).any(|i| sources[i].in_flight < config.per_source) {
                break;
            }
            let want = wants.entry(*cid).or_default();
            // A block is asked of one source at a time, except the one holding up the output
            // (the first wanted), once its request is slow.
            let hedge = position == 0
                && !want.asking.is_empty()
                && want.asking.iter().all(|(_, since, _)| since.elapsed() >= hedge_after);
            if !want.asking.is_empty() && !hedge {
                continue;
            }
            let Some(s) = pick(&sources, &want.tried, config.per_source) else {
                if want.asking.is_empty() && usable(&sources).all(|i| want.tried.contains(&i)) {
                    let failing = sources.iter().filter(|s| s.failures >= MAX_FAILURES).count();
                    break 'fetch Err(FetchError::NoSource { cid: *cid, tried: want.tried.len(), failing });
                }
                continue;
            };
            want.tried.insert(s);
            sources[s].in_flight += 1;
            free -= 1;
            let (source, cid, limits, timeout) = (sources[s].source.clone(), *cid, config.limits, config.block_timeout);
            let task = requests.spawn(async move {
                let started = Instant::now();
                let answer = match tokio::time::timeout(timeout, ask(&source, &cid, limits.max_block_size)).await {
                    Ok(a) => a,
                    Err(_) => Answer::Failed(format!("no answer in {timeout:?}")),
                };
                (answer, started.elapsed())
            });
            want.asking.push((s, Instant::now(), task.id()));
            asked.insert(task.id(), (s, cid));
        }
        if requests.is_empty() {
            if usable(&sources).next().is_none() {
                break Err(FetchError::SourcesFailed(sources.len()));
            }
            // Not done, nothing wanted or nothing asked: the planner contradicts itself.
            break Err(FetchError::Stuck);
        }
        // Wait for an answer, or for the first wanted block's request to become slow (once it
        // is, an answer, which frees a source, is what can let it be asked elsewhere).
        let hedge_at = wanted
            .first()
            .and_then(|c| wants.get(c))
            .and_then(|w| w.asking.iter().map(|(_, t, _)| *t).max())
            .and_then(|t| t.checked_add(hedge_after))
            .filter(|t| *t > Instant::now());
        let hedge = async move {
            match hedge_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        // A reader that went away ends the fetch now, not at the next block it would get.
        let joined = tokio::select! {
            j = requests.join_next_with_id() => j,
            _ = hedge => continue,
            _ = tx.closed() => break Ok(()),
        };
        let (id, answer, took) = match joined {
            Some(Ok((id, (answer, took)))) => (id, answer, took),
            Some(Err(e)) => (e.id(), Answer::Failed(format!("request task: {e}")), Duration::ZERO),
            None => continue,
        };
        let Some((s, cid)) = asked.remove(&id) else { continue };
        sources[s].in_flight -= 1;
        let still_wanted = wants.get_mut(&cid).map(|w| w.asking.retain(|(_, _, task)| *task != id)).is_some();
        match answer {
            Answer::Block(bytes) => match VerifiedBlock::verify(cid, bytes, &config.limits) {
                Ok(block) => {
                    sources[s].report.blocks += 1;
                    sources[s].failures = 0;
                    if latencies.len() == LATENCIES {
                        latencies.pop_front();
                    }
                    latencies.push_back(took);
                    if still_wanted {
                        wants.remove(&cid);
                        match file.add(block) {
                            Ok(()) | Err(RangeError::NotWanted(_)) => {}
                            Err(e) => break Err(e.into()),
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(gateway = %sources[s].source.base, %cid, error = %e,
                        "a gateway served a block that does not verify; it is not asked again");
                    sources[s].report.bad_blocks += 1;
                    sources[s].dropped = true;
                }
            },
            Answer::Absent => {}
            Answer::Refused(status) => {
                tracing::info!(gateway = %sources[s].source.base, status, "a gateway refuses to serve blocks; not asked again");
                sources[s].report.refused = true;
                sources[s].dropped = true;
            }
            Answer::Failed(why) => {
                tracing::info!(gateway = %sources[s].source.base, %cid, %why, "block request failed");
                // It may be asked again (a source is dropped after a few failures in a row).
                if let Some(w) = wants.get_mut(&cid) {
                    w.tried.remove(&s);
                }
                let state = &mut sources[s];
                state.failures += 1;
                state.report.failures += 1;
                if state.failures >= MAX_FAILURES {
                    state.dropped = true;
                }
            }
        }
    };
    if let Err(e) = outcome {
        tracing::info!(error = %e, "block fetch failed");
        let _ = tx.send(Err(e)).await;
    }
    requests.abort_all();
    sources.into_iter().map(|s| s.report).collect()
}

fn usable(sources: &[SourceState]) -> impl Iterator<Item = usize> + '_ {
    sources.iter().enumerate().filter(|(_, s)| !s.dropped).map(|(i, _)| i)
}

/// The usable source not yet asked for this block with the fewest requests in flight (under
/// `per_source`), fewest failures first among equals.
fn pick(sources: &[SourceState], tried: &HashSet<usize>, per_source: usize) -> Option<usize> {
    usable(sources)
        .filter(|i| !tried.contains(i) && sources[*i].in_flight < per_source)
        .min_by_key(|i| (sources[*i].in_flight, sources[*i].failures, *i))
}

/// How long the first wanted block's request may take before another source is asked too.
fn hedge_delay(latencies: &VecDeque<Duration>, floor: Duration) -> Duration {
    if latencies.is_empty() {
        return floor.max(Duration::from_secs(2));
    }
    let mut sorted: Vec<Duration> = latencies.iter().copied().collect();
    sorted.sort_unstable();
    (sorted[sorted.len() / 2] * 4).max(floor)
}

/// One block of `source`, read to at most `max` bytes.
async fn ask(source: &Source, cid: &Cid, max: usize) -> Answer {
    let path = format!("/ipfs/{cid}?format=raw");
    let mut request = source
        .http
        .get(format!("{}{path}", source.base.trim_end_matches('/')))
        .header(reqwest::header::ACCEPT, "application/vnd.ipld.raw");
    if let Some(signed) = &source.signed {
        let auth = match mxcas_federation::x_matrix::authorization(
            &signed.key,
            &signed.origin,
            &signed.destination,
            "GET",
            &path,
            None,
        ) {
            Ok(a) => a,
            Err(e) => return Answer::Failed(format!("cannot sign: {e}")),
        };
        request = request.header(reqwest::header::HOST, &signed.host).header(reqwest::header::AUTHORIZATION, auth);
    }
    let resp = match request.send().await {
        Ok(r) => r,
        Err(e) => return Answer::Failed(crate::federation::error_chain(&e)),
    };
    match resp.status().as_u16() {
        200 => {}
        404 | 410 => return Answer::Absent,
        s @ (400 | 401 | 403 | 405) => return Answer::Refused(s),
        s => return Answer::Failed(format!("answered {s}")),
    }
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Answer::Failed(format!("a block over {max} bytes"));
    }
    match crate::federation::read_limited(resp, max).await {
        Ok(bytes) => Answer::Block(bytes),
        Err(e) => Answer::Failed(e),
    }
}
