//! Thumbnails of untrusted images, for mxcas.
//!
//! Everything here is CPU work on bytes already in memory: no I/O runtime, no store. The edge
//! reads (and verifies) a source, hands it to [`generate`] on a [`Pool`] thread, and stores what
//! comes back as content of its own.
//!
//! Sources are hostile until decoded within [`Limits`]: their size, their pixel count (read from
//! the header before anything is decoded, so a small file claiming a huge canvas costs nothing)
//! and, for animations, their frame count and the pixels of all frames together. Decoding uses
//! the `image` crate's codecs, with JPEG decoded by `jpeg-decoder` at the smallest reduced-DCT
//! scale the largest requested thumbnail allows; resizing uses `fast_image_resize`.
//!
//! Output: JPEG for opaque still images, PNG when transparency shows, GIF for animations
//! (asked for with [`Spec::animated`] and present in the source).

mod decode;
mod encode;
mod pool;
pub mod size;

pub use pool::{Pool, PoolError};

/// How the thumbnail relates to the requested box (the Matrix spec's `method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// Fill the box exactly, cutting off what does not fit.
    Crop,
    /// Keep the aspect ratio and fit inside the box.
    Scale,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Crop => "crop",
            Method::Scale => "scale",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "crop" => Some(Method::Crop),
            "scale" => Some(Method::Scale),
            _ => None,
        }
    }
}

/// One thumbnail to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Spec {
    pub width: u32,
    pub height: u32,
    pub method: Method,
    /// Animate it if the source is animated (otherwise the first frame, still).
    pub animated: bool,
}

/// Bounds on what a source may cost to decode.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest source file, in bytes.
    pub max_source_bytes: u64,
    /// Largest canvas (width × height) of a source.
    pub max_pixels: u64,
    /// Most frames of an animation that are animated; a longer one gets a still thumbnail.
    pub max_frames: u32,
    /// Most pixels of all frames of an animation together; a heavier one gets a still thumbnail.
    pub max_animation_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_source_bytes: 32 << 20, max_pixels: 32_000_000, max_frames: 300, max_animation_pixels: 200_000_000 }
    }
}

/// A finished thumbnail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    /// `image/jpeg`, `image/png` or `image/gif`.
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
    /// More than one frame.
    pub animated: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not an image format this can read (including encrypted and opaque files).
    #[error("cannot make a thumbnail of this content: {0}")]
    Unsupported(String),
    /// Over one of the [`Limits`].
    #[error("too large to make a thumbnail of: {0}")]
    TooLarge(String),
    /// Claims to be a supported format but does not decode.
    #[error("the image does not decode: {0}")]
    Corrupt(String),
    /// A bug or an exhausted resource while resizing or encoding.
    #[error("making the thumbnail failed: {0}")]
    Internal(String),
}

/// Whether `source` looks like an image format [`generate`] reads (by its first bytes only).
pub fn is_supported(source: &[u8]) -> bool {
    decode::format_of(source).is_ok()
}

/// Whether the format of `source` can carry an animation (GIF, WebP, PNG/APNG).
pub fn may_animate(source: &[u8]) -> bool {
    decode::format_of(source).is_ok_and(decode::may_animate)
}

/// Makes one thumbnail per spec from one decode of `source`, in the order asked.
pub fn generate(source: &[u8], specs: &[Spec], limits: &Limits) -> Result<Vec<Thumbnail>, Error> {
    let decoded = decode::decode(source, specs, limits)?;
    specs.iter().enumerate().map(|(i, spec)| encode::thumbnail(&decoded, i, spec)).collect()
}
