//! Every forward of the CPU op library against a naive formula written out
//! independently here, plus hand-worked values where a formula is easy to
//! get subtly wrong (GELU, k3, top-k counts, AdamW's first step).

mod common;

use common::{randn, rel_err, rng};
use half::bf16;
use rand::Rng;
use vppo_engine::backend::cpu::activations::{gelu_fwd, swiglu_fwd};
use vppo_engine::backend::cpu::adamw::{adamw_step, clip_grad_norm, global_grad_norm, AdamWConfig};
use vppo_engine::backend::cpu::cast::{bf16_to_f32, f32_to_bf16};
use vppo_engine::backend::cpu::embedding::embedding_fwd;
use vppo_engine::backend::cpu::flash_attn::{attention_fwd, VarlenAttention};
use vppo_engine::backend::cpu::gemm::{matmul, Trans};
use vppo_engine::backend::cpu::linear::linear_fwd;
use vppo_engine::backend::cpu::logprob::token_logprob_fwd;
use vppo_engine::backend::cpu::rmsnorm::rmsnorm_fwd;
use vppo_engine::backend::cpu::rope::{rope_fwd, RopeTable};
use vppo_engine::backend::cpu::softmax_kl::{dependency_k3, softmax_kl_fwd};
use vppo_engine::backend::cpu::topk_select::{topk_count, topk_select_mask};
use vppo_engine::backend::cpu::OpError;

fn naive_matmul(
    m: usize,
    k: usize,
    n: usize,
    a: impl Fn(usize, usize) -> f64,
    b: impl Fn(usize, usize) -> f64,
) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
        }
    }
    c
}

#[test]
fn matmul_matches_naive_for_every_transpose_and_split() {
    let mut r = rng(10);
    // Small (serial), tall (row split), short and wide (column split), empty k.
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 5, 2),
        (300, 40, 30),
        (3, 80, 2000),
        (4, 0, 3),
    ] {
        for ta in [Trans::No, Trans::Yes] {
            for tb in [Trans::No, Trans::Yes] {
                let a = randn(&mut r, m * k, 1.0);
                let b = randn(&mut r, k * n, 1.0);
                let c0 = randn(&mut r, m * n, 1.0);
                let get_a = |i: usize, p: usize| {
                    if ta == Trans::No {
                        a[i * k + p]
                    } else {
                        a[p * m + i]
                    }
                };
                let get_b = |p: usize, j: usize| {
                    if tb == Trans::No {
                        b[p * n + j]
                    } else {
                        b[j * k + p]
                    }
                };
                let ab = naive_matmul(m, k, n, get_a, get_b);
                let expect: Vec<f64> = ab.iter().zip(&c0).map(|(x, c)| 0.5 * x + 2.0 * c).collect();
                let mut c = c0.clone();
                matmul(m, k, n, 0.5, &a, ta, &b, tb, 2.0, &mut c);
                let e = rel_err(&c, &expect);
                assert!(e < 1e-12, "matmul {m}x{k}x{n} {ta:?}/{tb:?}: rel err {e}");
                // f32 path against the same f64 reference.
                let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
                let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
                let mut c32: Vec<f32> = c0.iter().map(|&v| v as f32).collect();
                matmul(m, k, n, 0.5, &a32, ta, &b32, tb, 2.0, &mut c32);
                let c32: Vec<f64> = c32.iter().map(|&v| v as f64).collect();
                let e = rel_err(&c32, &expect);
                assert!(
                    e < 1e-5,
                    "matmul f32 {m}x{k}x{n} {ta:?}/{tb:?}: rel err {e}"
                );
            }
        }
    }
}

#[test]
fn linear_matches_naive() {
    let mut r = rng(11);
    let (t, i, o) = (7, 13, 5);
    let x = randn(&mut r, t * i, 1.0);
    let w = randn(&mut r, o * i, 1.0);
    let b = randn(&mut r, o, 1.0);
    let mut y = vec![0.0; t * o];
    linear_fwd(&x, &w, Some(&b), t, i, o, &mut y);
    for tt in 0..t {
        for oo in 0..o {
            let expect: f64 = b[oo]
                + (0..i)
                    .map(|ii| x[tt * i + ii] * w[oo * i + ii])
                    .sum::<f64>();
            assert!((y[tt * o + oo] - expect).abs() < 1e-12);
        }
    }
}

