//! Thumbnails through the real binary: the spec's sizing rules over every input format, size,
//! method and animation; background pregeneration; one making per storm; bombs, corrupt and
//! opaque files answered with the spec's errors; lost thumbnails made again.
//!
//! Every answer is decoded here (with `image`) and its size checked against the spec's rules,
//! stated independently of mxcas's own sizing code.

use std::io::Cursor;
use std::time::Duration;

use image::{AnimationDecoder, DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use mxcas_tests::cluster::{Cluster, MetaOptions};
use mxcas_tests::node::ALICE;
use mxcas_tests::s3::SeaweedFs;
use mxcas_tests::{Node, NodeOptions, wait_for};

/// A picture with detail everywhere.
fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x ^ y) & 0xff) as u8]))
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encode test image");
    out.into_inner()
}

fn animated_gif(w: u32, h: u32, frames: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new_with_speed(&mut out, 30);
        enc.set_repeat(image::codecs::gif::Repeat::Infinite).expect("repeat");
        for i in 0..frames {
            let buf = RgbaImage::from_fn(w, h, |x, y| Rgba([((x + i * 20) % 256) as u8, (y % 256) as u8, 90, 255]));
            enc.encode_frame(image::Frame::from_parts(buf, 0, 0, image::Delay::from_numer_denom_ms(80, 1)))
                .expect("frame");
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
        enc.set_frame_delay(1, 10).expect("delay");
        let mut writer = enc.write_header().expect("header");
        for i in 0..frames {
            let data: Vec<u8> = (0..w * h).flat_map(|p| [(p % 256) as u8, (i * 60 % 256) as u8, 0, 255]).collect();
            writer.write_image_data(&data).expect("frame");
        }
        writer.finish().expect("finish");
    }
    out
}

/// A GIF whose header claims a 65535×65535 canvas, with hardly any data.
fn gif_bomb() -> Vec<u8> {
    let mut b = b"GIF89a".to_vec();
    b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x00, 0, 0]);
    b.extend_from_slice(&[0x2c, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x80]);
    b.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    b.extend_from_slice(&[0x02, 0x02, 0x4c, 0x01, 0x00, 0x3b]);
    b
}

async fn upload(node: &Node, bytes: Vec<u8>, content_type: &str) -> anyhow::Result<String> {
    let resp = node.upload(bytes, content_type, None).await?;
    anyhow::ensure!(resp.status() == 200, "upload answered {}", resp.status());
    let json: serde_json::Value = resp.json().await?;
    Ok(json["content_uri"].as_str().unwrap_or_default().trim_start_matches("mxc://localhost/").to_owned())
}

struct Answer {
    status: u16,
    content_type: String,
    disposition: String,
    body: Vec<u8>,
}

async fn thumbnail(node: &Node, id: &str, query: &str) -> anyhow::Result<Answer> {
    let url = node.url(&format!("/_matrix/client/v1/media/thumbnail/localhost/{id}?{query}"));
    let resp = node.http.get(url).bearer_auth(ALICE).send().await?;
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (content_type, disposition) = (header("content-type"), header("content-disposition"));
    let status = resp.status().as_u16();
    Ok(Answer { status, content_type, disposition, body: resp.bytes().await?.to_vec() })
}

/// Decodes a thumbnail: its size and frame count.
fn inspect(a: &Answer) -> ((u32, u32), usize) {
    let format = match a.content_type.as_str() {
        "image/jpeg" => ImageFormat::Jpeg,
        "image/png" => ImageFormat::Png,
        "image/gif" => ImageFormat::Gif,
        other => panic!("thumbnail of type {other}"),
    };
    let img = image::load_from_memory_with_format(&a.body, format).expect("the thumbnail decodes");
    let frames = if format == ImageFormat::Gif {
        image::codecs::gif::GifDecoder::new(Cursor::new(&a.body)).expect("gif").into_frames().count()
    } else {
        1
    };
    ((img.width(), img.height()), frames)
}

