//! The Matrix spec's sizing rules, as pure arithmetic.
//!
//! - `scale` keeps the source's aspect ratio and fits inside the requested box: one side equals
//!   the box, the other is at most the box.
//! - `crop` fills the requested box exactly, cutting the source's excess evenly from both ends.
//! - Never upscale: a source smaller than the box is kept at its size (`scale`), or cut to the
//!   box's aspect ratio at its own scale (`crop`). So a thumbnail is never smaller than asked
//!   unless the source is.

use crate::{Method, Spec};

/// Part of the source image, in source pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rect {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

/// What to make of a source of a given size for one [`Spec`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub width: u32,
    pub height: u32,
    /// The part of the source the thumbnail shows (`None`: all of it).
    pub crop: Option<Rect>,
}

impl Plan {
    /// The part of a source of size `full` the thumbnail shows: the crop, or all of it.
    pub fn shown(&self, full: (u32, u32)) -> Rect {
        self.crop.unwrap_or(Rect { left: 0.0, top: 0.0, width: f64::from(full.0), height: f64::from(full.1) })
    }

    /// The smallest size the whole source may be decoded at without losing detail this plan
    /// needs (decoders that can shrink while decoding, like JPEG's reduced DCT, stop there).
    pub fn decode_size(&self, source: (u32, u32)) -> (u32, u32) {
        let Some(crop) = self.crop else { return (self.width, self.height) };
        let need = |src: u32, out: u32, part: f64| (f64::from(src) * f64::from(out) / part).ceil() as u32;
        (need(source.0, self.width, crop.width).min(source.0), need(source.1, self.height, crop.height).min(source.1))
    }
}

/// `num * a / b`, rounded to the nearest pixel and never 0.
fn ratio(num: u32, a: u32, b: u32) -> u32 {
    let v = (u64::from(num) * u64::from(a) + u64::from(b) / 2) / u64::from(b.max(1));
    u32::try_from(v).unwrap_or(u32::MAX).max(1)
}

/// The plan for a `source`-sized image (width, height; both at least 1).
pub fn plan(source: (u32, u32), spec: &Spec) -> Plan {
    let (sw, sh) = (source.0.max(1), source.1.max(1));
    let (w, h) = (spec.width.max(1), spec.height.max(1));
    match spec.method {
        Method::Scale => {
            if sw <= w && sh <= h {
                return Plan { width: sw, height: sh, crop: None };
            }
            // Wider than the box (compared without division): the width decides.
            if u64::from(sw) * u64::from(h) > u64::from(sh) * u64::from(w) {
                Plan { width: w, height: ratio(sh, w, sw).min(h), crop: None }
            } else {
                Plan { width: ratio(sw, h, sh).min(w), height: h, crop: None }
            }
        }
        Method::Crop => {
            // The largest centred part of the source with the box's aspect ratio.
            let (fw, fh) = (f64::from(sw), f64::from(sh));
            let crop = if u64::from(sw) * u64::from(h) > u64::from(sh) * u64::from(w) {
                let width = fh * f64::from(w) / f64::from(h);
                Rect { left: (fw - width) / 2.0, top: 0.0, width, height: fh }
            } else {
                let height = fw * f64::from(h) / f64::from(w);
                Rect { left: 0.0, top: (fh - height) / 2.0, width: fw, height }
            };
            if sw >= w && sh >= h {
                Plan { width: w, height: h, crop: Some(crop) }
            } else {
                // Too small to fill the box: the same cut, not enlarged.
                let width = (crop.width.round() as u32).clamp(1, sw);
                let height = (crop.height.round() as u32).clamp(1, sh);
                Plan { width, height, crop: Some(crop) }
            }
        }
    }
}