#[test]
fn rmsnorm_matches_naive() {
    let mut r = rng(12);
    let (rows, dim) = (3, 10);
    let x = randn(&mut r, rows * dim, 3.0);
    let w = randn(&mut r, dim, 1.0);
    let mut y = vec![0.0; rows * dim];
    let mut rstd = vec![0.0; rows];
    rmsnorm_fwd(&x, &w, dim, 1e-6, &mut y, &mut rstd);
    for row in 0..rows {
        let xr = &x[row * dim..(row + 1) * dim];
        let rms = (xr.iter().map(|v| v * v).sum::<f64>() / dim as f64 + 1e-6).sqrt();
        assert!((rstd[row] - 1.0 / rms).abs() < 1e-12);
        for c in 0..dim {
            assert!((y[row * dim + c] - xr[c] / rms * w[c]).abs() < 1e-12);
        }
    }
}

#[test]
fn activations_match_known_values() {
    let x = [0.0f64, 1.0, -1.0, 3.0];
    let mut y = [0.0; 4];
    gelu_fwd(&x, &mut y);
    // x * Phi(x); Phi(1) = 0.8413447460685429, Phi(3) = 0.9986501019683699.
    let expect = [
        0.0,
        0.841_344_746_068_542_9,
        -0.158_655_253_931_457_05,
        2.995_950_305_905_11,
    ];
    for (a, b) in y.iter().zip(expect) {
        assert!((a - b).abs() < 1e-12, "gelu {a} vs {b}");
    }
    let gate = [0.0f64, 2.0, -3.0];
    let up = [5.0f64, 0.5, 2.0];
    let mut h = [0.0; 3];
    swiglu_fwd(&gate, &up, &mut h);
    for i in 0..3 {
        let silu = gate[i] / (1.0 + (-gate[i]).exp());
        assert!((h[i] - silu * up[i]).abs() < 1e-12);
    }
    let mut y32 = [0.0f32; 4];
    gelu_fwd(&x.map(|v| v as f32), &mut y32);
    for (a, b) in y32.iter().zip(expect) {
        assert!((*a as f64 - b).abs() < 1e-6, "gelu f32 {a} vs {b}");
    }
}

/// Rotates pairs `(j, j + half)` of every head by `angle(t, j)`.
fn naive_rope(
    x: &[f64],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    angle: impl Fn(usize, usize) -> f64,
) -> Vec<f64> {
    let half = head_dim / 2;
    let mut y = x.to_vec();
    for t in 0..tokens {
        for h in 0..heads {
            let base = (t * heads + h) * head_dim;
            for j in 0..half {
                let (c, s) = (angle(t, j).cos(), angle(t, j).sin());
                let (a, b) = (x[base + j], x[base + j + half]);
                y[base + j] = a * c - b * s;
                y[base + j + half] = b * c + a * s;
            }
        }
    }
    y
}

