//! The built-in visual task: counting coloured shapes on a small grid.
//!
//! Each image is a `cells x cells` grid of 28-pixel cells (one merged vision
//! token each, so the answer is spread over every image token). A cell is
//! empty or holds one red, green or blue square or disc. Questions ask for
//! the number of shapes, or of shapes of one colour, so the answer cannot be
//! read from the text alone. Items are a pure function of (seed, index):
//! the data order of a run is reproducible and resumable without state.

use crate::processor::image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Pixels per grid cell: a 2x2 block of 14-pixel patches, one merged token.
pub const CELL: usize = 28;
const BACKGROUND: [u8; 3] = [205, 205, 205];
pub const COLORS: [(&str, [u8; 3]); 3] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 70, 220]),
];

/// One problem: the image, the question about it, and its answer.
#[derive(Debug, Clone)]
pub struct TaskItem {
    pub image: RgbImage,
    pub question: String,
    pub answer: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    color: usize,
    disc: bool,
}

/// The counting task on `cells x cells` grids.
#[derive(Debug, Clone, Copy)]
pub struct CountingTask {
    pub cells: usize,
    pub seed: u64,
}

impl CountingTask {
    pub fn new(cells: usize, seed: u64) -> Self {
        Self { cells, seed }
    }

    pub fn image_size(&self) -> usize {
        self.cells * CELL
    }

    /// Item number `index` of the endless, seeded stream.
    pub fn item(&self, index: u64) -> TaskItem {
        let mut rng = StdRng::seed_from_u64(
            self.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(index.wrapping_mul(0xD1B5_4A32_D192_ED03)),
        );
        let n = self.cells * self.cells;
        // Uniform over the count first, so every answer is equally common.
        let count = rng.random_range(0..=n);
        let mut occupied: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            occupied.swap(i, rng.random_range(0..=i));
        }
        occupied.truncate(count);
        let mut grid: Vec<Option<Shape>> = vec![None; n];
        for &c in &occupied {
            grid[c] = Some(Shape {
                color: rng.random_range(0..COLORS.len()),
                disc: rng.random_bool(0.5),
            });
        }
        let image = self.render(&grid, &mut rng);
        let (question, answer) = if rng.random_bool(0.5) {
            ("How many shapes are there?".to_string(), count)
        } else {
            let color = rng.random_range(0..COLORS.len());
            let k = grid.iter().flatten().filter(|s| s.color == color).count();
            (format!("How many {} shapes are there?", COLORS[color].0), k)
        };
        TaskItem {
            image,
            question,
            answer: answer.to_string(),
        }
    }

    fn render(&self, grid: &[Option<Shape>], rng: &mut StdRng) -> RgbImage {
        let size = self.image_size();
        let mut data = Vec::with_capacity(size * size * 3);
        for _ in 0..size * size {
            data.extend_from_slice(&BACKGROUND);
        }
        for (cell, shape) in grid.iter().enumerate() {
            let Some(shape) = shape else { continue };
            let side = rng.random_range(12..=22usize);
            let (cx0, cy0) = ((cell % self.cells) * CELL, (cell / self.cells) * CELL);
            let x0 = cx0 + rng.random_range(2..=CELL - 2 - side);
            let y0 = cy0 + rng.random_range(2..=CELL - 2 - side);
            let r = side as f32 / 2.0;
            let (mx, my) = (x0 as f32 + r, y0 as f32 + r);
            for y in y0..y0 + side {
                for x in x0..x0 + side {
                    let (dx, dy) = (x as f32 + 0.5 - mx, y as f32 + 0.5 - my);
                    if shape.disc && dx * dx + dy * dy > r * r {
                        continue;
                    }
                    let at = (y * size + x) * 3;
                    data[at..at + 3].copy_from_slice(&COLORS[shape.color].1);
                }
            }
        }
        RgbImage {
            width: size,
            height: size,
            data,
        }
    }

    /// Every text the task can produce (questions and boxed answers), for
    /// training the built-in tokenizer.
    pub fn corpus(&self) -> Vec<String> {
        let mut out = vec!["How many shapes are there?".to_string()];
        for (name, _) in COLORS {
            out.push(format!("How many {name} shapes are there?"));
        }
        for k in 0..=self.cells * self.cells {
            out.push(format!("\\boxed{{{k}}}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_colored_cells(task: &CountingTask, img: &RgbImage, color: Option<[u8; 3]>) -> usize {
        let size = task.image_size();
        (0..task.cells * task.cells)
            .filter(|cell| {
                let (cx, cy) = ((cell % task.cells) * CELL, (cell / task.cells) * CELL);
                (cy..cy + CELL).any(|y| {
                    (cx..cx + CELL).any(|x| {
                        let p = &img.data[(y * size + x) * 3..(y * size + x) * 3 + 3];
                        match color {
                            Some(c) => p == c,
                            None => p != BACKGROUND,
                        }
                    })
                })
            })
            .count()
    }

    #[test]
    fn answers_match_the_pixels() {
        let task = CountingTask::new(2, 7);
        let mut seen = [0usize; 5];
        for i in 0..200 {
            let item = task.item(i);
            let color = COLORS
                .iter()
                .find(|(name, _)| item.question.contains(&format!(" {name} ")))
                .map(|c| c.1);
            let expected = count_colored_cells(&task, &item.image, color);
            assert_eq!(
                item.answer,
                expected.to_string(),
                "item {i}: {}",
                item.question
            );
            seen[expected] += 1;
        }
        assert!(seen.iter().all(|&s| s > 0), "every count occurs: {seen:?}");
    }

    #[test]
    fn items_are_a_function_of_seed_and_index() {
        let a = CountingTask::new(2, 3);
        assert_eq!(a.item(5).image.data, a.item(5).image.data);
        assert_ne!(a.item(5).image.data, a.item(6).image.data);
        assert_ne!(
            a.item(5).image.data,
            CountingTask::new(2, 4).item(5).image.data
        );
    }
}
