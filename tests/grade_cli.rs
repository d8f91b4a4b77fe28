//! `vppo-engine grade` end to end: the binary prints the extracted answer
//! and, on its last line, the reward.

use std::process::Command;

fn grade(answer: &str, response: &str) -> (String, Vec<String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .args(["grade", "--answer", answer, "--response", response])
        .output()
        .expect("run vppo-engine grade");
    assert!(
        out.status.success(),
        "grade failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    let lines = stdout.lines().map(str::to_string).collect();
    (stdout, lines)
}

#[test]
fn a_correct_answer_scores_one() {
    let (stdout, lines) = grade("\\frac{1}{2}", "<think>half</think> so \\boxed{0.5}.");
    assert!(
        stdout.contains("0.5"),
        "the extracted answer is shown: {stdout}"
    );
    assert_eq!(lines.last().map(String::as_str), Some("1"));
}

#[test]
fn a_wrong_answer_scores_zero() {
    let (stdout, lines) = grade("3", "the answer is \\boxed{4}");
    assert!(
        stdout.contains('4'),
        "the extracted answer is shown: {stdout}"
    );
    assert_eq!(lines.last().map(String::as_str), Some("0"));
}

#[test]
fn a_missing_box_is_reported_and_scores_zero() {
    let (stdout, lines) = grade("4", "the answer is 4");
    assert!(
        stdout.to_lowercase().contains("none"),
        "says no answer was found: {stdout}"
    );
    assert_eq!(lines.last().map(String::as_str), Some("0"));
}

/// Every case of the reference grader table whose answer or response starts
/// with `-`, passed the natural way (`--answer -3`, not `--answer=-3`):
/// clap must take them as values, and the reward must be the reference's.
#[test]
fn answers_and_responses_starting_with_a_dash_are_values() {
    #[derive(serde::Deserialize)]
    struct Case {
        response: String,
        ground_truth: String,
        reward: u8,
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/grader/cases.jsonl"
    );
    let text = std::fs::read_to_string(path).expect("grader fixture table");
    let dashed: Vec<Case> = text
        .lines()
        .map(|l| serde_json::from_str::<Case>(l).expect("a JSON case per line"))
        .filter(|c| c.ground_truth.starts_with('-') || c.response.starts_with('-'))
        .collect();
    assert!(
        dashed.len() >= 20,
        "the table has {} dashed cases",
        dashed.len()
    );
    for c in &dashed {
        let (stdout, lines) = grade(&c.ground_truth, &c.response);
        assert_eq!(
            lines.last().map(String::as_str),
            Some(if c.reward == 1 { "1" } else { "0" }),
            "--answer {:?} --response {:?}: {stdout}",
            c.ground_truth,
            c.response
        );
    }
    // A response that itself starts with a dash.
    let (_, lines) = grade("-3", "-3 it is: \\boxed{-3}");
    assert_eq!(lines.last().map(String::as_str), Some("1"));
}
