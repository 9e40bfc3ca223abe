//! Claims: which edge is making a thumbnail that is not recorded yet, or fetching remote media
//! that is not stored yet, so a storm of requests across edges makes it (or fetches it) once.
//!
//! Held in the leader's memory only. A claim is advice, never safety: a leader change or a
//! full table forgets claims, and then two edges may both make the thumbnail, which costs CPU
//! and nothing else (`CommitThumbnail` keeps the first recorded). Leases run on the leader's
//! monotonic clock, so a claimant that dies holds its claims only until they lapse.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Longest lease granted, whatever is asked.
pub const MAX_LEASE: Duration = Duration::from_secs(300);
/// Claims held at once; past it, claims are granted without being recorded.
const CAPACITY: usize = 100_000;

/// What a claim was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The claimant makes it.
    Granted,
    /// Another claimant is making it, for at most this much longer.
    Held(Duration),
}

/// Claims on things keyed by `K`: thumbnails by (source CID, spec), fetches by media.
pub struct Claims<K> {
    held: HashMap<K, Held>,
    /// With the table full: when its earliest claim lapses (no sweep before then).
    sweep_at: Option<Instant>,
}

struct Held {
    claimant: String,
    /// When this claimant was first granted it: renewals never hold it past
    /// `since + MAX_LEASE`.
    since: Instant,
    expires: Instant,
}

impl<K> Default for Claims<K> {
    fn default() -> Self {
        Self { held: HashMap::new(), sweep_at: None }
    }
}

impl<K: Eq + Hash> Claims<K> {
    pub fn claim(&mut self, key: K, claimant: &str, lease: Duration, now: Instant) -> Claim {
        let lease = lease.min(MAX_LEASE);
        match self.held.get_mut(&key) {
            Some(h) if h.claimant != claimant && h.expires > now => Claim::Held(h.expires - now),
            // Renewed by its holder, never past MAX_LEASE from its first grant: a claimant
            // asking again and again cannot hold it for ever.
            Some(h) if h.claimant == claimant && h.expires > now => {
                h.expires = (now + lease).min(h.since + MAX_LEASE).max(h.expires);
                Claim::Granted
            }
            Some(h) => {
                *h = Held { claimant: claimant.to_owned(), since: now, expires: now + lease };
                Claim::Granted
            }
            None => {
                if self.held.len() >= CAPACITY && self.sweep_at.is_none_or(|at| at <= now) {
                    self.held.retain(|_, h| h.expires > now);
                    self.sweep_at = self.held.values().map(|h| h.expires).min();
                }
                if self.held.len() < CAPACITY {
                    self.held.insert(key, Held { claimant: claimant.to_owned(), since: now, expires: now + lease });
                }
                Claim::Granted
            }
        }
    }

    /// Ends `claimant`'s claim (another's is left alone).
    pub fn release(&mut self, key: &K, claimant: &str) {
        if self.held.get(key).is_some_and(|h| h.claimant == claimant) {
            self.held.remove(key);
        }
    }

    /// Ends any claim on a thumbnail now recorded.
    pub fn recorded(&mut self, key: &K) {
        self.held.remove(key);
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ThumbnailMethod, ThumbnailSpec};
    use cid::Cid;

    fn key(n: u8) -> (Cid, ThumbnailSpec) {
        let hash = multihash::Multihash::<64>::wrap(0x12, &[n; 32]).expect("digest fits");
        (
            Cid::new_v1(0x55, hash),
            ThumbnailSpec { width: 32, height: 32, method: ThumbnailMethod::Crop, animated: false },
        )
    }

    #[test]
    fn one_claimant_at_a_time_until_it_commits_releases_or_lapses() {
        let mut c = Claims::<(Cid, ThumbnailSpec)>::default();
        let t0 = Instant::now();
        let lease = Duration::from_secs(30);
        assert_eq!(c.claim(key(1), "a", lease, t0), Claim::Granted);
        assert_eq!(c.claim(key(1), "b", lease, t0 + Duration::from_secs(10)), Claim::Held(Duration::from_secs(20)));
        // The holder asking again keeps it (and renews it).
        assert_eq!(c.claim(key(1), "a", lease, t0 + Duration::from_secs(10)), Claim::Granted);
        assert_eq!(c.claim(key(1), "b", lease, t0 + Duration::from_secs(39)), Claim::Held(Duration::from_secs(1)));
        // Other thumbnails are claimed independently.
        assert_eq!(c.claim(key(2), "b", lease, t0), Claim::Granted);
        // Lapsed: the next claimant gets it.
        assert_eq!(c.claim(key(1), "b", lease, t0 + Duration::from_secs(40)), Claim::Granted);
        assert_eq!(c.claim(key(1), "a", lease, t0 + Duration::from_secs(41)), Claim::Held(Duration::from_secs(29)));
        // Renewals never hold it past MAX_LEASE from its first grant.
        assert_eq!(c.claim(key(3), "a", MAX_LEASE, t0), Claim::Granted);
        for minute in 1..5 {
            assert_eq!(c.claim(key(3), "a", MAX_LEASE, t0 + Duration::from_secs(60 * minute)), Claim::Granted);
        }
        assert_eq!(c.claim(key(3), "b", lease, t0 + MAX_LEASE), Claim::Granted, "lapsed however often renewed");
        // Only the holder releases it.
        c.release(&key(1), "a");
        assert!(matches!(c.claim(key(1), "c", lease, t0 + Duration::from_secs(41)), Claim::Held(_)));
        c.release(&key(1), "b");
        assert_eq!(c.claim(key(1), "c", lease, t0 + Duration::from_secs(41)), Claim::Granted);
        // Recording it ends the claim whoever holds it.
        c.recorded(&key(1));
        c.recorded(&key(2));
        c.recorded(&key(3));
        assert!(c.is_empty());
    }

    #[test]
    fn leases_are_capped() {
        let mut c = Claims::<(Cid, ThumbnailSpec)>::default();
        let t0 = Instant::now();
        assert_eq!(c.claim(key(1), "a", Duration::from_secs(86_400), t0), Claim::Granted);
        assert_eq!(c.claim(key(1), "b", Duration::ZERO, t0), Claim::Held(MAX_LEASE));
    }

    #[test]
    fn a_full_table_drops_lapsed_claims_then_grants_unrecorded() {
        let mut c = Claims::<(Cid, ThumbnailSpec)>::default();
        let t0 = Instant::now();
        let spec = key(0).1;
        let hash = |i: u32| {
            let mut d = [0u8; 32];
            d[..4].copy_from_slice(&i.to_be_bytes());
            Cid::new_v1(0x55, multihash::Multihash::<64>::wrap(0x12, &d).expect("digest fits"))
        };
        for i in 0..CAPACITY as u32 {
            let lease = if i % 2 == 0 { Duration::from_secs(1) } else { Duration::from_secs(60) };
            assert_eq!(c.claim((hash(i), spec), "a", lease, t0), Claim::Granted);
        }
        assert_eq!(c.len(), CAPACITY);
        // Past the short leases: they are dropped to make room.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(c.claim((hash(u32::MAX), spec), "b", Duration::from_secs(60), later), Claim::Granted);
        assert_eq!(c.len(), CAPACITY / 2 + 1);
        assert!(matches!(c.claim((hash(u32::MAX), spec), "c", Duration::from_secs(60), later), Claim::Held(_)));
    }
}
