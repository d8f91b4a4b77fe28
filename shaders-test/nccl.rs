//! NCCL through `distributed::nccl` at world size 1 (the GPU machine has one
//! GPU): the TCP rendezvous hands over the unique id, the communicator
//! initialises, and every collective of one rank returns its input.

use crate::{random, Case};
use std::time::Duration;
use vppo_engine::backend::cpu::adamw::AdamWConfig;
use vppo_engine::backend::cuda::CudaBackend;
use vppo_engine::distributed::nccl::NcclGroup;
use vppo_engine::distributed::{Collective, World};
use vppo_engine::model::acts::Save;
use vppo_engine::model::engine::Engine;
use vppo_engine::model::graph::GatherWeights;
use vppo_engine::model::params::Tensors;
use vppo_engine::model::Qwen25Vl;
use vppo_engine::model::{ModelError, TrainSequence};
use vppo_engine::ops::{Backend, DType, Precision};
use vppo_engine::train::optimizer::{AdamW, WeightPrecision};
use vppo_engine::train::zero::ShardedAdamW;

/// Rank 0 of a group of one, its rendezvous on a port nobody holds now.
fn solo_group(gpu: &CudaBackend) -> Result<NcclGroup, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let world = World {
        master: format!("127.0.0.1:{port}"),
        ..World::single()
    };
    NcclGroup::join(gpu, &world, Duration::from_secs(30)).map_err(|e| e.to_string())
}

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "nccl world=1: rendezvous, all-reduce, reduce-scatter, all-gather".into(),
            run: Box::new(|gpu, rng| {
                let group = solo_group(gpu)?;
                let x = random(rng, 1000, 1.0);
                let mut buf = gpu.upload(&x).map_err(|e| e.to_string())?;
                group.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
                let mut shard = gpu.zeros(x.len()).map_err(|e| e.to_string())?;
                group
                    .reduce_scatter_sum(&buf, &mut shard)
                    .map_err(|e| e.to_string())?;
                let mut gathered = gpu.zeros(x.len()).map_err(|e| e.to_string())?;
                group
                    .all_gather(&shard, &mut gathered)
                    .map_err(|e| e.to_string())?;
                for (what, b) in [
                    ("all-reduce", &buf),
                    ("reduce-scatter", &shard),
                    ("all-gather", &gathered),
                ] {
                    let got = gpu.download(b).map_err(|e| e.to_string())?;
                    if got != x {
                        return Err(format!("{what} of one rank changed its input"));
                    }
                }
                Ok(format!("rank {} of {}", group.rank(), group.world_size()))
            }),
        },
        Case {
            name: "nccl world=1: padded reduce-scatter / all-gather (f32, bf16), host collectives"
                .into(),
            run: Box::new(|gpu, rng| {
                let mut group = solo_group(gpu)?;
                for len in [1usize, 7, 1000] {
                    let x = random(rng, len, 1.0);
                    let full = gpu.upload(&x).map_err(|e| e.to_string())?;
                    let mut shard = gpu.zeros(len).map_err(|e| e.to_string())?;
                    group
                        .reduce_scatter_padded(&full, &mut shard)
                        .map_err(|e| e.to_string())?;
                    if gpu.download(&shard).map_err(|e| e.to_string())? != x {
                        return Err(format!("padded reduce-scatter of {len} changed it"));
                    }
                    for dtype in [DType::F32, DType::Bf16] {
                        let src = gpu.cast(&full, dtype).map_err(|e| e.to_string())?;
                        let zeros = gpu.zeros(len).map_err(|e| e.to_string())?;
                        let mut out = gpu.cast(&zeros, dtype).map_err(|e| e.to_string())?;
                        group
                            .all_gather_padded(&src, &mut out)
                            .map_err(|e| e.to_string())?;
                        let (a, b) = (
                            gpu.download(&src).map_err(|e| e.to_string())?,
                            gpu.download(&out).map_err(|e| e.to_string())?,
                        );
                        if a != b {
                            return Err(format!("padded all-gather of {len} {dtype:?} changed it"));
                        }
                    }
                }
                group
                    .wait("the padded collectives")
                    .map_err(|e| e.to_string())?;
                let mut host = random(rng, 33, 1.0);
                let want = host.clone();
                Collective::all_reduce_sum(&mut group, &mut host).map_err(|e| e.to_string())?;
                Collective::broadcast(&mut group, &mut host, 0).map_err(|e| e.to_string())?;
                if host != want {
                    return Err("host all-reduce / broadcast of one rank changed it".into());
                }
                Ok("lengths 1, 7, 1000".into())
            }),
        },
        Case {
            name: "zero-2 AdamW step on the GPU through NCCL (world=1) vs host AdamW, f32 and bf16"
                .into(),
            run: Box::new(|gpu, rng| {
                let mut group = solo_group(gpu)?;
                let dir = crate::model::fixture_dir("two_images");
                let model = Qwen25Vl::load(&dir).map_err(|e| e.to_string())?;
                let grads = Tensors(
                    model
                        .weights
                        .0
                        .iter()
                        .map(|w| random(rng, w.len(), 0.1))
                        .collect(),
                );
                let cfg = AdamWConfig {
                    lr: 1e-2,
                    ..AdamWConfig::default()
                };
                let mut report = Vec::new();
                for (precision, weights, tol) in [
                    (Precision::Fp32, WeightPrecision::Fp32, 1e-6),
                    // One bf16 rounding of the same master.
                    (Precision::Bf16, WeightPrecision::Bf16Model, 8e-3),
                ] {
                    let be = CudaBackend::new(0).map_err(|e| e.to_string())?;
                    let mut engine =
                        Engine::with_precision(be, &model, precision).map_err(|e| e.to_string())?;
                    let uploaded: Result<Vec<_>, _> =
                        grads.0.iter().map(|g| engine.be.upload(g)).collect();
                    engine.grads = Some(uploaded.map_err(|e| e.to_string())?);
                    let opt = AdamW::new(&model.weights, cfg, Some(0.5), weights);
                    let mut zero = ShardedAdamW::from_full(&opt, &model.weights, &engine, 0, 1)
                        .map_err(|e| e.to_string())?;
                    zero.step(&mut engine, &mut group)
                        .map_err(|e| e.to_string())?;
                    let mut got = model.weights.clone();
                    engine
                        .download_weights(&mut got)
                        .map_err(|e| e.to_string())?;
                    let mut whole = AdamW::new(&model.weights, cfg, Some(0.5), weights);
                    let mut want = model.weights.clone();
                    whole.step(&mut want, &mut grads.clone());
                    let (mut worst, mut scale) = (0.0f64, 0.0f64);
                    for (a, b) in got.0.concat().iter().zip(want.0.concat()) {
                        worst = worst.max((a - b).abs() as f64);
                        scale = scale.max(b.abs() as f64);
                    }
                    let rel = worst / scale;
                    if rel > tol {
                        return Err(format!("{precision:?}: {rel:.2e} from host AdamW"));
                    }
                    report.push(format!("{precision:?} {rel:.1e}"));
                }
                Ok(report.join(", "))
            }),
        },
        Case {
            name:
                "zero-3 on the GPU through NCCL (world=1): released weights gathered unit by unit"
                    .into(),
            run: Box::new(|gpu, _rng| {
                if !vppo_engine::backend::cuda::blas_present() {
                    return Ok(crate::model::NO_CUBLAS.into());
                }
                let mut group = solo_group(gpu)?;
                let case = "two_images";
                let model =
                    Qwen25Vl::load(&crate::model::fixture_dir(case)).map_err(|e| e.to_string())?;
                let prepared = crate::model::prepared(case)?;
                let batch = vec![TrainSequence {
                    input: prepared.input.clone(),
                    prompt_len: prepared.prompt_len,
                }];
                let err = |e: ModelError| e.to_string();
                let device = || CudaBackend::new(0).map_err(|e| e.to_string());
                let mut whole = Engine::new(device()?, &model).map_err(err)?;
                let want = whole
                    .train_forward(&batch, Save::All)
                    .map_err(err)?
                    .logprobs;
                let mut engine = Engine::new(device()?, &model).map_err(err)?;
                let opt = AdamW::new(
                    &model.weights,
                    AdamWConfig::default(),
                    None,
                    WeightPrecision::Fp32,
                );
                let mut zero = ShardedAdamW::from_full(&opt, &model.weights, &engine, 0, 1)
                    .map_err(|e| e.to_string())?;
                zero.zero3 = true;
                zero.release(&mut engine).map_err(|e| e.to_string())?;
                let source = zero
                    .unit_source(&engine.be, &engine.layout, &mut group)
                    .map_err(|e| e.to_string())?
                    .ok_or("no unit source after release")?;
                let source = &source as &dyn GatherWeights<CudaBackend>;
                let got = engine
                    .train_forward_from(&batch, Save::All, Some(source))
                    .map_err(err)?
                    .logprobs;
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                if got.len() != want.len() || worst > 1e-5 {
                    return Err(format!("gathered forward differs by {worst:.2e}"));
                }
                Ok(format!("{} log-probs within {worst:.1e}", got.len()))
            }),
        },
    ]
}