/// Which of the sizes an operator has thumbnails made at answers a request: the smallest one
/// of the requested method that is at least as large as asked in both directions (and, for
/// `crop`, of the same aspect ratio: a crop is in the shape asked). When none is, a size made on
/// demand: each side rounded up to the next step of [`LADDER`] (capped at `max_side`), so
/// however many sizes clients ask for, a source has at most a few hundred thumbnails (a crop's
/// shape is then within one step of the shape asked, as servers that answer with the nearest
/// larger size do anyway).
///
/// Sizes are compared as boxes, so the answer is never smaller than asked (before the
/// never-upscale rule, which depends on the source).
pub fn choose(requested: &Spec, sizes: &[Spec], max_side: u32) -> Spec {
    let same_shape = |s: &Spec| {
        requested.method == Method::Scale
            || u64::from(s.width) * u64::from(requested.height) == u64::from(s.height) * u64::from(requested.width)
    };
    let fits = |s: &&Spec| {
        s.method == requested.method && s.width >= requested.width && s.height >= requested.height && same_shape(s)
    };
    let best = sizes.iter().filter(fits).min_by_key(|s| (u64::from(s.width) * u64::from(s.height), s.width));
    match best {
        Some(s) => Spec { animated: requested.animated, ..*s },
        None if requested.method == Method::Crop => {
            // The larger side goes up the ladder; the other keeps the shape, its ratio rounded
            // up to one of a few (so the crop is never smaller than asked and within a step of
            // the shape asked).
            let (w, h) = (requested.width.max(1), requested.height.max(1));
            let (large, small) = (w.max(h), w.min(h));
            let side = step_up(large, max_side);
            let ratio = f64::from(small) / f64::from(large);
            let quantized = CROP_RATIOS.iter().copied().rev().find(|&r| r >= ratio - 1e-9).unwrap_or(1.0);
            let other = ((f64::from(side) * quantized).ceil() as u32).clamp(1, side);
            let (width, height) = if w >= h { (side, other) } else { (other, side) };
            Spec { width, height, ..*requested }
        }
        None => Spec {
            width: step_up(requested.width, max_side),
            height: step_up(requested.height, max_side),
            ..*requested
        },
    }
}

/// The shapes (smaller side over larger) crops made on demand are rounded up to.
pub const CROP_RATIOS: [f64; 13] = [
    1.0,
    0.875,
    0.75,
    0.666_666_666_666_666_6,
    0.5625,
    0.5,
    0.375,
    0.25,
    0.125,
    0.0625,
    0.031_25,
    0.015_625,
    0.007_812_5,
];

/// The sides sizes made on demand are rounded up to (then `max_side`).
pub const LADDER: [u32; 10] = [32, 64, 96, 128, 192, 256, 384, 512, 768, 1024];

fn step_up(side: u32, max_side: u32) -> u32 {
    let max_side = max_side.max(1);
    LADDER.iter().copied().find(|&s| s >= side).unwrap_or(max_side).min(max_side)
}

