//! Every backward of the CPU op library against f64 central finite
//! differences, at random shapes including odd sizes, length-1 sequences and
//! GQA ratios above 1. The loss is `sum(w * op(x))` with a random `w`, so the
//! backward receives `w` as its upstream gradient.

mod common;

use common::{check_gradient, dot, randn, rng};
use rand::Rng;
use vppo_engine::backend::cpu::activations::{gelu_bwd, gelu_fwd, swiglu_bwd, swiglu_fwd};
use vppo_engine::backend::cpu::embedding::{embedding_bwd, embedding_fwd};
use vppo_engine::backend::cpu::flash_attn::{attention_bwd, attention_fwd, VarlenAttention};
use vppo_engine::backend::cpu::linear::{linear_bwd, linear_fwd};
use vppo_engine::backend::cpu::logprob::{token_logprob_bwd, token_logprob_fwd};
use vppo_engine::backend::cpu::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use vppo_engine::backend::cpu::rope::{rope_bwd, rope_fwd, RopeTable};
use vppo_engine::backend::cpu::softmax_kl::{softmax_kl_bwd, softmax_kl_fwd};

const PROBES: usize = 48;

#[test]
fn linear_backward_matches_finite_differences() {
    let mut r = rng(1);
    // (tokens, in, out); the last is large enough for the parallel GEMM path.
    for &(t, i, o) in &[(1, 1, 1), (1, 7, 3), (3, 5, 7), (17, 33, 9), (130, 70, 40)] {
        for with_bias in [false, true] {
            let x = randn(&mut r, t * i, 1.0);
            let w = randn(&mut r, o * i, 1.0);
            let b = randn(&mut r, o, 1.0);
            let up = randn(&mut r, t * o, 1.0);
            let bias = with_bias.then_some(b.as_slice());
            let fwd = |x: &[f64], w: &[f64], b: Option<&[f64]>| {
                let mut y = vec![0.0; t * o];
                linear_fwd(x, w, b, t, i, o, &mut y);
                dot(&up, &y)
            };
            let mut dx = vec![0.0; t * i];
            // Parameter grads accumulate: start from a known offset.
            let mut dw = vec![0.5; o * i];
            let mut db = vec![0.25; o];
            linear_bwd(
                &up,
                &x,
                &w,
                t,
                i,
                o,
                Some(&mut dx),
                &mut dw,
                with_bias.then_some(&mut db[..]),
            );
            dw.iter_mut().for_each(|v| *v -= 0.5);
            db.iter_mut().for_each(|v| *v -= 0.25);
            check_gradient("linear.dx", &x, &dx, |x| fwd(x, &w, bias), &mut r, PROBES);
            check_gradient("linear.dw", &w, &dw, |w| fwd(&x, w, bias), &mut r, PROBES);
            if with_bias {
                check_gradient(
                    "linear.db",
                    &b,
                    &db,
                    |b| fwd(&x, &w, Some(b)),
                    &mut r,
                    PROBES,
                );
            } else {
                assert!(
                    db.iter().all(|&v| v == 0.0),
                    "bias grad touched without a bias"
                );
            }
        }
    }
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let mut r = rng(2);
    for &(rows, dim) in &[(1, 1), (1, 7), (5, 16), (33, 129)] {
        let x = randn(&mut r, rows * dim, 2.0);
        let w = randn(&mut r, dim, 1.5);
        let up = randn(&mut r, rows * dim, 1.0);
        let eps = 1e-6;
        let fwd = |x: &[f64], w: &[f64]| {
            let mut y = vec![0.0; rows * dim];
            let mut rstd = vec![0.0; rows];
            rmsnorm_fwd(x, w, dim, eps, &mut y, &mut rstd);
            dot(&up, &y)
        };
        let mut y = vec![0.0; rows * dim];
        let mut rstd = vec![0.0; rows];
        rmsnorm_fwd(&x, &w, dim, eps, &mut y, &mut rstd);
        let mut dx = vec![0.0; rows * dim];
        let mut dw = vec![0.0; dim];
        rmsnorm_bwd(&up, &x, &w, &rstd, dim, &mut dx, &mut dw);
        check_gradient("rmsnorm.dx", &x, &dx, |x| fwd(x, &w), &mut r, PROBES);
        check_gradient("rmsnorm.dw", &w, &dw, |w| fwd(&x, w), &mut r, PROBES);
    }
}

