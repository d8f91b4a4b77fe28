//! AdamW over every tensor of the parameter table, with global grad-norm
//! clipping, optional bf16 model weights over fp32 master weights, and
//! state that saves and restores.

use crate::backend::cpu::adamw::{adamw_step, clip_grad_norm, AdamWConfig};
use crate::backend::desc::clip_coefficient;
use crate::model::engine::Engine;
use crate::model::params::Tensors;
use crate::model::ModelError;
use crate::ops::{Backend, Precision};
use half::bf16;

/// What the model's weights are kept in between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightPrecision {
    /// The model weights are the fp32 master weights.
    Fp32,
    /// fp32 master weights live in the optimizer; the model gets them
    /// rounded to bf16 after every step (mixed-precision training).
    Bf16Model,
}

/// The result of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepReport {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// True when the norm was not finite and the step was skipped.
    pub skipped: bool,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Clip the global grad norm to this before each step (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Steps taken so far (the next step is `step + 1`).
    pub step: u64,
    pub exp_avg: Tensors,
    pub exp_avg_sq: Tensors,
    /// fp32 master weights when the model holds bf16-rounded ones.
    pub master: Option<Tensors>,
}

impl AdamW {
    /// Fresh state (zero moments) for `weights`.
    pub fn new(
        weights: &Tensors,
        cfg: AdamWConfig,
        max_grad_norm: Option<f64>,
        precision: WeightPrecision,
    ) -> Self {
        let zeros = || Tensors(weights.0.iter().map(|w| vec![0.0; w.len()]).collect());
        Self {
            cfg,
            max_grad_norm,
            step: 0,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            master: (precision == WeightPrecision::Bf16Model).then(|| weights.clone()),
        }
    }

    pub fn precision(&self) -> WeightPrecision {
        if self.master.is_some() {
            WeightPrecision::Bf16Model
        } else {
            WeightPrecision::Fp32
        }
    }

    /// Clips `grads` (in place) and applies one AdamW step to `weights`.
    /// A non-finite gradient norm skips the step and leaves everything as is.
    pub fn step(&mut self, weights: &mut Tensors, grads: &mut Tensors) -> StepReport {
        let grad_norm = {
            let mut views: Vec<&mut [f32]> = grads.0.iter_mut().map(|g| g.as_mut_slice()).collect();
            clip_grad_norm(&mut views, self.max_grad_norm.unwrap_or(f64::INFINITY))
        };
        if !grad_norm.is_finite() {
            return StepReport {
                grad_norm,
                skipped: true,
            };
        }
        self.step += 1;
        for i in 0..grads.0.len() {
            let (m, v) = (&mut self.exp_avg.0[i], &mut self.exp_avg_sq.0[i]);
            match &mut self.master {
                None => adamw_step(
                    &self.cfg,
                    self.step,
                    &mut weights.0[i],
                    &grads.0[i],
                    m,
                    v,
                    None,
                ),
                Some(master) => {
                    let mut rounded = vec![bf16::ZERO; master.0[i].len()];
                    adamw_step(
                        &self.cfg,
                        self.step,
                        &mut master.0[i],
                        &grads.0[i],
                        m,
                        v,
                        Some(&mut rounded),
                    );
                    for (w, r) in weights.0[i].iter_mut().zip(&rounded) {
                        *w = r.to_f32();
                    }
                }
            }
        }
        StepReport {
            grad_norm,
            skipped: false,
        }
    }
}

/// The policy being trained on one backend: the model there, and AdamW's
/// moments there once the optimizer has stepped, so a step moves no
/// weights or gradients off the backend. With bf16 weights (the engine's
/// precision) the fp32 master weights live on the backend too, and AdamW
/// writes each master and its bf16 copy in one pass. An fp32 engine under
/// an optimizer with masters (`WeightPrecision::Bf16Model`) keeps the host
/// path: AdamW on the host, the rounded weights uploaded after each step.
pub struct Policy<B: Backend> {
    pub engine: Engine<B>,
    moments: Option<Moments<B>>,
    /// fp32 master weights on the backend (bf16 engines).
    masters: Option<Vec<B::Buf>>,
}

