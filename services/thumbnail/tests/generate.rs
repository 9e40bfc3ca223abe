//! Thumbnails of every supported format at the spec's sizes, animations, orientation, and
//! hostile inputs (bombs, corrupt and opaque files), each checked by decoding the output.

use std::io::Cursor;

use image::{AnimationDecoder, DynamicImage, ImageEncoder, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use mxcas_thumbnail::size::{plan, spec_sizes};
use mxcas_thumbnail::{Error, Limits, Method, Spec, Thumbnail, generate};

/// A deterministic picture with detail everywhere (so a wrong crop or a shrink shows).
fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, ((x ^ y).wrapping_mul(31) & 0xff) as u8])
    })
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encode test image");
    out.into_inner()
}

fn decode(t: &Thumbnail) -> DynamicImage {
    let format = match t.content_type {
        "image/jpeg" => ImageFormat::Jpeg,
        "image/png" => ImageFormat::Png,
        "image/gif" => ImageFormat::Gif,
        other => panic!("unexpected thumbnail type {other}"),
    };
    image::load_from_memory_with_format(&t.bytes, format).expect("the thumbnail decodes")
}

fn gif_frames(bytes: &[u8]) -> usize {
    let d = image::codecs::gif::GifDecoder::new(Cursor::new(bytes)).expect("gif");
    d.into_frames().count()
}

fn animated_gif(w: u32, h: u32, frames: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new_with_speed(&mut out, 30);
        enc.set_repeat(image::codecs::gif::Repeat::Infinite).expect("repeat");
        for i in 0..frames {
            let buf = RgbaImage::from_fn(w, h, |x, y| {
                Rgba([((x + i * 10) % 256) as u8, (y % 256) as u8, (i * 40 % 256) as u8, 255])
            });
            let delay = image::Delay::from_numer_denom_ms(50, 1);
            enc.encode_frame(image::Frame::from_parts(buf, 0, 0, delay)).expect("frame");
        }
    }
    out
}

fn apng(w: u32, h: u32, frames: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_animated(frames, 0).expect("animated");
        enc.set_frame_delay(1, 20).expect("delay");
        let mut writer = enc.write_header().expect("header");
        for i in 0..frames {
            let data: Vec<u8> = (0..w * h).flat_map(|p| [(p % 256) as u8, (i * 60 % 256) as u8, 0, 255]).collect();
            writer.write_image_data(&data).expect("frame");
        }
        writer.finish().expect("finish");
    }
    out
}

