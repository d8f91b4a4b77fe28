//! The per-response top-k mask against `cpu::topk_select`.

use crate::{cuda, drv, random, Case};
use rand::Rng;
use vppo_engine::backend::cpu;

fn topk_case(lens: Vec<usize>, ratio: f32, ties: bool) -> Case {
    Case {
        name: format!(
            "topk_select lens={lens:?} ratio={ratio}{}",
            if ties { " ties+NaN" } else { "" }
        ),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let total: usize = lens.iter().sum();
            let mut scores: Vec<f32> = if ties {
                (0..total).map(|_| rng.random_range(0..4) as f32).collect()
            } else {
                random(rng, total, 10.0)
            };
            if ties && total > 2 {
                scores[total / 2] = f32::NAN;
            }
            let mut cu = vec![0i32];
            for &l in &lens {
                cu.push(cu.last().unwrap() + l as i32);
            }
            let mut want = vec![0.0f32; total];
            cpu::topk_select::topk_select_mask(&scores, &cu, ratio, &mut want)
                .map_err(|e| e.to_string())?;
            let (sc_d, cu_d) = (
                s.clone_htod(&scores).map_err(drv)?,
                s.clone_htod(&cu).map_err(drv)?,
            );
            let mut mask_d = s.clone_htod(&vec![f32::NAN; total]).map_err(drv)?;
            gpu.topk_select_mask(&sc_d, &cu_d, lens.len(), ratio, &mut mask_d)
                .map_err(cuda)?;
            let got = s.clone_dtoh(&mask_d).map_err(drv)?;
            match got.iter().zip(&want).position(|(a, b)| a != b) {
                None => Ok(format!(
                    "{} of {total} selected, exact",
                    want.iter().filter(|&&v| v == 1.0).count()
                )),
                Some(i) => Err(format!(
                    "mask differs at {i}: gpu {} cpu {}",
                    got[i], want[i]
                )),
            }
        }),
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        topk_case(vec![1], 0.4, false),
        topk_case(vec![1, 5, 1023, 1024, 1025], 0.4, false),
        topk_case(vec![2048, 4097, 3], 0.4, true),
        topk_case(vec![50, 25, 7], 0.3, true),
    ]
}