#[test]
fn swiglu_and_gelu_backward_match_finite_differences() {
    let mut r = rng(3);
    for &n in &[1usize, 7, 300] {
        let a = randn(&mut r, n, 4.0);
        let b = randn(&mut r, n, 2.0);
        let up = randn(&mut r, n, 1.0);
        let swiglu = |a: &[f64], b: &[f64]| {
            let mut h = vec![0.0; n];
            swiglu_fwd(a, b, &mut h);
            dot(&up, &h)
        };
        let mut da = vec![0.0; n];
        let mut db = vec![0.0; n];
        swiglu_bwd(&up, &a, &b, &mut da, &mut db);
        check_gradient("swiglu.dgate", &a, &da, |a| swiglu(a, &b), &mut r, PROBES);
        check_gradient("swiglu.dup", &b, &db, |b| swiglu(&a, b), &mut r, PROBES);

        let gelu = |x: &[f64]| {
            let mut y = vec![0.0; n];
            gelu_fwd(x, &mut y);
            dot(&up, &y)
        };
        let mut dx = vec![0.0; n];
        gelu_bwd(&up, &a, &mut dx);
        check_gradient("gelu.dx", &a, &dx, gelu, &mut r, PROBES);
    }
}

fn check_rope(name: &str, table: &RopeTable<f64>, heads: usize, r: &mut rand::rngs::StdRng) {
    let n = table.tokens * heads * 2 * table.half;
    let x = randn(r, n, 1.0);
    let up = randn(r, n, 1.0);
    let mut dx = vec![0.0; n];
    rope_bwd(table, &up, heads, &mut dx);
    let loss = |x: &[f64]| {
        let mut y = vec![0.0; n];
        rope_fwd(table, x, heads, &mut y);
        dot(&up, &y)
    };
    check_gradient(name, &x, &dx, loss, r, PROBES);
}

#[test]
fn rope_backward_matches_finite_differences_for_all_layouts() {
    let mut r = rng(4);
    let pos: Vec<i32> = (0..5).map(|_| r.random_range(0..4000)).collect();
    check_rope("rope1d", &RopeTable::text_1d(&pos, 8, 10000.0), 3, &mut r);
    check_rope(
        "rope1d.len1",
        &RopeTable::text_1d(&[7], 128, 1e6),
        2,
        &mut r,
    );
    let t: Vec<i32> = (0..4).collect();
    let h: Vec<i32> = vec![0, 1, 1, 2];
    let w: Vec<i32> = vec![0, 0, 1, 3];
    check_rope(
        "mrope",
        &RopeTable::mrope([&t, &h, &w], [2, 3, 3], 16, 1e6),
        2,
        &mut r,
    );
    check_rope(
        "mrope.qwen",
        &RopeTable::mrope([&t, &h, &w], [16, 24, 24], 128, 1e6),
        1,
        &mut r,
    );
    check_rope(
        "vision2d",
        &RopeTable::vision_2d(&h, &w, 80, 10000.0),
        2,
        &mut r,
    );
}

struct AttnCase {
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
}

fn cu(lens: &[usize]) -> Vec<i32> {
    let mut out = vec![0i32];
    for &l in lens {
        out.push(out.last().unwrap() + l as i32);
    }
    out
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut r = rng(5);
    let cases = [
        // length-1 sequences, bidirectional, plain MHA
        AttnCase {
            q_lens: vec![1, 3, 1],
            k_lens: vec![1, 3, 1],
            q_heads: 2,
            kv_heads: 2,
            head_dim: 4,
            causal: false,
        },
        // causal GQA ratio 2, odd sizes
        AttnCase {
            q_lens: vec![5, 2],
            k_lens: vec![5, 2],
            q_heads: 4,
            kv_heads: 2,
            head_dim: 6,
            causal: true,
        },
        // GQA ratio 3, head_dim 80 (vision), bidirectional windows
        AttnCase {
            q_lens: vec![4, 3],
            k_lens: vec![4, 3],
            q_heads: 3,
            kv_heads: 1,
            head_dim: 80,
            causal: false,
        },
        // head_dim 128 (text), causal, queries fewer than keys (decode-like)
        AttnCase {
            q_lens: vec![2, 1],
            k_lens: vec![4, 3],
            q_heads: 2,
            kv_heads: 1,
            head_dim: 128,
            causal: true,
        },
        // more queries than keys: the first queries see nothing
        AttnCase {
            q_lens: vec![4],
            k_lens: vec![2],
            q_heads: 1,
            kv_heads: 1,
            head_dim: 5,
            causal: true,
        },
        // longer than one query block (64 rows), causal GQA
        AttnCase {
            q_lens: vec![70],
            k_lens: vec![70],
            q_heads: 2,
            kv_heads: 1,
            head_dim: 8,
            causal: true,
        },
    ];
    for c in &cases {
        let cq = cu(&c.q_lens);
        let ck = cu(&c.k_lens);
        let tq: usize = c.q_lens.iter().sum();
        let tk: usize = c.k_lens.iter().sum();
        let cfg = VarlenAttention {
            cu_seqlens_q: &cq,
            cu_seqlens_k: &ck,
            q_heads: c.q_heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            causal: c.causal,
            scale: 1.0 / (c.head_dim as f64).sqrt(),
        };
        let q = randn(&mut r, tq * c.q_heads * c.head_dim, 1.5);
        let k = randn(&mut r, tk * c.kv_heads * c.head_dim, 1.5);
        let v = randn(&mut r, tk * c.kv_heads * c.head_dim, 1.0);
        let up = randn(&mut r, q.len(), 1.0);
        let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
            let mut o = vec![0.0; q.len()];
            let mut lse = vec![0.0; tq * c.q_heads];
            attention_fwd(&cfg, q, k, v, &mut o, &mut lse).unwrap();
            dot(&up, &o)
        };
        let mut o = vec![0.0; q.len()];
        let mut lse = vec![0.0; tq * c.q_heads];
        attention_fwd(&cfg, &q, &k, &v, &mut o, &mut lse).unwrap();
        let mut dq = vec![f64::NAN; q.len()];
        let mut dk = vec![f64::NAN; k.len()];
        let mut dv = vec![f64::NAN; v.len()];
        attention_bwd(&cfg, &q, &k, &v, &o, &lse, &up, &mut dq, &mut dk, &mut dv).unwrap();
        let tag = format!(
            "attn(q{:?} k{:?} h{}/{} d{} causal={})",
            c.q_lens, c.k_lens, c.q_heads, c.kv_heads, c.head_dim, c.causal
        );
        check_gradient(
            &format!("{tag}.dq"),
            &q,
            &dq,
            |q| fwd(q, &k, &v),
            &mut r,
            PROBES,
        );
        check_gradient(
            &format!("{tag}.dk"),
            &k,
            &dk,
            |k| fwd(&q, k, &v),
            &mut r,
            PROBES,
        );
        check_gradient(
            &format!("{tag}.dv"),
            &v,
            &dv,
            |v| fwd(&q, &k, v),
            &mut r,
            PROBES,
        );
    }
}