/// A JPEG carrying an EXIF orientation tag.
fn jpeg_with_orientation(image: &RgbImage, orientation: u16) -> Vec<u8> {
    // A minimal big-endian TIFF structure with one IFD entry: Orientation (0x0112), SHORT.
    let mut exif = b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
    exif.extend_from_slice(&orientation.to_be_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut out = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
    enc.set_exif_metadata(exif).expect("exif");
    enc.write_image(image.as_raw(), image.width(), image.height(), image::ExtendedColorType::Rgb8).expect("jpeg");
    out
}

fn limits() -> Limits {
    Limits::default()
}

#[test]
fn every_format_at_every_spec_size_follows_the_sizing_rules() {
    let still = DynamicImage::ImageRgb8(picture(1200, 900));
    let sources = [
        ("jpeg", encode(&still, ImageFormat::Jpeg)),
        ("png", encode(&still, ImageFormat::Png)),
        ("gif", encode(&still, ImageFormat::Gif)),
        ("webp", encode(&still, ImageFormat::WebP)),
        ("bmp", encode(&still, ImageFormat::Bmp)),
        ("tiff", encode(&still, ImageFormat::Tiff)),
    ];
    let specs = spec_sizes();
    for (name, bytes) in &sources {
        assert!(mxcas_thumbnail::is_supported(bytes), "{name}");
        let thumbs = generate(bytes, &specs, &limits()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(thumbs.len(), specs.len());
        for (spec, t) in specs.iter().zip(&thumbs) {
            let want = plan((1200, 900), spec);
            let img = decode(t);
            assert_eq!((img.width(), img.height()), (want.width, want.height), "{name} {spec:?}");
            assert_eq!((t.width, t.height), (want.width, want.height));
            // Opaque sources make JPEGs: photo-sized, not lossless PNGs.
            assert_eq!(t.content_type, "image/jpeg", "{name} {spec:?}");
            assert!(!t.animated);
            // The picture survives: the centre of a scaled thumbnail has the source's colour
            // gradient (red grows left to right, green top to bottom).
            let rgb = img.to_rgb8();
            let (w, h) = (rgb.width(), rgb.height());
            let (left, right) = (rgb.get_pixel(w / 8, h / 2)[0], rgb.get_pixel(w - 1 - w / 8, h / 2)[0]);
            let (top, bottom) = (rgb.get_pixel(w / 2, h / 8)[1], rgb.get_pixel(w / 2, h - 1 - h / 8)[1]);
            assert!(right > left + 60 && bottom > top + 60, "{name} {spec:?}: {left} {right} {top} {bottom}");
        }
    }
}

#[test]
fn small_sources_are_never_enlarged() {
    let bytes = encode(&DynamicImage::ImageRgb8(picture(60, 40)), ImageFormat::Png);
    let specs = spec_sizes();
    let thumbs = generate(&bytes, &specs, &limits()).expect("thumbnails");
    let dims: Vec<_> = thumbs.iter().map(|t| (decode(t).width(), decode(t).height())).collect();
    assert_eq!(dims, vec![(32, 32), (40, 40), (60, 40), (60, 40), (60, 40)]);
}

#[test]
fn transparency_is_kept_as_png() {
    let img = RgbaImage::from_fn(200, 200, |x, _| Rgba([255, 0, 0, if x < 100 { 0 } else { 255 }]));
    let bytes = encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png);
    let spec = Spec { width: 96, height: 96, method: Method::Crop, animated: false };
    let t = &generate(&bytes, &[spec], &limits()).expect("thumbnail")[0];
    assert_eq!(t.content_type, "image/png");
    let out = decode(t).to_rgba8();
    assert_eq!(out.get_pixel(5, 48)[3], 0);
    assert_eq!(out.get_pixel(90, 48)[3], 255);
    // An RGBA file whose pixels are all opaque is a photo: JPEG.
    let opaque =
        encode(&DynamicImage::ImageRgba8(RgbaImage::from_pixel(50, 50, Rgba([1, 2, 3, 255]))), ImageFormat::Png);
    assert_eq!(generate(&opaque, &[spec], &limits()).expect("thumbnail")[0].content_type, "image/jpeg");
}

#[test]
fn exif_orientation_is_applied() {
    // 400×200 stored, orientation 6 (rotate 90° clockwise): shown 200×400.
    let stored = RgbImage::from_fn(400, 200, |x, _| if x < 200 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
    let bytes = jpeg_with_orientation(&stored, 6);
    let spec = Spec { width: 100, height: 200, method: Method::Scale, animated: false };
    let t = &generate(&bytes, &[spec], &limits()).expect("thumbnail")[0];
    let img = decode(t).to_rgb8();
    assert_eq!((img.width(), img.height()), (100, 200));
    // The stored left half (red) ends up on top.
    let (top, bottom) = (img.get_pixel(50, 20), img.get_pixel(50, 180));
    assert!(top[0] > 200 && top[2] < 60, "top {top:?}");
    assert!(bottom[2] > 200 && bottom[0] < 60, "bottom {bottom:?}");
}

#[test]
fn large_jpegs_decode_at_a_reduced_scale_without_losing_size() {
    // 4000×3000: the 800×600 plan lets the decoder shrink by 4 while decoding; every
    // thumbnail still comes out at exactly its size.
    let bytes = encode(&DynamicImage::ImageRgb8(picture(4000, 3000)), ImageFormat::Jpeg);
    let specs = spec_sizes();
    let thumbs = generate(&bytes, &specs, &limits()).expect("thumbnails");
    for (spec, t) in specs.iter().zip(&thumbs) {
        let want = plan((4000, 3000), spec);
        assert_eq!((decode(t).width(), decode(t).height()), (want.width, want.height));
    }
}

#[test]
fn animations_stay_animated_only_when_asked() {
    let gif = animated_gif(200, 100, 6);
    let animated = Spec { width: 96, height: 96, method: Method::Crop, animated: true };
    let still = Spec { animated: false, ..animated };
    let out = generate(&gif, &[animated, still], &limits()).expect("thumbnails");
    assert!(out[0].animated);
    assert_eq!(out[0].content_type, "image/gif");
    assert_eq!(gif_frames(&out[0].bytes), 6);
    let first = decode(&out[0]);
    assert_eq!((first.width(), first.height()), (96, 96));
    assert!(!out[1].animated);
    assert_ne!(out[1].content_type, "image/gif");

    let png = apng(120, 80, 4);
    let t = &generate(&png, &[animated], &limits()).expect("apng thumbnail")[0];
    assert!(t.animated);
    assert_eq!(gif_frames(&t.bytes), 4);

    // A still source asked for animation is simply still.
    let jpeg = encode(&DynamicImage::ImageRgb8(picture(300, 300)), ImageFormat::Jpeg);
    let t = &generate(&jpeg, &[animated], &limits()).expect("thumbnail")[0];
    assert!(!t.animated);
    assert_eq!(t.content_type, "image/jpeg");
}

#[test]
fn animations_over_the_limits_get_a_still_thumbnail() {
    let gif = animated_gif(100, 100, 8);
    let spec = Spec { width: 32, height: 32, method: Method::Crop, animated: true };
    let few_frames = Limits { max_frames: 5, ..limits() };
    let t = &generate(&gif, &[spec], &few_frames).expect("thumbnail")[0];
    assert!(!t.animated);
    let few_pixels = Limits { max_animation_pixels: 50_000, ..limits() };
    assert!(!generate(&gif, &[spec], &few_pixels).expect("thumbnail")[0].animated);
    assert!(generate(&gif, &[spec], &limits()).expect("thumbnail")[0].animated);
}

/// A GIF whose header claims a 65535×65535 canvas and frame, with hardly any data.
fn gif_bomb() -> Vec<u8> {
    let mut b = b"GIF89a".to_vec();
    b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x00, 0, 0]); // screen, no global palette
    b.extend_from_slice(&[0x2c, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x80]); // image, local palette
    b.extend_from_slice(&[0, 0, 0, 255, 255, 255]); // 2 colours
    b.extend_from_slice(&[0x02, 0x02, 0x4c, 0x01, 0x00, 0x3b]);
    b
}