/// The spec's rules for a thumbnail of a `source`-sized image asked as `w`×`h` by `method`.
fn check_rules(source: (u32, u32), (w, h): (u32, u32), method: &str, out: (u32, u32), what: &str) {
    let (sw, sh) = source;
    let (ow, oh) = out;
    assert!(ow <= sw && oh <= sh, "{what}: {ow}x{oh} is larger than the {sw}x{sh} source (upscaled)");
    match method {
        "crop" => {
            // About the shape asked (sizes made on demand are rounded up a step per side).
            let skew = (f64::from(ow) / f64::from(oh)) / (f64::from(w) / f64::from(h));
            assert!((1.0 / 1.5..=1.5).contains(&skew), "{what}: {ow}x{oh} is far from {w}:{h}");
            if sw >= w && sh >= h {
                // At least as large as asked.
                assert!(ow >= w && oh >= h, "{what}: {ow}x{oh} smaller than asked {w}x{h}");
            } else {
                // Too small to fill it: cut at the source's own scale.
                assert!(ow == sw || oh == sh, "{what}: {ow}x{oh} of a {sw}x{sh} source");
            }
        }
        _ => {
            // Aspect kept; reaches the box on one side unless the source is smaller.
            let ratio = |a: u32, b: u32| f64::from(a) / f64::from(b);
            let tolerance = 1.5 / f64::from(ow.min(oh));
            assert!(
                (ratio(ow, oh) - ratio(sw, sh)).abs() <= ratio(sw, sh) * tolerance,
                "{what}: aspect of {ow}x{oh} vs {sw}x{sh}"
            );
            assert!(ow >= w.min(sw) || oh >= h.min(sh), "{what}: {ow}x{oh} smaller than asked {w}x{h}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_size_method_and_animation_follows_the_spec() -> anyhow::Result<()> {
    let node =
        Node::start(NodeOptions { extra: "[thumbnails]\npregenerate = false\n".into(), ..Default::default() }).await?;
    let alpha = RgbaImage::from_fn(600, 400, |x, y| Rgba([200, (y % 256) as u8, 30, if x < 300 { 0 } else { 255 }]));
    // (name, bytes, size, animated)
    type Source = (&'static str, Vec<u8>, (u32, u32), bool);
    let sources: Vec<Source> = vec![
        ("jpeg", encode(&DynamicImage::ImageRgb8(picture(1200, 900)), ImageFormat::Jpeg), (1200, 900), false),
        ("png-alpha", encode(&DynamicImage::ImageRgba8(alpha), ImageFormat::Png), (600, 400), false),
        ("gif-animated", animated_gif(200, 120, 6), (200, 120), true),
        ("apng", apng(160, 100, 4), (160, 100), true),
        ("webp", encode(&DynamicImage::ImageRgb8(picture(500, 500)), ImageFormat::WebP), (500, 500), false),
        ("bmp", encode(&DynamicImage::ImageRgb8(picture(300, 200)), ImageFormat::Bmp), (300, 200), false),
        ("tiff", encode(&DynamicImage::ImageRgb8(picture(400, 300)), ImageFormat::Tiff), (400, 300), false),
        ("tiny-png", encode(&DynamicImage::ImageRgb8(picture(40, 30)), ImageFormat::Png), (40, 30), false),
    ];
    let asks = [
        (32, 32, "crop"),
        (96, 96, "crop"),
        (320, 240, "scale"),
        (640, 480, "scale"),
        (800, 600, "scale"),
        (50, 70, "crop"),
        (1000, 800, "scale"),
    ];
    let mut checked = 0;
    for (name, bytes, dims, animates) in sources {
        // Declared as octet-stream: the bytes decide that it is an image.
        let id = upload(&node, bytes, "application/octet-stream").await?;
        for &(w, h, method) in &asks {
            for animated in [false, true] {
                let what = format!("{name} {w}x{h} {method} animated={animated}");
                let a =
                    thumbnail(&node, &id, &format!("width={w}&height={h}&method={method}&animated={animated}")).await?;
                assert_eq!(a.status, 200, "{what}: {}", String::from_utf8_lossy(&a.body));
                assert_eq!(a.disposition, "inline", "{what}");
                let (out, frames) = inspect(&a);
                check_rules(dims, (w, h), method, out, &what);
                if animated && animates {
                    assert_eq!(a.content_type, "image/gif", "{what}");
                    assert!(frames > 1, "{what}: asked animated, got {frames} frame");
                } else {
                    assert_eq!(frames, 1, "{what}: animated though not asked");
                }
                if name == "png-alpha" {
                    assert_eq!(a.content_type, "image/png", "{what}: transparency needs PNG");
                }
                if name == "jpeg" {
                    assert_eq!(a.content_type, "image/jpeg", "{what}: photos are JPEG");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 8 * 7 * 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_uploads_get_their_thumbnails_in_the_background_shared_by_every_mxc_of_the_bytes() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let made = "mxcas_edge_thumbnails_total{result=\"made\"}";
    // A text upload makes nothing.
    upload(&node, b"not a picture at all".to_vec(), "text/plain").await?;
    let jpeg = encode(&DynamicImage::ImageRgb8(picture(1600, 1200)), ImageFormat::Jpeg);
    let id = upload(&node, jpeg.clone(), "image/jpeg").await?;
    // One job makes the five sizes, after the upload answered.
    wait_for("background thumbnails", Duration::from_secs(60), || async {
        (node.metric(made).await.ok()? >= 1.0).then_some(())
    })
    .await?;
    for (w, h, method) in
        [(32, 32, "crop"), (96, 96, "crop"), (320, 240, "scale"), (640, 480, "scale"), (800, 600, "scale")]
    {
        let a = thumbnail(&node, &id, &format!("width={w}&height={h}&method={method}")).await?;
        assert_eq!(a.status, 200);
        check_rules((1600, 1200), (w, h), method, inspect(&a).0, &format!("{w}x{h}"));
    }
    // Nearest larger size: 40×30 scale is the 320×240 thumbnail.
    let a = thumbnail(&node, &id, "width=40&height=30&method=scale").await?;
    assert_eq!(inspect(&a).0, (320, 240));
    // The same bytes under a reserved media ID share the thumbnails (no new making).
    let create: serde_json::Value =
        node.http.post(node.url("/_matrix/media/v1/create")).bearer_auth(ALICE).send().await?.json().await?;
    let reserved = create["content_uri"].as_str().unwrap_or_default().trim_start_matches("mxc://localhost/").to_owned();
    let put = node
        .http
        .put(node.url(&format!("/_matrix/media/v3/upload/localhost/{reserved}")))
        .bearer_auth(ALICE)
        .header("content-type", "image/jpeg")
        .body(jpeg)
        .send()
        .await?;
    assert_eq!(put.status(), 200);
    let shared = thumbnail(&node, &reserved, "width=96&height=96&method=crop").await?;
    let first = thumbnail(&node, &id, "width=96&height=96&method=crop").await?;
    assert_eq!(shared.body, first.body);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(node.metric(made).await?, 1.0, "every size came from the one background job");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_requests_for_a_missing_thumbnail_makes_it_once() -> anyhow::Result<()> {
    let node =
        Node::start(NodeOptions { extra: "[thumbnails]\npregenerate = false\n".into(), ..Default::default() }).await?;
    let id =
        upload(&node, encode(&DynamicImage::ImageRgb8(picture(2000, 1500)), ImageFormat::Jpeg), "image/jpeg").await?;
    let requests = (0..24).map(|_| thumbnail(&node, &id, "width=500&height=500&method=crop"));
    let answers = futures::future::join_all(requests).await;
    let first = answers[0].as_ref().map_err(|e| anyhow::anyhow!("{e}"))?.body.clone();
    for a in &answers {
        let a = a.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.body, first, "every request got the same thumbnail");
    }
    // 500×500 is made on demand at the next step up.
    assert_eq!(inspect(answers[0].as_ref().map_err(|e| anyhow::anyhow!("{e}"))?).0, (512, 512));
    assert_eq!(node.metric("mxcas_edge_thumbnails_total{result=\"made\"}").await?, 1.0, "made once");
    Ok(())
}

/// Two edges of one metadata cluster: the storm is split between them, and the edge that
/// loses the claim waits for the other's thumbnail instead of making its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_across_edges_makes_a_thumbnail_once_cluster_wide() -> anyhow::Result<()> {
    let s3 = SeaweedFs::start().await?;
    let cluster = Cluster::start(1, MetaOptions::default()).await?;
    let edge = || {
        Node::start(NodeOptions {
            store: s3.store(),
            edge_meta: cluster.endpoints(),
            extra: "[thumbnails]\npregenerate = false\n".into(),
            ..Default::default()
        })
    };
    let (a, b) = (edge().await?, edge().await?);
    let id = upload(&a, encode(&DynamicImage::ImageRgb8(picture(3000, 2000)), ImageFormat::Jpeg), "image/jpeg").await?;
    let requests =
        (0..16).map(|i| thumbnail(if i % 2 == 0 { &a } else { &b }, &id, "width=320&height=240&method=scale"));
    let answers = futures::future::join_all(requests).await;
    let first = answers[0].as_ref().map_err(|e| anyhow::anyhow!("{e}"))?.body.clone();
    for a in &answers {
        let a = a.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.body, first, "every request on either edge got the same thumbnail");
    }
    assert_eq!(inspect(answers[0].as_ref().map_err(|e| anyhow::anyhow!("{e}"))?).0, (320, 213));
    let made = "mxcas_edge_thumbnails_total{result=\"made\"}";
    let (on_a, on_b) = (a.metric(made).await?, b.metric(made).await?);
    assert_eq!(on_a + on_b, 1.0, "made {on_a} times on one edge and {on_b} on the other");
    Ok(())
}

/// A claim that is never recorded (a claimant that died, or one that renews and never makes
/// it) holds the thumbnail back for one wait at most: then the edge makes it itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_never_recorded_delays_a_thumbnail_by_one_wait_at_most() -> anyhow::Result<()> {
    use mxcas_proto::meta as pb;
    let s3 = SeaweedFs::start().await?;
    let cluster = Cluster::start(1, MetaOptions::default()).await?;
    let node = Node::start(NodeOptions {
        store: s3.store(),
        edge_meta: cluster.endpoints(),
        extra: "[thumbnails]\npregenerate = false\nmax_wait = \"2s\"\n".into(),
        ..Default::default()
    })
    .await?;
    let bytes = encode(&DynamicImage::ImageRgb8(picture(600, 400)), ImageFormat::Jpeg);
    let id = upload(&node, bytes.clone(), "image/jpeg").await?;
    // Someone else claims the 96×96 crop, for as long as the leader allows, and never records it.
    let mut meta = pb::meta_client::MetaClient::new(cluster.metas[0].channel().await?);
    let claim = pb::ClaimThumbnailRequest {
        source: mxcas_cas::cid_of(&bytes).to_bytes(),
        spec: Some(pb::ThumbnailSpec { width: 96, height: 96, method: "crop".into(), animated: false }),
        claimant: "elsewhere".into(),
        lease_ms: 3_600_000,
        release: false,
    };
    assert!(meta.claim_thumbnail(claim.clone()).await?.into_inner().granted);
    let first = thumbnail(&node, &id, "width=96&height=96&method=crop").await?;
    assert!([200, 503].contains(&first.status), "{}", String::from_utf8_lossy(&first.body));
    // Still claimed elsewhere (renewed), yet the edge made it once the wait was over.
    assert!(meta.claim_thumbnail(claim).await?.into_inner().granted);
    let made = wait_for("the thumbnail", Duration::from_secs(20), || async {
        let a = thumbnail(&node, &id, "width=96&height=96&method=crop").await.ok()?;
        (a.status == 200).then_some(a)
    })
    .await?;
    assert_eq!(inspect(&made).0, (96, 96));
    assert_eq!(node.metric("mxcas_edge_thumbnails_total{result=\"made\"}").await?, 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_corrupt_and_opaque_files_get_the_spec_errors() -> anyhow::Result<()> {
    let node =
        Node::start(NodeOptions { extra: "[thumbnails]\npregenerate = false\n".into(), ..Default::default() }).await?;
    let ask = "width=96&height=96&method=crop";
    let errcode = |a: &Answer| -> String {
        serde_json::from_slice::<serde_json::Value>(&a.body)
            .ok()
            .and_then(|v| v["errcode"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    // A decompression bomb: 413 M_TOO_LARGE, decided from its header.
    let bomb = upload(&node, gif_bomb(), "image/gif").await?;
    let a = thumbnail(&node, &bomb, ask).await?;
    assert_eq!((a.status, errcode(&a).as_str()), (413, "M_TOO_LARGE"), "{}", String::from_utf8_lossy(&a.body));
    // A JPEG cut in its header: cannot be thumbnailed (400 M_UNKNOWN), and asking again costs
    // no second decode.
    let jpeg = encode(&DynamicImage::ImageRgb8(picture(300, 300)), ImageFormat::Jpeg);
    let cut = upload(&node, jpeg[..200].to_vec(), "image/jpeg").await?;
    for _ in 0..3 {
        let a = thumbnail(&node, &cut, ask).await?;
        assert_eq!((a.status, errcode(&a).as_str()), (400, "M_UNKNOWN"), "{}", String::from_utf8_lossy(&a.body));
    }
    assert_eq!(
        node.metric("mxcas_edge_thumbnails_total{result=\"refused\"}").await?,
        2.0,
        "bomb and cut file, once each"
    );
    // An encrypted attachment (random bytes, declared as an image): not an image.
    let random: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let opaque = upload(&node, random, "image/png").await?;
    let a = thumbnail(&node, &opaque, ask).await?;
    assert_eq!((a.status, errcode(&a).as_str()), (400, "M_UNKNOWN"));
    let text = upload(&node, b"hello".to_vec(), "text/plain").await?;
    assert_eq!(thumbnail(&node, &text, ask).await?.status, 400);
    // Malformed requests.
    for q in ["width=96", "width=0&height=5", "width=5&height=5&method=stretch", "width=x&height=5"] {
        assert_eq!(thumbnail(&node, &text, q).await?.status, 400, "{q}");
    }
    // Unknown media.
    assert_eq!(thumbnail(&node, "nosuchmedia", ask).await?.status, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_thumbnail_is_made_again() -> anyhow::Result<()> {
    let node =
        Node::start(NodeOptions { extra: "[thumbnails]\npregenerate = false\n".into(), ..Default::default() }).await?;
    let id =
        upload(&node, encode(&DynamicImage::ImageRgb8(picture(900, 600)), ImageFormat::Jpeg), "image/jpeg").await?;
    let before = node.local_blobs();
    let first = thumbnail(&node, &id, "width=96&height=96&method=crop").await?;
    assert_eq!(first.status, 200);
    // The thumbnail's own object: the one file that appeared, holding its bytes.
    let stored: Vec<_> = node.local_blobs().into_iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(std::fs::read(&stored[0])?, first.body);
    std::fs::remove_file(&stored[0])?;
    // A fresh edge process (nothing cached) finds it gone, reports it and makes it again.
    let mut node = node;
    node.restart().await?;
    let again = thumbnail(&node, &id, "width=96&height=96&method=crop").await?;
    assert_eq!(again.status, 200, "{}", String::from_utf8_lossy(&again.body));
    assert_eq!(again.body, first.body, "made again, the same bytes");
    assert_eq!(node.metric("mxcas_edge_data_loss_total").await?, 1.0);
    assert_eq!(node.metric("mxcas_edge_thumbnails_total{result=\"made\"}").await?, 1.0);
    let third = thumbnail(&node, &id, "width=96&height=96&method=crop").await?;
    assert_eq!(third.body, first.body);
    Ok(())
}