/// The sizes the Matrix spec suggests servers make: 32×32 and 96×96 cropped, 320×240, 640×480
/// and 800×600 scaled.
pub fn spec_sizes() -> Vec<Spec> {
    let s = |width, height, method| Spec { width, height, method, animated: false };
    vec![
        s(32, 32, Method::Crop),
        s(96, 96, Method::Crop),
        s(320, 240, Method::Scale),
        s(640, 480, Method::Scale),
        s(800, 600, Method::Scale),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(width: u32, height: u32, method: Method) -> Spec {
        Spec { width, height, method, animated: false }
    }

    #[test]
    fn scale_fits_the_box_with_one_side_equal_to_it() {
        let p = plan((4000, 3000), &spec(320, 240, Method::Scale));
        assert_eq!((p.width, p.height), (320, 240));
        let p = plan((4000, 2000), &spec(320, 240, Method::Scale));
        assert_eq!((p.width, p.height), (320, 160));
        let p = plan((1000, 3000), &spec(320, 240, Method::Scale));
        assert_eq!((p.width, p.height), (80, 240));
        // A 1-pixel-high strip never becomes 0 high.
        let p = plan((10_000, 1), &spec(320, 240, Method::Scale));
        assert_eq!((p.width, p.height), (320, 1));
    }

    #[test]
    fn crop_fills_the_box_and_cuts_evenly() {
        let p = plan((4000, 3000), &spec(96, 96, Method::Crop));
        assert_eq!((p.width, p.height), (96, 96));
        let c = p.crop.expect("crop");
        assert_eq!((c.left, c.top, c.width, c.height), (500.0, 0.0, 3000.0, 3000.0));
        let p = plan((300, 900), &spec(96, 96, Method::Crop));
        let c = p.crop.expect("crop");
        assert_eq!((c.left, c.top, c.width, c.height), (0.0, 300.0, 300.0, 300.0));
    }

    #[test]
    fn nothing_is_ever_enlarged() {
        let p = plan((100, 50), &spec(320, 240, Method::Scale));
        assert_eq!((p.width, p.height), (100, 50));
        // Too narrow for the box: cut to its aspect ratio at the source's own scale.
        let p = plan((100, 50), &spec(96, 96, Method::Crop));
        assert_eq!((p.width, p.height), (50, 50));
        let p = plan((90, 300), &spec(96, 96, Method::Crop));
        assert_eq!((p.width, p.height), (90, 90));
        let p = plan((20, 20), &spec(800, 600, Method::Crop));
        assert_eq!((p.width, p.height), (20, 15));
    }

    #[test]
    fn every_plan_obeys_the_rules() {
        // Exhaustive over a grid of shapes: output within the box, never larger than the
        // source, and as large as the rules allow.
        for sw in [1, 2, 31, 32, 33, 95, 96, 97, 240, 320, 321, 599, 600, 800, 801, 4000] {
            for sh in [1, 3, 32, 96, 239, 240, 241, 480, 600, 3000] {
                for &(w, h) in &[(32, 32), (96, 96), (320, 240), (640, 480), (800, 600), (1, 1000)] {
                    let s = plan((sw, sh), &spec(w, h, Method::Scale));
                    assert!(s.width <= w && s.height <= h, "{sw}x{sh} scale {w}x{h}: {s:?}");
                    assert!(s.width <= sw && s.height <= sh, "{sw}x{sh} scale {w}x{h}: {s:?}");
                    assert!(s.width == w.min(sw) || s.height == h.min(sh), "{sw}x{sh} scale {w}x{h}: {s:?}");
                    let c = plan((sw, sh), &spec(w, h, Method::Crop));
                    assert!(c.width <= w && c.height <= h, "{sw}x{sh} crop {w}x{h}: {c:?}");
                    assert!(c.width <= sw && c.height <= sh, "{sw}x{sh} crop {w}x{h}: {c:?}");
                    if sw >= w && sh >= h {
                        assert_eq!((c.width, c.height), (w, h));
                    } else {
                        assert!(c.width == sw || c.height == sh, "{sw}x{sh} crop {w}x{h}: {c:?}");
                    }
                    let r = c.crop.expect("crop");
                    assert!(r.left >= 0.0 && r.top >= 0.0, "{r:?}");
                    assert!(r.left + r.width <= f64::from(sw) + 1e-9 && r.top + r.height <= f64::from(sh) + 1e-9);
                }
            }
        }
    }

    #[test]
    fn decoding_may_shrink_only_down_to_what_the_plan_needs() {
        let p = plan((4000, 3000), &spec(96, 96, Method::Crop));
        assert_eq!(p.decode_size((4000, 3000)), (128, 96));
        let p = plan((4000, 3000), &spec(800, 600, Method::Scale));
        assert_eq!(p.decode_size((4000, 3000)), (800, 600));
    }

    #[test]
    fn requests_get_the_nearest_size_at_least_as_large() {
        let sizes = spec_sizes();
        let pick = |w, h, m| {
            let s = choose(&spec(w, h, m), &sizes, 1600);
            (s.width, s.height, s.method)
        };
        assert_eq!(pick(32, 32, Method::Crop), (32, 32, Method::Crop));
        assert_eq!(pick(40, 40, Method::Crop), (96, 96, Method::Crop));
        // A crop keeps the shape asked: no configured size has it, so it is made on demand,
        // each side rounded up a step.
        assert_eq!(pick(33, 20, Method::Crop), (64, 43, Method::Crop));
        assert_eq!(pick(50, 70, Method::Crop), (72, 96, Method::Crop));
        assert_eq!(pick(10, 20, Method::Crop), (16, 32, Method::Crop));
        assert_eq!(pick(50, 50, Method::Scale), (320, 240, Method::Scale));
        assert_eq!(pick(320, 241, Method::Scale), (640, 480, Method::Scale));
        assert_eq!(pick(800, 600, Method::Scale), (800, 600, Method::Scale));
        // Larger than every configured size: made on demand, rounded up a step, capped.
        assert_eq!(pick(1024, 768, Method::Scale), (1024, 768, Method::Scale));
        assert_eq!(pick(200, 200, Method::Crop), (256, 256, Method::Crop));
        assert_eq!(pick(1025, 1025, Method::Crop), (1600, 1600, Method::Crop));
        assert_eq!(pick(100_000, 5, Method::Scale), (1600, 32, Method::Scale));
        // However many sizes are asked for, few are made.
        let mut made = std::collections::HashSet::new();
        for w in 1..=1700 {
            for h in (1..=1700).step_by(7) {
                made.insert(pick(w, h, Method::Crop));
            }
        }
        assert!(made.len() <= (LADDER.len() + 1) * CROP_RATIOS.len() * 2, "{}", made.len());
        // Every pick is at least as large as asked and close to its shape.
        for (w, h) in [(10, 20), (1000, 10), (33, 20), (50, 70), (300, 301), (1599, 7), (7, 7)] {
            let (pw, ph, _) = pick(w, h, Method::Crop);
            assert!(pw >= w && ph >= h, "{w}x{h} -> {pw}x{ph}");
            let skew = (f64::from(pw) / f64::from(ph)) / (f64::from(w) / f64::from(h));
            assert!((0.5..=2.0).contains(&skew), "{w}x{h} -> {pw}x{ph}");
        }
        assert_eq!(pick(1, 1, Method::Crop), (32, 32, Method::Crop));
    }
}
