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