#[test]
fn rope_layouts_match_their_definitions() {
    let mut r = rng(13);
    // 1D: angle = pos / theta^(2j/d).
    let pos = [0, 1, 5, 4095];
    let (heads, d) = (2, 8);
    let x = randn(&mut r, pos.len() * heads * d, 1.0);
    let mut y = vec![0.0; x.len()];
    rope_fwd(&RopeTable::text_1d(&pos, d, 10000.0), &x, heads, &mut y);
    let want = naive_rope(&x, pos.len(), heads, d, |t, j| {
        pos[t] as f64 / 10000f64.powf(2.0 * j as f64 / d as f64)
    });
    assert!(rel_err(&y, &want) < 1e-12);

    // M-RoPE, Qwen sections: j < 16 reads t, 16..40 reads h, 40..64 reads w.
    let (tt, hh, ww) = ([3, 3, 3], [3, 4, 5], [3, 3, 9]);
    let d = 128;
    let x = randn(&mut r, 3 * d, 1.0);
    let mut y = vec![0.0; x.len()];
    rope_fwd(
        &RopeTable::mrope([&tt, &hh, &ww], [16, 24, 24], d, 1e6),
        &x,
        1,
        &mut y,
    );
    let want = naive_rope(&x, 3, 1, d, |t, j| {
        let p = if j < 16 {
            tt[t]
        } else if j < 40 {
            hh[t]
        } else {
            ww[t]
        };
        p as f64 / 1e6f64.powf(2.0 * j as f64 / d as f64)
    });
    assert!(rel_err(&y, &want) < 1e-12);

    // Equal streams reduce M-RoPE to 1D RoPE.
    let mut y1 = vec![0.0; x.len()];
    rope_fwd(&RopeTable::text_1d(&tt, d, 1e6), &x, 1, &mut y1);
    rope_fwd(
        &RopeTable::mrope([&tt, &tt, &tt], [16, 24, 24], d, 1e6),
        &x,
        1,
        &mut y,
    );
    assert!(rel_err(&y, &y1) < 1e-15);

    // Vision 2D, head_dim 80: 20 frequencies 1/10000^(2i/40); angles
    // [row * f (20) | col * f (20)].
    let (rows, cols) = ([0, 0, 1, 7], [0, 1, 0, 3]);
    let d = 80;
    let x = randn(&mut r, 4 * 2 * d, 1.0);
    let mut y = vec![0.0; x.len()];
    rope_fwd(
        &RopeTable::vision_2d(&rows, &cols, d, 10000.0),
        &x,
        2,
        &mut y,
    );
    let want = naive_rope(&x, 4, 2, d, |t, j| {
        let f = |i: usize| 1.0 / 10000f64.powf(2.0 * i as f64 / 40.0);
        if j < 20 {
            rows[t] as f64 * f(j)
        } else {
            cols[t] as f64 * f(j - 20)
        }
    });
    assert!(rel_err(&y, &want) < 1e-12);
}