/// AdamW's first and second moments of every parameter, on a backend.
type Moments<B> = (Vec<<B as Backend>::Buf>, Vec<<B as Backend>::Buf>);

impl<B: Backend> Policy<B> {
    pub fn new(engine: Engine<B>) -> Self {
        Self {
            engine,
            moments: None,
            masters: None,
        }
    }

    /// One AdamW step from the engine's accumulated gradients (then zeroed):
    /// global grad-norm clipping and the multi-tensor update on the backend,
    /// the twin of [`AdamW::step`]. The moments (and, for bf16 weights, the
    /// fp32 masters: `opt.master`, else `host`) move to the backend on the
    /// first call, so a resumed run continues its state; `opt.step` counts
    /// here, its host state and `host` weights go stale until
    /// [`Self::sync_to_host`].
    pub fn optimizer_step(
        &mut self,
        opt: &mut AdamW,
        host: &mut Tensors,
    ) -> Result<StepReport, ModelError> {
        let bf16 = self.engine.precision == Precision::Bf16;
        if !bf16 && opt.precision() != WeightPrecision::Fp32 {
            let mut grads = Tensors(host.0.iter().map(|w| vec![0.0; w.len()]).collect());
            self.engine.take_grads(&mut grads)?;
            let report = opt.step(host, &mut grads);
            self.engine.upload_weights(host)?;
            return Ok(report);
        }
        let be = &self.engine.be;
        let up = |t: &Tensors| {
            t.0.iter()
                .map(|v| be.upload(v))
                .collect::<Result<Vec<_>, _>>()
        };
        if self.moments.is_none() {
            self.moments = Some((up(&opt.exp_avg)?, up(&opt.exp_avg_sq)?));
        }
        if bf16 && self.masters.is_none() {
            self.masters = Some(up(opt.master.as_ref().unwrap_or(host))?);
        }
        let Some(grads) = self.engine.grads.as_ref() else {
            return Ok(StepReport::default());
        };
        let grad_norm = be.grad_norm(grads)?;
        let report = if grad_norm.is_finite() {
            opt.step += 1;
            let scale = clip_coefficient(grad_norm, opt.max_grad_norm.unwrap_or(f64::INFINITY));
            let (m, v) = self.moments.as_mut().expect("uploaded above");
            let weights = &mut self.engine.weights;
            let (params, copies) = match self.masters.as_mut() {
                Some(masters) => (masters.as_mut_slice(), Some(weights.as_mut_slice())),
                None => (weights.as_mut_slice(), None),
            };
            be.adamw_step(&opt.cfg, opt.step, scale, params, grads, m, v, copies)?;
            StepReport {
                grad_norm,
                skipped: false,
            }
        } else {
            StepReport {
                grad_norm,
                skipped: true,
            }
        };
        self.engine.zero_grads()?;
        Ok(report)
    }

    /// Copies the weights into `host` and, when the optimizer ran on the
    /// backend, its moments into `opt` (before a checkpoint, and at the end).
    pub fn sync_to_host(&mut self, host: &mut Tensors, opt: &mut AdamW) -> Result<(), ModelError> {
        self.engine.download_weights(host)?;
        if let Some(masters) = &self.masters {
            let mut dst = Tensors(Vec::with_capacity(masters.len()));
            for src in masters {
                dst.0.push(self.engine.be.download(src)?);
            }
            opt.master = Some(dst);
        }
        if let Some((m, v)) = &self.moments {
            for (dst, src) in opt.exp_avg.0.iter_mut().zip(m) {
                *dst = self.engine.be.download(src)?;
            }
            for (dst, src) in opt.exp_avg_sq.0.iter_mut().zip(v) {
                *dst = self.engine.be.download(src)?;
            }
        }
        Ok(())
    }
}
