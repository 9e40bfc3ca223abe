//! Resizing and encoding.

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, PngEncoder};
use image::{DynamicImage, Frame, ImageEncoder};

use crate::decode::{Decoded, plan_for};
use crate::size::{self, Plan};
use crate::{Error, Spec, Thumbnail};

/// JPEG quality of still thumbnails: photos at thumbnail sizes show no artefacts at 80.
const JPEG_QUALITY: u8 = 80;
/// NeuQuant speed of GIF frames (1 best, 30 fastest). Thumbnail frames are small and shown
/// small: the fastest sampling loses nothing visible and quarters the encoding time.
const GIF_SPEED: i32 = 30;

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

/// `image` (RGB8 or RGBA8, `scale` times the size of `full`) resized per `plan`.
fn resize(image: &DynamicImage, full: (u32, u32), plan: &Plan) -> Result<DynamicImage, Error> {
    let mut out = match image {
        DynamicImage::ImageRgba8(_) => DynamicImage::new_rgba8(plan.width, plan.height),
        _ => DynamicImage::new_rgb8(plan.width, plan.height),
    };
    let (fx, fy) = (f64::from(image.width()) / f64::from(full.0), f64::from(image.height()) / f64::from(full.1));
    let crop =
        plan.crop.unwrap_or(size::Rect { left: 0.0, top: 0.0, width: f64::from(full.0), height: f64::from(full.1) });
    // In the decoded image's pixels, kept inside it: scaling by a ratio of sizes can land a
    // rounding step past its edge.
    let (iw, ih) = (f64::from(image.width()), f64::from(image.height()));
    let (left, top) = ((crop.left * fx).clamp(0.0, iw), (crop.top * fy).clamp(0.0, ih));
    let (width, height) = ((crop.width * fx).min(iw - left), (crop.height * fy).min(ih - top));
    let options =
        ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)).crop(left, top, width, height);
    Resizer::new().resize(image, &mut out, &options).map_err(internal)?;
    Ok(out)
}

/// Thumbnail `index` of the specs `decoded` was decoded for.
pub(crate) fn thumbnail(decoded: &Decoded, index: usize, spec: &Spec) -> Result<Thumbnail, Error> {
    let plan = plan_for(decoded, spec);
    if let Some(Some(gif)) = decoded.animations.get(index) {
        return Ok(Thumbnail {
            bytes: gif.clone(),
            content_type: "image/gif",
            width: plan.width,
            height: plan.height,
            animated: true,
        });
    }
    let image = resize(&decoded.still, decoded.full, &plan)?;
    let mut bytes = Vec::new();
    let content_type = match &image {
        DynamicImage::ImageRgba8(rgba) => {
            PngEncoder::new_with_quality(&mut bytes, CompressionType::Fast, image::codecs::png::FilterType::Adaptive)
                .write_image(rgba.as_raw(), rgba.width(), rgba.height(), image::ExtendedColorType::Rgba8)
                .map_err(internal)?;
            "image/png"
        }
        other => {
            let rgb = other.to_rgb8();
            JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY).encode_image(&rgb).map_err(internal)?;
            "image/jpeg"
        }
    };
    Ok(Thumbnail { bytes, content_type, width: plan.width, height: plan.height, animated: false })
}

/// An animated GIF thumbnail, written frame by frame as the source's frames are decoded (so
/// only one source canvas is ever in memory).
pub(crate) struct GifWriter {
    spec: Spec,
    plan: Option<Plan>,
    encoder: GifEncoder<SharedBuf>,
    out: SharedBuf,
    resizer: Resizer,
}

/// Where a [`GifEncoder`] writes: it keeps its writer until dropped (when it writes the GIF
/// trailer) and has no way to hand it back, so the bytes are read through a second handle.
#[derive(Clone, Default)]
struct SharedBuf(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl GifWriter {
    pub(crate) fn new(spec: Spec) -> Self {
        let out = SharedBuf::default();
        let encoder = GifEncoder::new_with_speed(out.clone(), GIF_SPEED);
        Self { spec, plan: None, encoder, out, resizer: Resizer::new() }
    }

    pub(crate) fn add(&mut self, frame: &Frame) -> Result<(), Error> {
        let canvas = frame.buffer();
        let full = canvas.dimensions();
        let plan = match self.plan {
            Some(p) => p,
            None => {
                self.encoder.set_repeat(Repeat::Infinite).map_err(internal)?;
                *self.plan.insert(size::plan(full, &self.spec))
            }
        };
        let crop = plan.crop.unwrap_or(size::Rect {
            left: 0.0,
            top: 0.0,
            width: f64::from(full.0),
            height: f64::from(full.1),
        });
        let mut out = image::RgbaImage::new(plan.width, plan.height);
        let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)).crop(
            crop.left,
            crop.top,
            crop.width,
            crop.height,
        );
        self.resizer.resize(canvas, &mut out, &options).map_err(internal)?;
        self.encoder.encode_frame(Frame::from_parts(out, 0, 0, frame.delay())).map_err(internal)
    }

    /// Bytes written so far.
    pub(crate) fn len(&self) -> usize {
        self.out.0.borrow().len()
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        let Self { encoder, out, .. } = self;
        drop(encoder);
        out.0.take()
    }
}
