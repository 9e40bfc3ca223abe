//! `Range: bytes=…` (RFC 9110 §14): one range, including suffix (`-N`) and open-ended
//! (`N-`) forms. Several ranges, or units other than bytes, are ignored (the full body is
//! served), as the RFC allows. The unit is case-insensitive; a position too large for 64 bits
//! is past any body (so `N-` with such an N is 416, not the whole body).

/// What to do with a request's `Range` header for a body of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeDecision {
    /// No (usable) range: send everything with 200.
    Full,
    /// Send bytes `start..=end` with 206.
    Partial { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

pub fn decide(header: Option<&str>, size: u64) -> RangeDecision {
    let Some(spec) = header
        .and_then(|h| h.trim().split_once('='))
        .and_then(|(unit, spec)| unit.trim().eq_ignore_ascii_case("bytes").then_some(spec))
    else {
        return RangeDecision::Full;
    };
    if spec.contains(',') {
        return RangeDecision::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeDecision::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    // Digits only; more than u64 holds is as good as u64::MAX (past the end of anything).
    let parse = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) { None } else { Some(s.parse().unwrap_or(u64::MAX)) }
    };
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(last) {
            Some(0) => RangeDecision::Unsatisfiable,
            Some(n) if size == 0 => {
                let _ = n;
                RangeDecision::Unsatisfiable
            }
            Some(n) => RangeDecision::Partial { start: size.saturating_sub(n), end: size - 1 },
            None => RangeDecision::Full,
        },
        // bytes=N-: from N to the end.
        (false, true) => match parse(first) {
            Some(start) if start < size => RangeDecision::Partial { start, end: size - 1 },
            Some(_) => RangeDecision::Unsatisfiable,
            None => RangeDecision::Full,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(start), Some(end)) if start <= end => {
                if start >= size {
                    RangeDecision::Unsatisfiable
                } else {
                    RangeDecision::Partial { start, end: end.min(size - 1) }
                }
            }
            // last < first: syntactically invalid, ignore the header.
            _ => RangeDecision::Full,
        },
        (true, true) => RangeDecision::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::RangeDecision::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(decide(None, 10), Full);
        assert_eq!(decide(Some("bytes=0-0"), 10), Partial { start: 0, end: 0 });
        assert_eq!(decide(Some("bytes=2-5"), 10), Partial { start: 2, end: 5 });
        assert_eq!(decide(Some("bytes=2-500"), 10), Partial { start: 2, end: 9 });
        assert_eq!(decide(Some("bytes=7-"), 10), Partial { start: 7, end: 9 });
        assert_eq!(decide(Some("bytes=-3"), 10), Partial { start: 7, end: 9 });
        assert_eq!(decide(Some("bytes=-30"), 10), Partial { start: 0, end: 9 });
        assert_eq!(decide(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(decide(Some("bytes=10-12"), 10), Unsatisfiable);
        assert_eq!(decide(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(decide(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(decide(Some("bytes=-5"), 0), Unsatisfiable);
        assert_eq!(decide(Some("bytes=5-2"), 10), Full);
        assert_eq!(decide(Some("bytes=0-1,3-4"), 10), Full);
        assert_eq!(decide(Some("items=0-1"), 10), Full);
        assert_eq!(decide(Some("bytes=a-b"), 10), Full);
        assert_eq!(decide(Some("bytes=+1-2"), 10), Full);
        // The unit is case-insensitive.
        assert_eq!(decide(Some("Bytes=2-5"), 10), Partial { start: 2, end: 5 });
        assert_eq!(decide(Some("BYTES = 2-5"), 10), Partial { start: 2, end: 5 });
        // Positions past 64 bits.
        let huge = "99999999999999999999999";
        assert_eq!(decide(Some(&format!("bytes={huge}-")), 10), Unsatisfiable);
        assert_eq!(decide(Some(&format!("bytes={huge}-{huge}")), 10), Unsatisfiable);
        assert_eq!(decide(Some(&format!("bytes=2-{huge}")), 10), Partial { start: 2, end: 9 });
        assert_eq!(decide(Some(&format!("bytes=-{huge}")), 10), Partial { start: 0, end: 9 });
    }

    proptest! {
        #[test]
        fn partial_ranges_stay_inside_the_body(size in 0u64..5000, a in 0u64..6000, b in 0u64..6000, form in 0u8..3) {
            let header = match form { 0 => format!("bytes={a}-{b}"), 1 => format!("bytes={a}-"), _ => format!("bytes=-{b}") };
            match decide(Some(&header), size) {
                Partial { start, end } => {
                    prop_assert!(start <= end);
                    prop_assert!(end < size);
                }
                Unsatisfiable => prop_assert!(size == 0 || a >= size || (form == 2 && b == 0)),
                Full => prop_assert!(form == 0 && b < a),
            }
        }
    }
}
