//! The reward on hostile input: model output reaches the grader every step,
//! so no string may crash it (stack overflow is an abort, not a panic) or
//! take unbounded time. Every case runs on a thread with a 2 MiB stack, the
//! size of rayon's and the test harness's worker threads.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::process::Command;
use std::time::{Duration, Instant};
use vppo_engine::reward::{grade_answer, grade_response};

/// Slowest a single grade may be (unoptimised test build on a busy CI box).
const MAX_GRADE_TIME: Duration = Duration::from_secs(2);

/// Grades `response` against `answer`, then the two the other way round
/// (each as the ground truth and as the boxed answer), on a 2 MiB stack;
/// returns the first result.
fn grade_on_small_stack(answer: String, response: String) -> bool {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let t = Instant::now();
            let graded = grade_response(&response, &answer).correct;
            // The deep string as the ground truth, and as the boxed answer.
            let _ = grade_response(&format!("\\boxed{{{answer}}}"), &response);
            let _ = grade_answer(&response, &answer);
            let _ = grade_answer(&answer, &response);
            let took = t.elapsed();
            assert!(
                took < MAX_GRADE_TIME * 4,
                "grading {} + {} chars took {took:?}",
                answer.len(),
                response.len()
            );
            graded
        })
        .expect("spawn")
        .join()
        .expect("grading panicked")
}

const OPENERS: &[(&str, &str)] = &[
    ("\\frac{", "}{1}"),
    ("\\sqrt{", "}"),
    ("{", "}"),
    ("(", ")"),
    ("[", "]"),
    ("\\left(", "\\right)"),
    ("\\begin{matrix}", "\\end{matrix}"),
    ("\\(", "\\)"),
    ("\\[", "\\]"),
    ("\\sqrt[3]{", "}"),
    ("\\text{", "}"),
    ("2^{", "}"),
    ("-(", ")"),
    ("\\boxed{", "}"),
];

/// Unary and infix chains that nest in a parser without any bracket.
const CHAINS: &[&str] = &["-", "+", "x^", "x**", "\\sqrt", "\\frac", "-x^", "2^-", "!"];

#[test]
fn the_issue_case_is_graded_zero_not_a_crash() {
    let deep = format!("{}2{}", "\\sqrt{".repeat(9000), "}".repeat(9000));
    assert!(!grade_on_small_stack(deep.clone(), "\\boxed{42}".into()));
    assert!(!grade_on_small_stack(
        "42".into(),
        format!("so \\boxed{{{deep}}}")
    ));
    // The same string on both sides is still right: the reference's first
    // comparison accepts identical answers.
    assert!(grade_on_small_stack(
        deep.clone(),
        format!("\\boxed{{{deep}}}")
    ));
}

#[test]
fn every_kind_of_nesting_ten_thousand_deep_grades_without_a_crash() {
    for (open, close) in OPENERS {
        for closed in [true, false] {
            let n = 10_000;
            let mut s = open.repeat(n);
            s.push('1');
            if closed {
                s.push_str(&close.repeat(n));
            }
            for response in [format!("\\boxed{{{s}}}"), s.clone()] {
                assert!(!grade_on_small_stack("7".into(), response), "{open:?} x{n}");
            }
        }
    }
    for chain in CHAINS {
        let s = format!("{}2", chain.repeat(20_000));
        assert!(!grade_on_small_stack("7".into(), format!("\\boxed{{{s}}}")));
        assert!(!grade_on_small_stack(s, "\\boxed{7}".into()));
    }
}

/// Random mixtures of openers, closers, chains and atoms.
fn random_latex(rng: &mut StdRng, len: usize) -> String {
    const ATOMS: &[&str] = &[
        "x",
        "1",
        "2.5",
        "\\pi",
        " ",
        ",",
        "=",
        "\\cdot",
        "*",
        "/",
        "&",
        "\\\\",
        "}",
        ")",
        "]",
        "\\end{matrix}",
        "\\right)",
        "%",
        "$",
        "\\infty",
        "\\%",
        "^\\circ",
        "\\text{ cm}",
    ];
    let mut s = String::new();
    while s.len() < len {
        match rng.random_range(0..10) {
            0..=3 => s.push_str(OPENERS[rng.random_range(0..OPENERS.len())].0),
            4 => s.push_str(OPENERS[rng.random_range(0..OPENERS.len())].1),
            5 => s.push_str(CHAINS[rng.random_range(0..CHAINS.len())]),
            _ => s.push_str(ATOMS[rng.random_range(0..ATOMS.len())]),
        }
    }
    s
}

#[test]
fn random_deep_and_long_latex_never_crashes_and_stays_fast() {
    let mut rng = StdRng::seed_from_u64(18);
    let mut slowest = Duration::ZERO;
    for case in 0..150 {
        // Mostly short (where the parsers really run), sometimes very long.
        let len = if case % 10 == 0 {
            rng.random_range(5_000..60_000)
        } else {
            rng.random_range(1..1_500)
        };
        let a = random_latex(&mut rng, len);
        let short = rng.random_range(1..200);
        let b = random_latex(&mut rng, short);
        let t = Instant::now();
        grade_on_small_stack(b.clone(), format!("\\boxed{{{a}}}"));
        grade_on_small_stack(a.clone(), format!("answer: \\boxed{{{b}}}"));
        let took = t.elapsed();
        slowest = slowest.max(took);
        assert!(
            took < MAX_GRADE_TIME * 8,
            "case {case} ({} chars) took {took:?}",
            a.len()
        );
    }
    eprintln!("slowest random case: {slowest:?}");
}

#[test]
fn the_grade_command_survives_a_deep_answer() {
    let deep = format!("{}2{}", "\\sqrt{".repeat(9000), "}".repeat(9000));
    let out = Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .args(["grade", "--answer", &deep, "--response", "\\boxed{42}"])
        .output()
        .expect("run vppo-engine grade");
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().last(), Some("0"), "{stdout}");
}
