//! The Rust accuracy reward against the reference grader (mathruler, as the
//! VPPO reward function calls it) on every case of
//! `tests/fixtures/grader/cases.jsonl`, written by
//! `scripts/fixtures/make_grader_table.py`.

use serde::Deserialize;
use vppo_engine::reward::{accuracy_reward, extract_boxed, grade_response, vppo_preprocess};

#[derive(Deserialize)]
struct Case {
    response: String,
    ground_truth: String,
    extracted: Option<String>,
    reward: u8,
}

/// Cases where the Rust reward knowingly differs from the reference, each
/// with the reason: (response, ground truth, why).
const KNOWN_DIFFERENCES: &[(&str, &str, &str)] = &[
    (
        "<think>\nsteps\n</think>\n\nSo the final answer is $\\boxed{sqrt(-((4)*(4))+(sqrt(a)))}$",
        "\\sqrt{\\sqrt{a}-\\left(4\\right)^2}",
        "the root of a negative number: sympy cancels it as a complex value; the Rust grader \
         treats it as undefined (not equal) at every sample point",
    ),
    (
        "<think>Let me work it out.</think> The answer is \\boxed{(sqrt(-(pi)+(1.5)))+(0.5)}.",
        "0.5+\\sqrt{1.5-\\pi}",
        "the root of a negative number (1.5 - pi): complex in sympy, undefined in the Rust grader",
    ),
];

fn cases() -> Vec<Case> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/grader/cases.jsonl"
    );
    let text = std::fs::read_to_string(path).expect("grader fixture table");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON case per line"))
        .collect()
}

#[test]
fn reward_agrees_with_the_reference_on_every_case() {
    let cases = cases();
    assert!(cases.len() >= 300, "the table is unexpectedly small");
    let mut failures = Vec::new();
    let mut known_seen = 0;
    for c in &cases {
        let graded = grade_response(&c.response, &c.ground_truth);
        let reward = accuracy_reward(&c.response, &c.ground_truth);
        let extracted_ok = graded.extracted == c.extracted;
        let reward_ok = reward == f32::from(c.reward);
        let known = KNOWN_DIFFERENCES
            .iter()
            .any(|(r, g, _)| *r == c.response && *g == c.ground_truth);
        if known {
            known_seen += 1;
            assert!(
                !(extracted_ok && reward_ok),
                "listed as a known difference but agrees now: {:?} vs {:?}",
                c.response,
                c.ground_truth
            );
            continue;
        }
        if !(extracted_ok && reward_ok) {
            failures.push(format!(
                "response {:?} truth {:?}: extracted {:?} (reference {:?}), reward {} (reference {})",
                c.response, c.ground_truth, graded.extracted, c.extracted, reward, c.reward
            ));
        }
    }
    assert_eq!(
        known_seen,
        KNOWN_DIFFERENCES.len(),
        "a known difference is missing from the table"
    );
    println!(
        "agreement: {} of {} cases ({} known differences)",
        cases.len() - failures.len() - known_seen,
        cases.len(),
        known_seen
    );
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_table_exercises_both_rewards_and_missing_boxes() {
    let cases = cases();
    assert!(cases.iter().any(|c| c.reward == 1));
    assert!(cases.iter().filter(|c| c.reward == 0).count() > 50);
    assert!(cases.iter().any(|c| c.extracted.is_none()));
}

#[test]
fn extraction_edge_cases() {
    assert_eq!(extract_boxed("\\boxed{5}"), Some("5".into()));
    assert_eq!(
        extract_boxed("a \\boxed{1} b \\boxed{2} c"),
        Some("2".into())
    );
    assert_eq!(
        extract_boxed("\\boxed{\\frac{1}{2}}"),
        Some("\\frac{1}{2}".into())
    );
    assert_eq!(extract_boxed("\\boxed{{a}{b}}"), Some("{a}{b}".into()));
    assert_eq!(extract_boxed("\\boxed{  x \n}"), Some("x".into()));
    assert_eq!(extract_boxed("\\boxed{}"), Some(String::new()));
    // Unbalanced, absent, or not a \boxed{ opening.
    assert_eq!(extract_boxed("\\boxed{5"), None);
    assert_eq!(extract_boxed("\\boxed{\\frac{1}{2}"), None);
    assert_eq!(extract_boxed("the answer is 5"), None);
    assert_eq!(extract_boxed("\\boxed 5"), None);
    // Only the last box counts, even when an earlier one is complete.
    assert_eq!(extract_boxed("\\boxed{1} and \\boxed{2"), None);
    // A nested box: the last opening is the inner one.
    assert_eq!(extract_boxed("\\boxed{\\boxed{7}}"), Some("7".into()));
    // Text after the closing brace is ignored; a stray closer ends nothing.
    assert_eq!(extract_boxed("\\boxed{4}}"), Some("4".into()));
    // Multi-byte text around and inside.
    assert_eq!(extract_boxed("é \\boxed{π/2} ü"), Some("π/2".into()));
}

#[test]
fn no_box_is_graded_as_the_word_none() {
    // The reference grades its "None" sentinel, so a "None" truth accepts.
    assert_eq!(accuracy_reward("no box at all", "None"), 1.0);
    assert_eq!(accuracy_reward("no box at all", "0"), 0.0);
    assert_eq!(accuracy_reward("\\boxed{3", "3"), 0.0);
}

#[test]
fn preprocessing_happens_before_extraction() {
    let response = "<think> a < b </think> \\boxed{x  <  3}";
    assert_eq!(vppo_preprocess(response), "<think>a<b</think>\\boxed{x<3}");
    assert_eq!(accuracy_reward(response, "x<3"), 1.0);
    assert_eq!(accuracy_reward("\\boxed{1 / 2}", "\\frac{1}{2}"), 1.0);
}
