//! Times `generate` on a file, per spec, in process (no HTTP, no store): where thumbnail time
//! goes before the edge adds its own.
//!
//!     cargo run --release -p mxcas-thumbnail --example time -- FILE [REPS [WxH]]

use std::time::Instant;

use mxcas_thumbnail::{Limits, Method, Spec, generate};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: time FILE [REPS [WxH]]");
    let reps: usize = args.next().map_or(5, |r| r.parse().expect("REPS is a number"));
    // Optionally one size only: WxH, crop or scale.
    let only = args.next();
    let source = std::fs::read(&path).expect("readable file");
    let specs = [
        Spec { width: 32, height: 32, method: Method::Crop, animated: true },
        Spec { width: 96, height: 96, method: Method::Crop, animated: true },
        Spec { width: 320, height: 240, method: Method::Scale, animated: true },
        Spec { width: 640, height: 480, method: Method::Scale, animated: true },
        Spec { width: 800, height: 600, method: Method::Scale, animated: true },
    ];
    let mut total = 0.0;
    for spec in specs.iter().filter(|s| only.as_ref().is_none_or(|o| *o == format!("{}x{}", s.width, s.height))) {
        let mut times = Vec::new();
        let mut out = None;
        for _ in 0..reps {
            let start = Instant::now();
            out = Some(generate(&source, std::slice::from_ref(spec), &Limits::default()).expect("thumbnail"));
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        total += median;
        let t = &out.expect("made")[0];
        // To look at them: OUT=dir.
        if let Some(dir) = std::env::var_os("OUT") {
            let ext = t.content_type.trim_start_matches("image/");
            let path = std::path::Path::new(&dir).join(format!(
                "{}x{}-{}.{ext}",
                spec.width,
                spec.height,
                spec.method.as_str()
            ));
            std::fs::write(path, &t.bytes).expect("writable OUT");
        }
        println!(
            "{}x{} {}: {median:.1} ms median → {}x{} {} {} B",
            spec.width,
            spec.height,
            spec.method.as_str(),
            t.width,
            t.height,
            t.content_type,
            t.bytes.len()
        );
    }
    let start = Instant::now();
    generate(&source, &specs, &Limits::default()).expect("thumbnails");
    println!(
        "five sizes separately: {total:.1} ms; together from one decode: {:.1} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
}
