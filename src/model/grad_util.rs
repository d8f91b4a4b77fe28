//! Small helpers shared by the layer backwards.

/// `acc += delta`, elementwise.
pub fn add_into(acc: &mut [f32], delta: &[f32]) {
    assert_eq!(acc.len(), delta.len(), "add_into: lengths differ");
    for (a, b) in acc.iter_mut().zip(delta) {
        *a += b;
    }
}

/// Gradients w.r.t. pre-RoPE q, pre-RoPE k, and v.
pub type QkvGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// Backward of `attention(rope(q), rope(k), v)` for a block's saved
/// activations: returns the gradients w.r.t. the pre-RoPE q and k, and v.
pub fn attention_rope_bwd(
    shape: &crate::backend::cpu::attention::VarlenAttention,
    acts: &super::acts::BlockActs,
    rope: &crate::backend::cpu::rope::RopeTable<f32>,
    d_attn: &[f32],
) -> Result<QkvGrads, crate::backend::cpu::OpError> {
    use crate::backend::cpu::attention::attention_bwd;
    use crate::backend::cpu::rope::rope_bwd;
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; acts.q.len()],
        vec![0.0; acts.k.len()],
        vec![0.0; acts.v.len()],
    );
    attention_bwd(
        shape, &acts.q, &acts.k, &acts.v, &acts.attn, &acts.lse, d_attn, &mut dq, &mut dk, &mut dv,
    )?;
    let (mut dq_raw, mut dk_raw) = (vec![0.0; dq.len()], vec![0.0; dk.len()]);
    rope_bwd(rope, &dq, shape.q_heads, &mut dq_raw);
    rope_bwd(rope, &dk, shape.kv_heads, &mut dk_raw);
    Ok((dq_raw, dk_raw, dv))
}
