//! Decoding within limits: the header first (format, canvas, orientation), pixels only once
//! the canvas is known to be within bounds.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{AnimationDecoder, DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::size::{self, Plan};
use crate::{Error, Limits, Spec};

/// A decoded source, ready to be resized.
pub(crate) struct Decoded {
    /// The source's size as shown (after its EXIF orientation), before any shrinking while
    /// decoding: the size plans are made for.
    pub full: (u32, u32),
    /// The first frame, oriented, as RGB8 or (when transparency shows) RGBA8; possibly decoded
    /// at a reduced scale, never below what the requested thumbnails need.
    pub still: DynamicImage,
    /// For each requested spec that asked for animation, in order: the animation's frames made
    /// into that thumbnail, when the source is animated within limits.
    pub animations: Animations,
}

pub(crate) fn format_of(source: &[u8]) -> Result<ImageFormat, Error> {
    let format = image::guess_format(source).map_err(|_| Error::Unsupported("not a recognised image format".into()))?;
    match format {
        ImageFormat::Jpeg
        | ImageFormat::Png
        | ImageFormat::Gif
        | ImageFormat::WebP
        | ImageFormat::Bmp
        | ImageFormat::Tiff => Ok(format),
        other => Err(Error::Unsupported(format!("{other:?} images are not thumbnailed"))),
    }
}

pub(crate) fn may_animate(format: ImageFormat) -> bool {
    matches!(format, ImageFormat::Gif | ImageFormat::WebP | ImageFormat::Png)
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt(e.to_string())
}

fn image_error(e: image::ImageError) -> Error {
    match e {
        image::ImageError::Limits(l) => Error::TooLarge(l.to_string()),
        image::ImageError::Unsupported(u) => Error::Unsupported(u.to_string()),
        other => corrupt(other),
    }
}

fn check_canvas(width: u32, height: u32, limits: &Limits) -> Result<(), Error> {
    let pixels = u64::from(width) * u64::from(height);
    if width == 0 || height == 0 {
        return Err(Error::Corrupt("the image has no pixels".into()));
    }
    if pixels > limits.max_pixels {
        return Err(Error::TooLarge(format!(
            "{width}×{height} is {pixels} pixels, over the limit of {}",
            limits.max_pixels
        )));
    }
    Ok(())
}

/// What the decoders may allocate: the canvas as RGBA16 (the widest pixel the formats read
/// here produce), twice over for decoders that keep a second buffer, plus slack.
fn image_limits(limits: &Limits) -> image::Limits {
    let mut l = image::Limits::default();
    l.max_alloc = Some(limits.max_pixels.saturating_mul(16).saturating_add(64 << 20));
    l
}

/// The same, once the header named the canvas: no frame or buffer may be larger than it (a
/// GIF frame larger than its screen would otherwise pass every canvas check).
fn canvas_limits(width: u32, height: u32) -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(width);
    l.max_image_height = Some(height);
    l.max_alloc = Some((u64::from(width) * u64::from(height)).saturating_mul(16).saturating_add(16 << 20));
    l
}

/// Most scans a progressive JPEG may have. Real encoders write about 10; each scan is a pass
/// over the whole image, so thousands of tiny ones are a CPU bomb.
const MAX_JPEG_SCANS: usize = 100;

/// Counts the scans (SOS markers) of a JPEG by walking its segments, stopping once past
/// `MAX_JPEG_SCANS`. Only marker framing is read: every length is bounded by the input.
fn jpeg_scans(b: &[u8]) -> usize {
    let mut i = 2; // after SOI
    let mut scans = 0;
    while i + 4 <= b.len() && scans <= MAX_JPEG_SCANS {
        if b[i] != 0xff {
            return scans; // not a marker where one must be: the decoder will say why
        }
        let marker = b[i + 1];
        match marker {
            0xff => i += 1, // fill byte
            0xd8 | 0x01 | 0xd0..=0xd7 => i += 2,
            0xd9 => return scans, // EOI
            _ => {
                let len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
                i += 2 + len;
                if marker == 0xda {
                    scans += 1;
                    // Entropy-coded data up to the next marker that is not a stuffed zero or
                    // a restart marker.
                    loop {
                        match b.get(i..).and_then(|rest| rest.iter().position(|&x| x == 0xff)) {
                            Some(at) => i += at,
                            None => return scans,
                        }
                        match b.get(i + 1) {
                            Some(0) | Some(0xd0..=0xd7) => i += 2,
                            Some(_) => break,
                            None => return scans,
                        }
                    }
                }
            }
        }
    }
    scans
}

fn swaps_axes(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    )
}

