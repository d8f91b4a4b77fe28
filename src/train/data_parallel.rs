//! Data-parallel RL steps over a [`Collective`]: every rank holds the whole
//! model and the same prompts; rank r rolls out its contiguous share of the
//! prompts (GRPO groups never straddle ranks), and the shares are gathered
//! so every rank holds the same rollout batch and takes the same decisions
//! (dynamic sampling, the update plan). Each optimizer step's micro-batches
//! are then split among the ranks, each rank's loss normalised by the whole
//! step's token count, and the gradients reduce-scattered into ZeRO-2
//! shards ([`super::zero`]). Rank-order sums make every rank hold the same
//! bits, and make the result match one process to rounding.

use super::optimizer::Policy;
use super::step::{
    accumulate_micro_batches, micro_batches, skip_non_finite_loss, step_tokens, token_packs,
    Prompt, Rollouts, StepConfig, StepError, StepStats, UpdateStats, UpdateSums,
};
use super::zero::{share, ShardedAdamW, ZeroError};
use crate::distributed::{Collective, DistError};
use crate::model::graph::GatherWeights;
use crate::model::TrainSequence;
use crate::ops::Backend;
use std::ops::Range;

/// The prompts this rank rolls out of a batch of `prompts`.
pub fn prompt_share(prompts: usize, group: &dyn Collective) -> Range<usize> {
    share(prompts, group.rank(), group.world_size())
}

/// Every rank's rollouts of its prompt share (`mine` from this rank), in
/// rank order: the rollout batch one process would have made of all of
/// `prompts`. The model inputs are rebuilt from `prompts` (every rank
/// holds them), so only response tokens and per-token numbers travel.
pub fn gather_rollouts(
    group: &mut dyn Collective,
    mine: Rollouts,
    prompts: &[Prompt],
) -> Result<Rollouts, StepError> {
    let all = group.exchange(&encode(&mine))?;
    let n = mine.group_size;
    let mut merged: Option<Rollouts> = None;
    let mut extra: Vec<(String, f64, usize)> = Vec::new();
    for (rank, bytes) in all.iter().enumerate() {
        let part = decode(bytes, prompts, n).map_err(|message| DistError::Io {
            rank,
            message: format!("its rollouts do not decode: {message}"),
        })?;
        for (name, value) in &part.stats.reward_extra {
            extra.push((name.clone(), *value, part.stats.responses));
        }
        match merged.as_mut() {
            None => merged = Some(part),
            Some(m) => m.append(part),
        }
    }
    let mut merged = merged.expect("a group has at least one rank");
    merged.stats.reward_extra = weighted_extra(&extra);
    Ok(merged)
}

/// Each extra metric's mean over every response: the ranks' means weighted
/// by their response counts, in first-seen name order.
fn weighted_extra(extra: &[(String, f64, usize)]) -> Vec<(String, f64)> {
    let mut names: Vec<&String> = Vec::new();
    for (name, _, _) in extra {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let (sum, count) = extra
                .iter()
                .filter(|(n, _, _)| n == name)
                .fold((0.0, 0usize), |(s, c), (_, v, k)| {
                    (s + v * *k as f64, c + k)
                });
            (name.clone(), sum / count.max(1) as f64)
        })
        .collect()
}

/// One optimizer step of an [`super::step::update_plan`] over the ranks:
/// this rank's share of the step's micro-batches forward and backward,
/// the statistics summed over ranks, then the ZeRO-2 AdamW step, which
/// leaves the updated weights in the policy's engine on every rank.
pub fn update_step<B: Backend>(
    policy: &mut Policy<B>,
    zero: &mut ShardedAdamW<B>,
    group: &mut dyn Collective,
    rollouts: &Rollouts,
    parts: &[Range<usize>],
    cfg: &StepConfig,
) -> Result<UpdateStats, StepError> {
    let _nvtx = crate::nvtx::range("update");
    let micro = micro_batches(rollouts, parts, cfg.micro_batch);
    let mine = share(micro.len(), group.rank(), group.world_size());
    let total = step_tokens(rollouts, parts);
    let zero_error = |e: ZeroError| match e {
        ZeroError::Dist(e) => StepError::Dist(e),
        ZeroError::Model(e) => StepError::Model(e),
    };
    // ZeRO-3 gathers inside every packed pass: a rank with fewer passes
    // than another runs idle ones, so the ranks' gathers stay in step.
    let passes: usize = micro[mine.clone()]
        .iter()
        .map(|(r, _)| {
            token_packs(
                &rollouts.batch,
                r.clone(),
                cfg.max_tokens_per_micro_batch,
                1,
            )
            .len()
        })
        .sum();
    let mut most = [passes as f64];
    if zero.gathers_by_unit() {
        group.all_reduce_max_f64(&mut most)?;
    }
    let local = {
        let source = zero
            .unit_source(&policy.engine.be, &policy.engine.layout, &mut *group)
            .map_err(zero_error)?;
        let source = source.as_ref().map(|s| s as &dyn GatherWeights<B>);
        let sums = accumulate_micro_batches(
            &mut policy.engine,
            rollouts,
            &micro[mine],
            total,
            cfg,
            source,
        )?;
        if let Some(source) = source {
            for _ in passes..most[0] as usize {
                policy.engine.idle_pass(source)?;
            }
        }
        sums
    };
    let (mut sums, mut extremes) = local.to_sums();
    group.all_reduce_sum_f64(&mut sums)?;
    group.all_reduce_max_f64(&mut extremes)?;
    let mut stats = UpdateSums::from_sums(sums, extremes).stats(rollouts, parts);
    // Every rank sees the same summed loss, so all skip together.
    if skip_non_finite_loss(&mut policy.engine, &mut stats)? {
        return Ok(stats);
    }
    stats.optimizer = zero.step(&mut policy.engine, group).map_err(|e| match e {
        ZeroError::Dist(e) => StepError::Dist(e),
        ZeroError::Model(e) => StepError::Model(e),
    })?;
    Ok(stats)
}