/// A real JPEG whose frame header is patched to claim `w`×`h`.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut b = encode(&DynamicImage::ImageRgb8(picture(16, 16)), ImageFormat::Jpeg);
    let sof = b.windows(2).position(|m| m == [0xff, 0xc0]).expect("SOF0");
    b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    b
}

#[test]
fn decompression_bombs_are_refused_before_decoding() {
    let spec = Spec { width: 96, height: 96, method: Method::Crop, animated: true };
    for (name, bomb) in [("gif", gif_bomb()), ("jpeg", jpeg_claiming(60_000, 60_000))] {
        match generate(&bomb, &[spec], &limits()) {
            Err(Error::TooLarge(why)) => assert!(why.contains("pixels"), "{name}: {why}"),
            other => panic!("{name}: expected TooLarge, got {other:?}"),
        }
    }
    // Within the pixel limit but over the file-size limit.
    let big = encode(&DynamicImage::ImageRgb8(picture(300, 300)), ImageFormat::Bmp);
    let small_files = Limits { max_source_bytes: 1000, ..limits() };
    assert!(matches!(generate(&big, &[spec], &small_files), Err(Error::TooLarge(_))));
    // A limit an operator lowers applies as well.
    let jpeg = encode(&DynamicImage::ImageRgb8(picture(300, 300)), ImageFormat::Jpeg);
    let few = Limits { max_pixels: 300 * 299, ..limits() };
    assert!(matches!(generate(&jpeg, &[spec], &few), Err(Error::TooLarge(_))));
}

#[test]
fn corrupt_and_opaque_files_are_refused_with_a_reason() {
    let spec = Spec { width: 32, height: 32, method: Method::Crop, animated: false };
    // Encrypted attachments are random bytes: not an image.
    let random: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    assert!(!mxcas_thumbnail::is_supported(&random));
    assert!(matches!(generate(&random, &[spec], &limits()), Err(Error::Unsupported(_))));
    assert!(matches!(generate(b"%PDF-1.7\n...", &[spec], &limits()), Err(Error::Unsupported(_))));
    assert!(matches!(generate(b"", &[spec], &limits()), Err(Error::Unsupported(_))));
    // Truncated files of every format: an error, never a panic.
    let still = DynamicImage::ImageRgb8(picture(300, 200));
    for format in
        [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Gif, ImageFormat::WebP, ImageFormat::Bmp, ImageFormat::Tiff]
    {
        let bytes = encode(&still, format);
        for cut in [bytes.len() / 2, 40.min(bytes.len() - 1), 12] {
            match generate(&bytes[..cut], &[spec], &limits()) {
                Err(Error::Corrupt(_) | Error::Unsupported(_)) => {}
                // Some decoders fill a cut-off tail; what they return must still be right.
                Ok(t) => assert_eq!((decode(&t[0]).width(), decode(&t[0]).height()), (32, 32)),
                Err(e) => panic!("{format:?} cut at {cut}: {e:?}"),
            }
        }
    }
}