pub(crate) fn decode(source: &[u8], specs: &[Spec], limits: &Limits) -> Result<Decoded, Error> {
    if source.len() as u64 > limits.max_source_bytes {
        return Err(Error::TooLarge(format!(
            "the file is {} bytes, over the limit of {}",
            source.len(),
            limits.max_source_bytes
        )));
    }
    let format = format_of(source)?;
    let (still, full) = match format {
        ImageFormat::Jpeg => match decode_jpeg(source, specs, limits)? {
            Some(decoded) => decoded,
            None => decode_still(source, format, limits)?,
        },
        _ => decode_still(source, format, limits)?,
    };
    let wants_animation = specs.iter().any(|s| s.animated) && may_animate(format);
    let mut animations: Animations = specs.iter().map(|_| None).collect();
    if wants_animation && let Some(made) = animate(source, format, specs, limits)? {
        for (slot, gif) in animations.iter_mut().zip(made) {
            *slot = gif;
        }
    }
    Ok(Decoded { full, still: opaque_if_possible(still), animations })
}

/// A first frame, oriented, and the source's full size as shown.
type Still = (DynamicImage, (u32, u32));

/// One animated thumbnail per spec that asked for one.
type Animations = Vec<Option<Vec<u8>>>;

/// Any image through `image`'s own decoders, oriented.
fn decode_still(source: &[u8], format: ImageFormat, limits: &Limits) -> Result<Still, Error> {
    let mut reader = ImageReader::with_format(Cursor::new(source), format);
    reader.limits(image_limits(limits));
    let mut decoder = reader.into_decoder().map_err(image_error)?;
    let (w, h) = decoder.dimensions();
    check_canvas(w, h, limits)?;
    decoder.set_limits(canvas_limits(w, h)).map_err(image_error)?;
    // Wide pixels (16-bit, float) cost several times a canvas of 8-bit RGBA.
    if decoder.total_bytes() > limits.max_pixels.saturating_mul(8) {
        return Err(Error::TooLarge(format!(
            "{w}×{h} at {:?} is {} bytes decoded",
            decoder.color_type(),
            decoder.total_bytes()
        )));
    }
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(image_error)?;
    image.apply_orientation(orientation);
    let full = (image.width(), image.height());
    Ok((image, full))
}

/// A JPEG through `jpeg-decoder`, shrunk while decoding (1/8, 1/4 or 1/2 by reduced DCT) as far
/// as the largest requested thumbnail allows. `None` for pixel formats it leaves to `image`.
fn jpeg_error(e: jpeg_decoder::Error) -> Error {
    match e {
        // The file ends early: a fact about the bytes.
        jpeg_decoder::Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => corrupt(e),
        // The decoder's own threads (or memory) failed: not a fact about the bytes.
        jpeg_decoder::Error::Io(e) => Error::Internal(e.to_string()),
        other => corrupt(other),
    }
}

fn decode_jpeg(source: &[u8], specs: &[Spec], limits: &Limits) -> Result<Option<Still>, Error> {
    if jpeg_scans(source) > MAX_JPEG_SCANS {
        return Err(Error::TooLarge(format!("a progressive JPEG of more than {MAX_JPEG_SCANS} scans")));
    }
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(source));
    decoder.set_max_decoding_buffer_size(usize::try_from(limits.max_pixels.saturating_mul(4)).unwrap_or(usize::MAX));
    decoder.read_info().map_err(jpeg_error)?;
    let info = decoder.info().ok_or_else(|| corrupt("no frame header"))?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    check_canvas(w, h, limits)?;
    if !matches!(info.pixel_format, jpeg_decoder::PixelFormat::L8 | jpeg_decoder::PixelFormat::RGB24) {
        return Ok(None);
    }
    let orientation = decoder.exif_data().and_then(Orientation::from_exif_chunk).unwrap_or(Orientation::NoTransforms);
    let full = if swaps_axes(orientation) { (h, w) } else { (w, h) };
    // The largest size any plan needs the whole image at, in the file's own axes.
    let (mut need_w, mut need_h) = (1, 1);
    for spec in specs {
        let (nw, nh) = size::plan(full, spec).decode_size(full);
        need_w = need_w.max(nw);
        need_h = need_h.max(nh);
    }
    if swaps_axes(orientation) {
        (need_w, need_h) = (need_h, need_w);
    }
    let denominator =
        [8u32, 4, 2, 1].into_iter().find(|d| w.div_ceil(*d) >= need_w && h.div_ceil(*d) >= need_h).unwrap_or(1);
    let (dw, dh) = decoder.scale(w.div_ceil(denominator) as u16, h.div_ceil(denominator) as u16).map_err(jpeg_error)?;
    let (dw, dh) = (u32::from(dw), u32::from(dh));
    if dw < need_w.min(w) || dh < need_h.min(h) {
        // The decoder shrank further than asked (it accepts a scale when either side is
        // large enough): decode at full size instead of enlarging.
        return Ok(None);
    }
    let pixels = decoder.decode().map_err(jpeg_error)?;
    let mut image = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => image::GrayImage::from_raw(dw, dh, pixels).map(DynamicImage::ImageLuma8),
        _ => image::RgbImage::from_raw(dw, dh, pixels).map(DynamicImage::ImageRgb8),
    }
    .ok_or_else(|| corrupt("the decoder returned fewer pixels than its size"))?;
    image.apply_orientation(orientation);
    Ok(Some((image, full)))
}

