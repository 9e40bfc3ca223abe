//! Resizing and encoding.

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, PngEncoder};
use image::{DynamicImage, Frame, ImageEncoder};

use crate::decode::{Decoded, plan_for};
use crate::size::{self, Plan};
use crate::{Error, Spec, Thumbnail};

/// JPEG quality of still thumbnails: photos at thumbnail sizes show no artefacts at 80.
const JPEG_QUALITY: u8 = 80;

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

/// Lanczos3 resizing of `part` of the source.
fn lanczos(part: size::Rect) -> ResizeOptions {
    ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)).crop(
        part.left,
        part.top,
        part.width,
        part.height,
    )
}

/// `image` (RGB8 or RGBA8, `scale` times the size of `full`) resized per `plan`.
fn resize(image: &DynamicImage, full: (u32, u32), plan: &Plan) -> Result<DynamicImage, Error> {
    let mut out = match image {
        DynamicImage::ImageRgba8(_) => DynamicImage::new_rgba8(plan.width, plan.height),
        _ => DynamicImage::new_rgb8(plan.width, plan.height),
    };
    let (fx, fy) = (f64::from(image.width()) / f64::from(full.0), f64::from(image.height()) / f64::from(full.1));
    let crop = plan.shown(full);
    // In the decoded image's pixels, kept inside it: scaling by a ratio of sizes can land a
    // rounding step past its edge.
    let (iw, ih) = (f64::from(image.width()), f64::from(image.height()));
    let (left, top) = ((crop.left * fx).clamp(0.0, iw), (crop.top * fy).clamp(0.0, ih));
    let (width, height) = ((crop.width * fx).min(iw - left), (crop.height * fy).min(ih - top));
    let options = lanczos(size::Rect { left, top, width, height });
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

/// NeuQuant sampling of the shared palette (1 best, 30 fastest). The palette is learnt once
/// per animation, so the better sampling costs little.
const PALETTE_SAMPLING: i32 = 30;
/// Colours of the shared palette; the 256th index is transparency.
const PALETTE_COLOURS: usize = 255;
const TRANSPARENT: u8 = 255;
/// Pixels of the first frames the palette is learnt from (the frames are held until then).
const PALETTE_SAMPLE_PIXELS: usize = 1 << 18;
/// Bits per channel of the colour → palette index table.
const LOOKUP_BITS: u32 = 5;
const UNMAPPED: u16 = u16::MAX;

/// An animated GIF thumbnail, written frame by frame as the source's frames are decoded (so
/// only one source canvas is ever in memory).
///
/// All frames share one palette, learnt from the first frames' pixels, and pixels are mapped
/// to it through a table filled as colours appear: the per-frame quantizer this replaced spent
/// most of its time building a palette for each frame and searching it for each pixel.
pub(crate) struct GifWriter {
    spec: Spec,
    plan: Option<Plan>,
    resizer: Resizer,
    /// Resized frames (and their delay in centiseconds) held until the palette is learnt.
    held: Vec<(image::RgbaImage, u16)>,
    held_pixels: usize,
    palette: Option<Palette>,
    encoder: Option<gif::Encoder<Vec<u8>>>,
}

struct Palette {
    quant: color_quant::NeuQuant,
    /// Palette index by colour reduced to `LOOKUP_BITS` per channel, [`UNMAPPED`] until seen.
    lookup: Vec<u16>,
}

impl Palette {
    fn learn(frames: &[(image::RgbaImage, u16)]) -> Self {
        let mut sample = Vec::new();
        for (frame, _) in frames {
            for p in frame.pixels().filter(|p| p[3] >= 128) {
                sample.extend_from_slice(&[p[0], p[1], p[2], 255]);
            }
        }
        let quant = color_quant::NeuQuant::new(PALETTE_SAMPLING, PALETTE_COLOURS, &sample);
        Self { quant, lookup: vec![UNMAPPED; 1 << (3 * LOOKUP_BITS)] }
    }

    /// The palette as the GIF's global colour table (RGB, the transparent entry black).
    fn colour_table(&self) -> Vec<u8> {
        let mut table: Vec<u8> = self.quant.color_map_rgb();
        table.resize(256 * 3, 0);
        table
    }

    fn index(&mut self, [r, g, b, a]: [u8; 4]) -> u8 {
        if a < 128 {
            return TRANSPARENT;
        }
        let shift = 8 - LOOKUP_BITS;
        let key = (usize::from(r >> shift) << (2 * LOOKUP_BITS))
            | (usize::from(g >> shift) << LOOKUP_BITS)
            | usize::from(b >> shift);
        let slot = &mut self.lookup[key];
        if *slot == UNMAPPED {
            // The centre of the colour's cell, so the table does not depend on which colour
            // of the cell came first.
            let centre = |c: u8| (c >> shift << shift) | (1 << (shift - 1));
            *slot = self.quant.index_of(&[centre(r), centre(g), centre(b), 255]) as u16;
        }
        *slot as u8
    }
}

impl GifWriter {
    pub(crate) fn new(spec: Spec) -> Self {
        Self {
            spec,
            plan: None,
            resizer: Resizer::new(),
            held: Vec::new(),
            held_pixels: 0,
            palette: None,
            encoder: None,
        }
    }

    pub(crate) fn add(&mut self, frame: &Frame) -> Result<(), Error> {
        let canvas = frame.buffer();
        let full = canvas.dimensions();
        let plan = *self.plan.get_or_insert_with(|| size::plan(full, &self.spec));
        let mut out = image::RgbaImage::new(plan.width, plan.height);
        self.resizer.resize(canvas, &mut out, &lanczos(plan.shown(full))).map_err(internal)?;
        let (numer, denom) = frame.delay().numer_denom_ms();
        let centiseconds =
            u16::try_from((u64::from(numer) + 5 * u64::from(denom.max(1))) / (10 * u64::from(denom.max(1))))
                .unwrap_or(u16::MAX);
        if self.palette.is_none() {
            self.held_pixels += out.as_raw().len() / 4;
            self.held.push((out, centiseconds));
            if self.held_pixels >= PALETTE_SAMPLE_PIXELS {
                self.start()?;
            }
            return Ok(());
        }
        self.write(&out, centiseconds)
    }

    /// Learns the palette from the held frames, starts the file and writes them.
    fn start(&mut self) -> Result<(), Error> {
        let palette = Palette::learn(&self.held);
        let (width, height) = self.plan.map_or((1, 1), |p| (p.width, p.height));
        let too_large = |_| Error::Internal(format!("{width}×{height} is too large for a GIF"));
        let mut encoder = gif::Encoder::new(
            Vec::new(),
            u16::try_from(width).map_err(too_large)?,
            u16::try_from(height).map_err(too_large)?,
            &palette.colour_table(),
        )
        .map_err(internal)?;
        encoder.set_repeat(gif::Repeat::Infinite).map_err(internal)?;
        self.encoder = Some(encoder);
        self.palette = Some(palette);
        for (frame, delay) in std::mem::take(&mut self.held) {
            self.write(&frame, delay)?;
        }
        self.held_pixels = 0;
        Ok(())
    }

    fn write(&mut self, frame: &image::RgbaImage, delay: u16) -> Result<(), Error> {
        let (Some(palette), Some(encoder)) = (self.palette.as_mut(), self.encoder.as_mut()) else {
            return Err(Error::Internal("GIF frame written before its palette".into()));
        };
        let indices: Vec<u8> = frame.pixels().map(|p| palette.index(p.0)).collect();
        let transparent = indices.contains(&TRANSPARENT).then_some(TRANSPARENT);
        let (width, height) = frame.dimensions();
        let out = gif::Frame {
            delay,
            // Frames are whole composited canvases: what is transparent in one must not show
            // the one before.
            dispose: gif::DisposalMethod::Background,
            transparent,
            width: width as u16,
            height: height as u16,
            buffer: indices.into(),
            ..gif::Frame::default()
        };
        encoder.write_frame(&out).map_err(internal)
    }

    /// Bytes written so far (frames held for the palette not counted).
    pub(crate) fn len(&self) -> usize {
        self.encoder.as_ref().map_or(0, |e| e.get_ref().len())
    }

    pub(crate) fn finish(mut self) -> Result<Vec<u8>, Error> {
        if self.palette.is_none() {
            self.start()?;
        }
        match self.encoder.take() {
            Some(encoder) => encoder.into_inner().map_err(internal),
            None => Err(Error::Internal("no GIF frames".into())),
        }
    }
}