/// A rank's rollouts as bytes: counts, then the per-response and per-token
/// arrays (little-endian), then the statistics as JSON.
fn encode(r: &Rollouts) -> Vec<u8> {
    let mut out = Vec::new();
    let put = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
    put(&mut out, r.group_size as u64);
    put(&mut out, r.batch.len() as u64);
    for (s, &id) in r.batch.iter().zip(&r.sample_ids) {
        put(&mut out, id as u64);
        let response = &s.input.ids[s.prompt_len..];
        put(&mut out, response.len() as u64);
        out.extend_from_slice(bytemuck::cast_slice(response));
    }
    let floats = |out: &mut Vec<u8>, v: Option<&[f32]>| {
        put(out, v.map_or(u64::MAX, |v| v.len() as u64));
        if let Some(v) = v {
            out.extend_from_slice(bytemuck::cast_slice(v));
        }
    };
    floats(&mut out, Some(&r.advantages));
    floats(&mut out, Some(&r.lp_old));
    floats(&mut out, r.dependency.as_deref());
    floats(&mut out, r.lp_ref.as_deref());
    let stats = serde_json::json!({
        "responses": r.stats.responses,
        "mean_reward": r.stats.mean_reward,
        "accuracy": r.stats.accuracy,
        "kept_groups": r.stats.kept_groups,
        "dropped_groups": r.stats.dropped_groups,
        "mean_response_tokens": r.stats.mean_response_tokens,
        "reward_extra": r.stats.reward_extra,
    });
    out.extend_from_slice(stats.to_string().as_bytes());
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn count(&mut self) -> Result<usize, String> {
        let v = self.u64()?;
        usize::try_from(v).map_err(|_| format!("count {v} too large"))
    }

    fn floats(&mut self) -> Result<Option<Vec<f32>>, String> {
        match self.u64()? {
            u64::MAX => Ok(None),
            n => {
                let n = usize::try_from(n).map_err(|_| "too many floats".to_string())?;
                let bytes = self.take(n.checked_mul(4).ok_or("too many floats")?)?;
                Ok(Some(bytemuck::pod_collect_to_vec(bytes)))
            }
        }
    }
}

fn decode(bytes: &[u8], prompts: &[Prompt], n: usize) -> Result<Rollouts, String> {
    let mut r = Reader { bytes, at: 0 };
    let group_size = r.count()?;
    if group_size != n {
        return Err(format!("group size {group_size}, here {n}"));
    }
    let responses = r.count()?;
    let (mut batch, mut sample_ids, mut lens) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..responses {
        let id = r.count()?;
        let prompt = prompts
            .get(id / n.max(1))
            .ok_or_else(|| format!("response {id} of a batch of {} prompts", prompts.len()))?;
        let len = r.count()?;
        let tokens: Vec<u32> =
            bytemuck::pod_collect_to_vec(r.take(len.checked_mul(4).ok_or("too long")?)?);
        let mut input = prompt.input.clone();
        input.ids.extend(&tokens);
        batch.push(TrainSequence {
            input,
            prompt_len: prompt.input.ids.len(),
        });
        sample_ids.push(id);
        lens.push(len);
    }
    let advantages = r.floats()?.ok_or("no advantages")?;
    let lp_old = r.floats()?.ok_or("no log-probs")?;
    let dependency = r.floats()?;
    let lp_ref = r.floats()?;
    let tokens: usize = lens.iter().sum();
    if advantages.len() != responses || lp_old.len() != tokens {
        return Err(format!(
            "{} advantages and {} log-probs for {responses} responses of {tokens} tokens",
            advantages.len(),
            lp_old.len()
        ));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&bytes[r.at..]).map_err(|e| format!("statistics: {e}"))?;
    let num = |k: &str| json[k].as_f64().unwrap_or(0.0);
    let stats = StepStats {
        responses: num("responses") as usize,
        mean_reward: num("mean_reward") as f32,
        accuracy: num("accuracy") as f32,
        kept_groups: num("kept_groups") as usize,
        dropped_groups: num("dropped_groups") as usize,
        mean_response_tokens: num("mean_response_tokens") as f32,
        reward_extra: serde_json::from_value(json["reward_extra"].clone()).unwrap_or_default(),
        ..StepStats::default()
    };
    Ok(Rollouts {
        batch,
        advantages,
        lens,
        sample_ids,
        lp_old,
        dependency,
        lp_ref,
        group_size,
        stats,
    })
}