#[allow(clippy::too_many_arguments)]
fn naive_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    q_lens: &[usize],
    k_lens: &[usize],
    hq: usize,
    hkv: usize,
    d: usize,
    causal: bool,
) -> Vec<f64> {
    let mut o = vec![0.0; q.len()];
    let (mut q0, mut k0) = (0, 0);
    for (&lq, &lk) in q_lens.iter().zip(k_lens) {
        for h in 0..hq {
            let g = h * hkv / hq;
            for i in 0..lq {
                let qi = &q[((q0 + i) * hq + h) * d..][..d];
                let allowed: Vec<usize> =
                    (0..lk).filter(|&j| !causal || j + lq <= i + lk).collect();
                if allowed.is_empty() {
                    continue;
                }
                let scores: Vec<f64> = allowed
                    .iter()
                    .map(|&j| {
                        let kj = &k[((k0 + j) * hkv + g) * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (&j, s) in allowed.iter().zip(&scores) {
                    let p = (s - m).exp() / z;
                    for c in 0..d {
                        o[((q0 + i) * hq + h) * d + c] += p * v[((k0 + j) * hkv + g) * d + c];
                    }
                }
            }
        }
        q0 += lq;
        k0 += lk;
    }
    o
}

#[test]
fn attention_matches_naive_softmax_attention() {
    let mut r = rng(14);
    // (q lens, k lens, q heads, kv heads, head_dim, causal)
    type Case<'a> = (&'a [usize], &'a [usize], usize, usize, usize, bool);
    let cases: &[Case] = &[
        (&[1, 4, 2], &[1, 4, 2], 2, 2, 8, false),
        (&[5, 1], &[5, 1], 4, 2, 16, true),
        (&[3], &[7], 6, 2, 80, true),
        (&[100, 3], &[100, 3], 2, 1, 128, true),
        (&[130], &[130], 3, 3, 4, false),
        (&[4], &[2], 1, 1, 4, true),
    ];
    for &(ql, kl, hq, hkv, d, causal) in cases {
        let cq: Vec<i32> = std::iter::once(0)
            .chain(ql.iter().scan(0, |s, &l| {
                *s += l as i32;
                Some(*s)
            }))
            .collect();
        let ck: Vec<i32> = std::iter::once(0)
            .chain(kl.iter().scan(0, |s, &l| {
                *s += l as i32;
                Some(*s)
            }))
            .collect();
        let tq: usize = ql.iter().sum();
        let tk: usize = kl.iter().sum();
        let q = randn(&mut r, tq * hq * d, 2.0);
        let k = randn(&mut r, tk * hkv * d, 2.0);
        let v = randn(&mut r, tk * hkv * d, 1.0);
        let cfg = VarlenAttention {
            cu_seqlens_q: &cq,
            cu_seqlens_k: &ck,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
            causal,
            scale: 1.0 / (d as f64).sqrt(),
        };
        let mut o = vec![f64::NAN; q.len()];
        let mut lse = vec![f64::NAN; tq * hq];
        attention_fwd(&cfg, &q, &k, &v, &mut o, &mut lse).unwrap();
        let want = naive_attention(&q, &k, &v, ql, kl, hq, hkv, d, causal);
        let e = rel_err(&o, &want);
        assert!(
            e < 1e-12,
            "attention {ql:?}/{kl:?} h{hq}/{hkv} d{d} causal={causal}: rel err {e}"
        );
        assert!(lse.iter().all(|l| !l.is_nan()), "lse left unwritten");
    }
    // A malformed layout is an error, not a panic.
    let bad = [0, 3, 2];
    let cfg = VarlenAttention {
        cu_seqlens_q: &bad,
        cu_seqlens_k: &bad,
        q_heads: 1,
        kv_heads: 1,
        head_dim: 2,
        causal: false,
        scale: 1.0,
    };
    let x = vec![0.0; 4];
    let err = attention_fwd(&cfg, &x, &x, &x, &mut [0.0; 4], &mut [0.0; 2]).unwrap_err();
    assert!(matches!(err, OpError::BadSeqlens { .. }));
}

#[test]
fn embedding_gathers_rows_and_rejects_bad_ids() {
    let table: Vec<f64> = (0..12).map(|v| v as f64).collect(); // [4, 3]
    let mut out = vec![0.0; 6];
    embedding_fwd(&[2, 0], &table, 3, &mut out).unwrap();
    assert_eq!(out, vec![6.0, 7.0, 8.0, 0.0, 1.0, 2.0]);
    let err = embedding_fwd(&[1, 4], &table, 3, &mut out).unwrap_err();
    assert_eq!(
        err,
        OpError::TokenOutOfRange {
            id: 4,
            position: 1,
            vocab: 4
        }
    );
}

#[test]
fn token_logprob_matches_naive_softmax() {
    let mut r = rng(15);
    let (rows, vocab) = (4, 37);
    let z = randn(&mut r, rows * vocab, 5.0);
    let targets: Vec<u32> = (0..rows).map(|_| r.random_range(0..vocab as u32)).collect();
    let (mut lp, mut ent, mut lse) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
    token_logprob_fwd(&z, vocab, &targets, &mut lp, &mut ent, &mut lse).unwrap();
    for t in 0..rows {
        let row = &z[t * vocab..(t + 1) * vocab];
        let total: f64 = row.iter().map(|v| v.exp()).sum();
        let p: Vec<f64> = row.iter().map(|v| v.exp() / total).collect();
        assert!((lp[t] - p[targets[t] as usize].ln()).abs() < 1e-12);
        let h: f64 = -p.iter().map(|pi| pi * pi.ln()).sum::<f64>();
        assert!((ent[t] - h).abs() < 1e-12);
    }
    let err =
        token_logprob_fwd(&z, vocab, &[0, 1, 37, 2], &mut lp, &mut ent, &mut lse).unwrap_err();
    assert!(matches!(
        err,
        OpError::TokenOutOfRange {
            id: 37,
            position: 2,
            ..
        }
    ));
}

#[test]
fn softmax_kl_matches_naive_and_handles_masked_logits() {
    let mut r = rng(16);
    let (rows, vocab) = (3, 50);
    let zp = randn(&mut r, rows * vocab, 4.0);
    let zq = randn(&mut r, rows * vocab, 4.0);
    let (mut kl, mut lp, mut lq) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
    softmax_kl_fwd(&zp, &zq, vocab, &mut kl, &mut lp, &mut lq);
    for t in 0..rows {
        let sp: f64 = zp[t * vocab..(t + 1) * vocab].iter().map(|v| v.exp()).sum();
        let sq: f64 = zq[t * vocab..(t + 1) * vocab].iter().map(|v| v.exp()).sum();
        let want: f64 = (0..vocab)
            .map(|v| {
                let p = zp[t * vocab + v].exp() / sp;
                let q = zq[t * vocab + v].exp() / sq;
                p * (p / q).ln()
            })
            .sum();
        assert!((kl[t] - want).abs() < 1e-12, "kl {} vs {want}", kl[t]);
        assert!(kl[t] >= 0.0);
    }
    // Identical rows: zero. A token masked (-inf) in both: ignored.
    let a = [1.0, f64::NEG_INFINITY, 0.5];
    let (mut kl, mut lp, mut lq) = (vec![0.0; 1], vec![0.0; 1], vec![0.0; 1]);
    softmax_kl_fwd(&a, &a, 3, &mut kl, &mut lp, &mut lq);
    assert_eq!(kl[0], 0.0);
    // Two-token case by hand: p = (0.5, 0.5), q = (0.8, 0.2).
    let zp = [0.0, 0.0];
    let zq = [(0.8f64).ln(), (0.2f64).ln()];
    softmax_kl_fwd(&zp, &zq, 2, &mut kl, &mut lp, &mut lq);
    let want = 0.5 * (0.5f64 / 0.8).ln() + 0.5 * (0.5f64 / 0.2).ln();
    assert!((kl[0] - want).abs() < 1e-12);
}

#[test]
fn k3_dependency_matches_hand_values() {
    let ln2 = 2f64.ln();
    let orig = [0.0, -1.0, -1.0, 0.0, -50.0, -3.0];
    let mask = [0.0, -1.0 + ln2, -1.0 - ln2, 30.0, 0.0, -40.0];
    let mut s = [0.0; 6];
    dependency_k3(&orig, &mask, &mut s);
    assert_eq!(s[0], 0.0);
    assert!((s[1] - (2.0 - ln2 - 1.0)).abs() < 1e-15); // d = ln 2
    assert!((s[2] - (0.5 + ln2 - 1.0)).abs() < 1e-15); // d = -ln 2
    assert_eq!(s[3], 10.0); // d clamps to 20, score caps at 10
    assert_eq!(s[4], 10.0); // d = 50 -> 20
                            // d = -37 clamps to -20: exp(-20) + 20 - 1 = 19.000000002 -> capped at 10.
    assert_eq!(s[5], 10.0);
}

#[test]
fn topk_counts_follow_the_reference_rounding() {
    assert_eq!(topk_count(0, 0.4), 0);
    assert_eq!(topk_count(1, 0.4), 1);
    assert_eq!(topk_count(3, 0.4), 2);
    assert_eq!(topk_count(5, 0.4), 2);
    assert_eq!(topk_count(10, 0.4), 4);
    assert_eq!(topk_count(15, 0.4), 6);
    // The reference multiplies an f32 tensor by the ratio, so the product is
    // rounded in f32: 50 * 0.3 is 15 in f64 but 15.000000953674316 in f32
    // (values from Python with struct-packed f32), hence 16 tokens.
    assert_eq!(topk_count(50, 0.3), 16);
    assert_eq!(topk_count(25, 0.6), 16);
    assert_eq!(topk_count(7, 1.0), 7);
    assert_eq!(topk_count(7, 0.0), 0);
}

#[test]
fn topk_selects_largest_scores_per_response() {
    // Three responses: [5 tokens], [1 token], [4 tokens with ties and a NaN].
    let scores = [0.1, 0.9, 0.3, 0.9, 0.0, 2.0, 1.0, f64::NAN, 1.0, 0.5];
    let cu = [0, 5, 6, 10];
    let mut mask = [7.0; 10];
    topk_select_mask(&scores, &cu, 0.4, &mut mask).unwrap();
    // k = 2: both 0.9s. k = 1: the only token. k = 2: the two 1.0s, NaN last.
    assert_eq!(mask, [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]);
    // Ties beyond k go to the earlier position.
    let mut mask = [0.0; 4];
    topk_select_mask(&[1.0, 1.0, 1.0, 1.0], &[0, 4], 0.5, &mut mask).unwrap();
    assert_eq!(mask, [1.0, 1.0, 0.0, 0.0]);
    // Random rows against a rank-counting formulation.
    let mut r = rng(17);
    let lens = [1usize, 2, 7, 33, 100];
    let scores: Vec<f64> = (0..lens.iter().sum())
        .map(|_| r.random_range(0..5) as f64)
        .collect();
    let cu: Vec<i32> = std::iter::once(0)
        .chain(lens.iter().scan(0, |s, &l| {
            *s += l as i32;
            Some(*s)
        }))
        .collect();
    let mut mask = vec![0.0; scores.len()];
    topk_select_mask(&scores, &cu, 0.4, &mut mask).unwrap();
    let mut start = 0;
    for &len in &lens {
        let row = &scores[start..start + len];
        let k = (len as f32 * 0.4).ceil() as usize;
        for i in 0..len {
            let rank = (0..len)
                .filter(|&j| row[j] > row[i] || (row[j] == row[i] && j < i))
                .count();
            assert_eq!(mask[start + i], if rank < k { 1.0 } else { 0.0 });
        }
        assert_eq!(mask[start..start + len].iter().sum::<f64>() as usize, k);
        start += len;
    }
    assert!(matches!(
        topk_select_mask(&scores, &[0, 3], 0.4, &mut mask),
        Err(OpError::BadSeqlens { .. })
    ));
}

/// torch.optim.AdamW's update, written out in f64.
fn naive_adamw(cfg: &AdamWConfig, steps: &[Vec<f64>], p0: &[f64]) -> Vec<f64> {
    let mut p = p0.to_vec();
    let mut m = vec![0.0; p.len()];
    let mut v = vec![0.0; p.len()];
    for (t, g) in steps.iter().enumerate() {
        let t = (t + 1) as i32;
        for i in 0..p.len() {
            p[i] *= 1.0 - cfg.lr * cfg.weight_decay;
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g[i];
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
            let m_hat = m[i] / (1.0 - cfg.beta1.powi(t));
            let denom = (v[i] / (1.0 - cfg.beta2.powi(t))).sqrt() + cfg.eps;
            p[i] -= cfg.lr * m_hat / denom;
        }
    }
    p
}

#[test]
fn adamw_matches_torch_formula_over_several_steps() {
    let mut r = rng(18);
    let cfg = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let n = 1000;
    let p0 = randn(&mut r, n, 1.0);
    let grads: Vec<Vec<f64>> = (0..5).map(|_| randn(&mut r, n, 1.0)).collect();
    let mut p: Vec<f32> = p0.iter().map(|&v| v as f32).collect();
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut model = vec![bf16::ZERO; n];
    for (t, g) in grads.iter().enumerate() {
        let g32: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        adamw_step(
            &cfg,
            t as u64 + 1,
            &mut p,
            &g32,
            &mut m,
            &mut v,
            Some(&mut model),
        );
    }
    let want = naive_adamw(&cfg, &grads, &p0);
    let got: Vec<f64> = p.iter().map(|&x| x as f64).collect();
    let e = rel_err(&got, &want);
    assert!(e < 1e-6, "adamw rel err {e}");
    for (w, &pp) in model.iter().zip(&p) {
        assert_eq!(*w, bf16::from_f32(pp));
    }
    // First step by hand: m_hat = g, v_hat = g^2, so the update is
    // lr * g / (|g| + eps), i.e. lr * sign(g), after the decay.
    let cfg = AdamWConfig {
        lr: 0.1,
        weight_decay: 0.5,
        eps: 0.0,
        ..AdamWConfig::default()
    };
    let mut p = vec![2.0f32, -1.0];
    let (mut m, mut v) = (vec![0.0f32; 2], vec![0.0f32; 2]);
    adamw_step(&cfg, 1, &mut p, &[3.0, -0.25], &mut m, &mut v, None);
    assert!((p[0] - (2.0 * 0.95 - 0.1)).abs() < 1e-6, "{}", p[0]);
    assert!((p[1] - (-0.95 + 0.1)).abs() < 1e-6, "{}", p[1]);
}

#[test]
fn grad_norm_clipping_scales_only_above_the_limit() {
    let (mut a, mut b) = (vec![3.0f32], vec![0.0f32, 4.0]);
    assert_eq!(global_grad_norm(&[&a, &b]), 5.0);
    let norm = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0);
    assert_eq!(norm, 5.0);
    let coef = 1.0 / (5.0 + 1e-6);
    assert!((a[0] as f64 - 3.0 * coef).abs() < 1e-6);
    assert!((b[1] as f64 - 4.0 * coef).abs() < 1e-6);
    let mut c = vec![0.3f32, 0.4];
    let norm = clip_grad_norm(&mut [&mut c[..]], 1.0);
    assert!((norm - 0.5).abs() < 1e-7);
    assert_eq!(c, vec![0.3, 0.4]);
    let mut d = [f32::NAN, 1.0];
    assert!(clip_grad_norm(&mut [&mut d[..]], 1.0).is_nan());
    assert_eq!(d[1], 1.0);
}

#[test]
fn bf16_casts_round_to_nearest_even() {
    let src = [1.0f32, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5, 1e-40];
    let mut b = vec![bf16::ZERO; src.len()];
    f32_to_bf16(&src, &mut b);
    let mut back = vec![0.0f32; src.len()];
    bf16_to_f32(&b, &mut back);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even gives 1.
    // 1 + 3*2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
    assert_eq!(back, vec![1.0, 1.0, 1.0 + 1.0 / 64.0, -2.5, back[4]]);
    assert!(back[4] > 0.0 && back[4] < 1e-39);
}

#[test]
fn paged_decode_attention_matches_the_last_row_of_causal_attention() {
    use vppo_engine::backend::cpu::paged_attn::{paged_decode_attention, PagedSeq, PagedShape};
    let mut r = rng(19);
    let (hq, hkv, d, bs) = (6usize, 2usize, 8usize, 4usize);
    let lens = [1usize, 5, 9];
    // Scatter each sequence's keys into shuffled cache blocks.
    let blocks_needed: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
    let mut free: Vec<usize> = (0..blocks_needed + 3).rev().collect();
    free.swap(0, 4);
    let slot = hkv * d;
    let mut k_cache = vec![0f32; (blocks_needed + 3) * bs * slot];
    let mut v_cache = k_cache.clone();
    let mut tables = Vec::new();
    let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
    for &len in &lens {
        let k = randn(&mut r, len * slot, 1.0);
        let v = randn(&mut r, len * slot, 1.0);
        let table: Vec<usize> = (0..len.div_ceil(bs)).map(|_| free.pop().unwrap()).collect();
        for i in 0..len {
            let at = (table[i / bs] * bs + i % bs) * slot;
            for j in 0..slot {
                k_cache[at + j] = k[i * slot + j] as f32;
                v_cache[at + j] = v[i * slot + j] as f32;
            }
        }
        // Queries: any for the prefix, the last one is the decode query.
        qs.push(randn(&mut r, len * hq * d, 1.0));
        ks.push(k);
        vs.push(v);
        tables.push(table);
    }
    let seqs: Vec<PagedSeq> = tables
        .iter()
        .zip(&lens)
        .map(|(t, &len)| PagedSeq {
            block_table: t,
            len,
        })
        .collect();
    let q_last: Vec<f32> = qs
        .iter()
        .zip(&lens)
        .flat_map(|(q, &len)| q[(len - 1) * hq * d..].iter().map(|&x| x as f32))
        .collect();
    let shape = PagedShape {
        block_size: bs,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let mut o = vec![f32::NAN; q_last.len()];
    paged_decode_attention(&shape, &q_last, &k_cache, &v_cache, &seqs, &mut o);
    for (b, &len) in lens.iter().enumerate() {
        let cu = [0, len as i32];
        let cfg = VarlenAttention {
            cu_seqlens_q: &cu,
            cu_seqlens_k: &cu,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
            causal: true,
            scale: 1.0 / (d as f64).sqrt(),
        };
        let mut full = vec![0.0; len * hq * d];
        let mut lse = vec![0.0; len * hq];
        attention_fwd(&cfg, &qs[b], &ks[b], &vs[b], &mut full, &mut lse).unwrap();
        let want = &full[(len - 1) * hq * d..];
        let got: Vec<f64> = o[b * hq * d..(b + 1) * hq * d]
            .iter()
            .map(|&x| x as f64)
            .collect();
        assert!(rel_err(&got, want) < 1e-5, "sequence {b}");
    }
}