/// RGB8 unless some pixel is not fully opaque (then RGBA8).
fn opaque_if_possible(image: DynamicImage) -> DynamicImage {
    if !image.color().has_alpha() {
        return DynamicImage::ImageRgb8(image.into_rgb8());
    }
    let rgba = image.into_rgba8();
    if rgba.pixels().all(|p| p.0[3] == u8::MAX) {
        DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(rgba).into_rgb8())
    } else {
        DynamicImage::ImageRgba8(rgba)
    }
}

/// The animated thumbnails asked for, one slot per spec (`None` for specs that are still), or
/// `None` overall when the source has a single frame or is over the animation limits.
fn animate(source: &[u8], format: ImageFormat, specs: &[Spec], limits: &Limits) -> Result<Option<Animations>, Error> {
    // A GIF already at a thumbnail's size needs no re-encoding: the thumbnail is the file.
    let mut gif_canvas = None;
    let frames = match format {
        ImageFormat::Gif => {
            let mut d = image::codecs::gif::GifDecoder::new(Cursor::new(source)).map_err(image_error)?;
            let (w, h) = d.dimensions();
            d.set_limits(canvas_limits(w, h)).map_err(image_error)?;
            gif_canvas = Some((w, h));
            d.into_frames()
        }
        ImageFormat::WebP => {
            let mut d = image::codecs::webp::WebPDecoder::new(Cursor::new(source)).map_err(image_error)?;
            if !d.has_animation() {
                return Ok(None);
            }
            let (w, h) = d.dimensions();
            d.set_limits(canvas_limits(w, h)).map_err(image_error)?;
            d.into_frames()
        }
        ImageFormat::Png => {
            let d = image::codecs::png::PngDecoder::with_limits(Cursor::new(source), image_limits(limits))
                .map_err(image_error)?;
            let (w, h) = d.dimensions();
            check_canvas(w, h, limits)?;
            if !d.is_apng().map_err(image_error)? {
                return Ok(None);
            }
            d.apng().map_err(image_error)?.into_frames()
        }
        _ => return Ok(None),
    };
    let unchanged = |spec: &Spec| {
        source.len() <= MAX_ANIMATED_BYTES
            && gif_canvas.is_some_and(|canvas| {
                let plan = size::plan(canvas, spec);
                (plan.width, plan.height) == canvas
                    && plan.crop.is_none_or(|c| c.width >= f64::from(canvas.0) && c.height >= f64::from(canvas.1))
            })
    };
    let mut outputs: Vec<Option<Output>> = specs
        .iter()
        .map(|s| match (s.animated, unchanged(s)) {
            (false, _) => None,
            (true, true) => Some(Output::Source),
            (true, false) => Some(Output::Gif(Box::new(crate::encode::GifWriter::new(*s)))),
        })
        .collect();
    let (mut count, mut pixels) = (0u32, 0u64);
    for frame in frames {
        // An animation that breaks off (a truncated GIF is common) is thumbnailed still.
        let Ok(frame) = frame else { return Ok(None) };
        count += 1;
        let (w, h) = frame.buffer().dimensions();
        pixels = pixels.saturating_add(u64::from(w) * u64::from(h));
        if count > limits.max_frames || pixels > limits.max_animation_pixels {
            return Ok(None);
        }
        for out in outputs.iter_mut().flatten() {
            if let Output::Gif(writer) = out {
                writer.add(&frame)?;
                if writer.len() > MAX_ANIMATED_BYTES {
                    return Ok(None);
                }
            }
        }
    }
    if count < 2 {
        return Ok(None);
    }
    let mut animations = Vec::with_capacity(outputs.len());
    for output in outputs {
        animations.push(match output {
            Some(Output::Gif(writer)) => {
                let gif = (*writer).finish()?;
                if gif.len() > MAX_ANIMATED_BYTES {
                    return Ok(None);
                }
                Some(gif)
            }
            Some(Output::Source) => Some(source.to_vec()),
            None => None,
        });
    }
    Ok(Some(animations))
}

/// Largest animated thumbnail; a larger one is made still instead (frames are encoded whole,
/// so a source of tiny changes between frames can grow many times over).
const MAX_ANIMATED_BYTES: usize = 8 << 20;

/// What an animated thumbnail is made of.
enum Output {
    Gif(Box<crate::encode::GifWriter>),
    /// The source file itself (a GIF already at the thumbnail's size).
    Source,
}

/// The plan of `spec` for a decoded source.
pub(crate) fn plan_for(decoded: &Decoded, spec: &Spec) -> Plan {
    size::plan(decoded.full, spec)
}