#[test]
fn a_gif_already_at_the_thumbnail_size_is_its_own_thumbnail() {
    let gif = animated_gif(120, 80, 5);
    let fits = Spec { width: 320, height: 240, method: Method::Scale, animated: true };
    let t = &generate(&gif, &[fits], &limits()).expect("thumbnail")[0];
    assert!(t.animated);
    assert_eq!(t.bytes, gif, "no re-encoding");
    // Smaller boxes are resized frame by frame.
    let smaller = Spec { width: 60, height: 40, method: Method::Scale, animated: true };
    let t = &generate(&gif, &[smaller], &limits()).expect("thumbnail")[0];
    assert_ne!(t.bytes, gif);
    assert_eq!(gif_frames(&t.bytes), 5);
    assert_eq!((decode(t).width(), decode(t).height()), (60, 40));
}

#[test]
fn sizes_that_do_not_divide_evenly_are_made_exactly() {
    // Shrinking while decoding (by 2, 4 or 8) gives fractional scale factors for these.
    for (w, h) in [(1125, 2436), (1023, 767), (4001, 2999), (333, 4001), (4000, 4)] {
        let bytes = encode(&DynamicImage::ImageRgb8(picture(w, h)), ImageFormat::Jpeg);
        // Each size alone (as on demand: the deepest shrink) and all together (as in the
        // background: the shrink the largest allows).
        let specs = spec_sizes();
        let alone = specs.iter().map(|spec| generate(&bytes, &[*spec], &limits()).map(|mut t| t.remove(0)));
        let together = generate(&bytes, &specs, &limits()).map(|t| t.into_iter().map(Ok).collect::<Vec<_>>());
        let together = together.unwrap_or_else(|e| panic!("{w}x{h}: {e}"));
        for (spec, t) in specs.iter().cycle().zip(alone.chain(together)) {
            let t = t.unwrap_or_else(|e| panic!("{w}x{h} {spec:?}: {e}"));
            let want = plan((w, h), spec);
            assert_eq!((decode(&t).width(), decode(&t).height()), (want.width, want.height), "{w}x{h} {spec:?}");
        }
    }
}

/// A GIF with a 1×1 screen and one 12000×12000 frame.
fn gif_with_a_frame_larger_than_its_screen() -> Vec<u8> {
    let mut b = b"GIF89a".to_vec();
    b.extend_from_slice(&[1, 0, 1, 0, 0x00, 0, 0]);
    let side = 12_000u16.to_le_bytes();
    b.extend_from_slice(&[0x2c, 0, 0, 0, 0]);
    b.extend_from_slice(&[side[0], side[1], side[0], side[1], 0x80]);
    b.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    b.extend_from_slice(&[0x02, 0x02, 0x4c, 0x01, 0x00, 0x3b]);
    b
}

#[test]
fn a_gif_frame_larger_than_its_screen_is_refused() {
    let bomb = gif_with_a_frame_larger_than_its_screen();
    for animated in [false, true] {
        let spec = Spec { width: 32, height: 32, method: Method::Crop, animated };
        match generate(&bomb, &[spec], &limits()) {
            Err(Error::TooLarge(_) | Error::Corrupt(_)) => {}
            other => panic!("animated={animated}: {other:?}"),
        }
    }
}

/// A progressive-looking JPEG: a real one with its scan repeated `n` times before EOI.
fn jpeg_with_scans(n: usize) -> Vec<u8> {
    let b = encode(&DynamicImage::ImageRgb8(picture(64, 64)), ImageFormat::Jpeg);
    let sos = b.windows(2).position(|m| m == [0xff, 0xda]).expect("SOS");
    let eoi = b.len() - 2;
    let mut out = b[..sos].to_vec();
    for _ in 0..n {
        out.extend_from_slice(&b[sos..eoi]);
    }
    out.extend_from_slice(&[0xff, 0xd9]);
    out
}

#[test]
fn jpegs_of_too_many_scans_are_refused_before_decoding() {
    let spec = Spec { width: 32, height: 32, method: Method::Crop, animated: false };
    assert!(matches!(generate(&jpeg_with_scans(500), &[spec], &limits()), Err(Error::TooLarge(_))));
    // A handful is an ordinary file.
    assert!(generate(&jpeg_with_scans(1), &[spec], &limits()).is_ok());
}

#[test]
fn a_truncated_animation_still_gets_a_still_thumbnail() {
    let gif = animated_gif(100, 80, 6);
    let cut = &gif[..gif.len() * 2 / 3];
    let animated = Spec { width: 32, height: 32, method: Method::Crop, animated: true };
    let t = &generate(cut, &[animated], &limits()).expect("a still thumbnail")[0];
    assert!(!t.animated);
}
