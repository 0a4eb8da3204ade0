//! Micro-benchmark of single convolutions (the fused CPU kernels vs Candle's conv2d) in
//! effective GFLOP/s (direct-convolution FLOPs / time), median of several runs. `RAYON_NUM_THREADS=2 cargo run --release --example conv_bench`
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use retinanet::kernels::{Algorithm, FusedConv2d, Precision};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<F: FnMut() -> Result<()>>(mut f: F) -> Result<f64> {
    f()?;
    let mut v = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    // (cin, cout, k, stride, h, w): the shapes of the issue, the stem, and a strided 3x3.
    let shapes = [
        (256, 256, 3, 1, 100, 136),
        (256, 819, 3, 1, 100, 136),
        (256, 256, 3, 1, 25, 34),
        (1024, 256, 1, 1, 50, 68),
        (64, 64, 3, 1, 200, 272),
        (3, 64, 7, 2, 800, 1088),
        (128, 128, 3, 2, 200, 272),
        (64, 256, 1, 1, 200, 272),
        (256, 64, 1, 1, 200, 272),
    ];
    println!("| conv | ours: Winograd F(4,3) | F(2,3) | gemm only | bf16 F(2,3) | bf16 gemm only | candle conv2d | plain matmul of the same size |");
    println!("|---|---|---|---|---|---|---|---|");
    for (cin, cout, k, s, h, w) in shapes {
        let x = Tensor::randn(0f32, 1.0, (1, cin, h, w), &dev)?;
        let wt = Tensor::randn(0f32, 0.1, (cout, cin, k, k), &dev)?;
        let b = Tensor::zeros(cout, candle_core::DType::F32, &dev)?;
        let conv = FusedConv2d::with_algorithm(&wt, &b, s, k / 2, Algorithm::Winograd4)?;
        let f2 = FusedConv2d::with_algorithm(&wt, &b, s, k / 2, Algorithm::Winograd2)?;
        let direct = FusedConv2d::with_algorithm(&wt, &b, s, k / 2, Algorithm::Gemm)?;
        let (ho, wo) = conv.output_size(h, w);
        let flops = 2.0 * (cout * cin * k * k * ho * wo) as f64;
        let ours = time(|| {
            conv.forward(&x, None, true)?;
            Ok(())
        })?;
        let ours_f2 = time(|| {
            f2.forward(&x, None, true)?;
            Ok(())
        })?;
        let ours_direct = time(|| {
            direct.forward(&x, None, true)?;
            Ok(())
        })?;
        // bf16 products (CPUs with AVX512-BF16): F(2,3) where eligible, and tap/im2col
        // products alone.
        let bf16 = |algorithm| -> Result<Option<f64>> {
            if !retinanet::kernels::bf16::supported() {
                return Ok(None);
            }
            let c = FusedConv2d::with_options(&wt, &b, (s, k / 2), algorithm, Precision::Bf16)?;
            Ok(Some(time(|| {
                c.forward(&x, None, true)?;
                Ok(())
            })?))
        };
        let (bf16_f2, bf16_direct) = (bf16(Algorithm::Winograd2)?, bf16(Algorithm::Gemm)?);
        let candle = time(|| {
            x.conv2d(&wt, k / 2, s, 1, 1)?;
            Ok(())
        })?;
        let a = Tensor::randn(0f32, 1.0, (cout, cin * k * k), &dev)?;
        let bm = Tensor::randn(0f32, 1.0, (cin * k * k, ho * wo), &dev)?;
        let mm = time(|| {
            a.matmul(&bm)?;
            Ok(())
        })?;
        let rate = |t: Option<f64>| t.map_or("-".into(), |t| format!("{:.0}", flops / t / 1e9));
        println!(
            "| {k}x{k} s{s}, {cin}->{cout}, {h}x{w} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} | {:.0} |",
            flops / ours / 1e9,
            flops / ours_f2 / 1e9,
            flops / ours_direct / 1e9,
            rate(bf16_f2),
            rate(bf16_direct),
            flops / candle / 1e9,
            flops / mm / 1e9
        );
    }
    Ok(())
}
