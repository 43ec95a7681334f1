//! The VQGAN against the original's outputs for the same weights pickle (fixtures/lwm-jax/vqgan).

mod common;
use candle_core::Tensor;
use common::fixture;
use lwm::vqgan::preprocess::{load_image, process_frame};
use lwm::vqgan::Vqgan;
use std::path::PathBuf;

fn vq(rel: &str) -> PathBuf {
    fixture(&format!("lwm-jax/vqgan/{rel}"))
}

fn npy(rel: &str) -> Vec<f32> {
    Tensor::read_npy(vq(rel))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn preprocessing_latents_codes_and_decoding_match_the_original() {
    let img = load_image(&vq("vq_input.png")).unwrap();
    let x = process_frame(&img, 64);
    assert_eq!(x, npy("vq_input_preprocessed.npy"), "preprocessing");
    let model = Vqgan::open(&vq("vqgan_params.pkl")).unwrap();
    assert_eq!(model.factor, 16);
    let z = model.encode_latents(&x, 1, 64, 64).unwrap();
    let z_ref = npy("vq_prequant_z.npy");
    let d = max_diff(&z.data, &z_ref);
    assert!(d < 1e-4, "pre-quant latents: max |diff| {d}");
    let codes = model.quantize(&z).unwrap();
    let want: Vec<u32> = Tensor::read_npy(vq("vq_codes.npy"))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(codes, want, "codes");
    let decoded = model.decode(&codes, 1, 4, 4).unwrap();
    let d = max_diff(&decoded, &npy("vq_decoded.npy"));
    assert!(d < 1e-4, "decoded: max |diff| {d}");
    // Two frames at once (the original encodes videos frame by frame): same codes per frame.
    let two: Vec<f32> = x.iter().chain(&x).copied().collect();
    let c2 = model.encode(&two, 2, 64, 64).unwrap();
    assert_eq!(&c2[..16], &want[..]);
    assert_eq!(&c2[16..], &want[..]);
}

/// Non-square input: shorter side to 32 (PIL bicubic), centre crop. PIL resamples in 8-bit
/// fixed point with its own kernel normalisation and the image crate in f32, so some pixels
/// differ: measured 219 of 3072 values, by at most two levels (2/127.5). More than that would
/// mean a wrong size, crop box or filter.
#[test]
fn non_square_preprocessing_matches_pil_within_two_levels() {
    let img = load_image(&vq("preproc_nonsquare_input.png")).unwrap();
    let x = process_frame(&img, 32);
    let want = npy("preproc_nonsquare_output.npy");
    let d = max_diff(&x, &want);
    let off = x
        .iter()
        .zip(&want)
        .filter(|(a, b)| (*a - *b).abs() > 1e-6)
        .count();
    eprintln!(
        "non-square preprocessing: max |diff| {d}, {off} of {} values differ",
        x.len()
    );
    assert!(d <= 2.0 / 127.5 + 1e-6, "max |diff| {d}");
    assert!(off < x.len() / 10, "{off} values differ");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("lwm-vq-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("x.png");
    std::fs::write(&p, b"GIF89a not a png").unwrap();
    let e = format!("{:#}", load_image(&p).unwrap_err());
    assert!(e.contains("not a PNG or JPEG"), "{e}");
    let mut png = std::fs::read(vq("vq_input.png")).unwrap();
    png.truncate(png.len() / 2);
    std::fs::write(&p, &png).unwrap();
    let e = format!("{:#}", load_image(&p).unwrap_err());
    assert!(e.contains("cannot be decoded"), "{e}");
    // A pickle that is not the weights (here: truncated) is refused with the file named.
    let pk = std::fs::read(vq("vqgan_params.pkl")).unwrap();
    std::fs::write(dir.join("v.pkl"), &pk[..1000]).unwrap();
    let e = format!("{:#}", Vqgan::open(&dir.join("v.pkl")).err().unwrap());
    assert!(e.contains("v.pkl") && e.contains("truncated"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Speed of the real-size VQGAN (LWM's config: 256 px, hidden 128, mult (1,2,2,4,6), 2 res
/// blocks, 8192×64 codebook) with random weights: prints encode/decode seconds per frame.
/// `cargo test -p lwm --test vqgan -- --ignored --nocapture real_size`
#[test]
#[ignore]
fn real_size_vqgan_speed() {
    let p = lwm::vqgan::lwm_shaped_random_arrays(3);
    let mut rng = lwm::rng::XorShift::new(3);
    let n_params: usize = p.values().map(|a| a.data.len()).sum();
    assert_eq!(
        n_params, 146_244_675,
        "the real VQGAN's parameter count (fact sheet)"
    );
    let model = Vqgan::from_arrays(p).unwrap();
    let x = rng.vec(256 * 256 * 3, -1.0, 1.0);
    let t = std::time::Instant::now();
    let codes = model.encode(&x, 1, 256, 256).unwrap();
    let enc = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let img = model.decode(&codes, 1, 16, 16).unwrap();
    let dec = t.elapsed().as_secs_f64();
    assert_eq!((codes.len(), img.len()), (256, 256 * 256 * 3));
    eprintln!("real-size VQGAN, 256x256: encode {enc:.2} s, decode {dec:.2} s per frame");
}