#[test]
fn embedding_backward_matches_finite_differences() {
    let mut r = rng(6);
    let (vocab, dim) = (11, 5);
    let ids: Vec<u32> = vec![3, 0, 3, 10, 7, 3]; // repeated ids must add up
    let table = randn(&mut r, vocab * dim, 1.0);
    let up = randn(&mut r, ids.len() * dim, 1.0);
    let mut dtable = vec![0.0; vocab * dim];
    embedding_bwd(&ids, &up, dim, &mut dtable).unwrap();
    let loss = |t: &[f64]| {
        let mut out = vec![0.0; ids.len() * dim];
        embedding_fwd(&ids, t, dim, &mut out).unwrap();
        dot(&up, &out)
    };
    check_gradient("embedding.dtable", &table, &dtable, loss, &mut r, 1000);
}

#[test]
fn token_logprob_backward_matches_finite_differences() {
    let mut r = rng(7);
    for &(rows, vocab) in &[(1, 1), (1, 2), (4, 9), (3, 257)] {
        let logits = randn(&mut r, rows * vocab, 3.0);
        let targets: Vec<u32> = (0..rows).map(|_| r.random_range(0..vocab as u32)).collect();
        let w_lp = randn(&mut r, rows, 1.0);
        let w_ent = randn(&mut r, rows, 1.0);
        let loss = |z: &[f64]| {
            let (mut lp, mut ent, mut lse) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
            token_logprob_fwd(z, vocab, &targets, &mut lp, &mut ent, &mut lse).unwrap();
            dot(&w_lp, &lp) + dot(&w_ent, &ent)
        };
        let (mut lp, mut ent, mut lse) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
        token_logprob_fwd(&logits, vocab, &targets, &mut lp, &mut ent, &mut lse).unwrap();
        let mut dz = vec![0.0; rows * vocab];
        token_logprob_bwd(&logits, vocab, &targets, &lse, &ent, &w_lp, &w_ent, &mut dz);
        check_gradient("logprob.dlogits", &logits, &dz, loss, &mut r, PROBES);
    }
}

#[test]
fn softmax_kl_backward_matches_finite_differences() {
    let mut r = rng(8);
    for &(rows, vocab) in &[(1, 1), (1, 3), (5, 17), (2, 300)] {
        let zp = randn(&mut r, rows * vocab, 3.0);
        let zq = randn(&mut r, rows * vocab, 3.0);
        let up = randn(&mut r, rows, 1.0);
        let loss = |zp: &[f64], zq: &[f64]| {
            let (mut kl, mut lp, mut lq) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
            softmax_kl_fwd(zp, zq, vocab, &mut kl, &mut lp, &mut lq);
            dot(&up, &kl)
        };
        let (mut kl, mut lp, mut lq) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
        softmax_kl_fwd(&zp, &zq, vocab, &mut kl, &mut lp, &mut lq);
        let mut dp = vec![0.0; rows * vocab];
        let mut dq = vec![0.0; rows * vocab];
        softmax_kl_bwd(&zp, &zq, vocab, &lp, &lq, &kl, &up, &mut dp, &mut dq);
        check_gradient("kl.dlogits_p", &zp, &dp, |z| loss(z, &zq), &mut r, PROBES);
        check_gradient("kl.dlogits_q", &zq, &dq, |z| loss(&zp, z), &mut r, PROBES);
    }
}
