//! The accuracy reward of the VPPO recipe: 1 when the last `\boxed{...}` of
//! a response holds an answer equivalent to the ground truth, else 0.
//!
//! It reproduces the reference reward (the VPPO release's math reward
//! function on top of the `mathruler` grader): whitespace around `<`, `>`
//! and `/` is removed from the response, the last `\boxed{` is found and
//! its brace-matched content taken, and the answer is graded in three
//! steps, each of which can accept:
//! 1. MATH-style normalisation ([`mathd`]) of both strings, compared;
//! 2. PRM800K-style normalisation ([`normalize`]), compared;
//! 3. element-wise (for tuples and intervals) symbolic equality
//!    ([`symbolic`]), with the reference's guards: unreduced fractions must
//!    match as written, and an integer must be matched by an integer.
//!
//! Like the reference, a response without a (balanced) box is graded as the
//! literal answer "None", which a ground truth of "None" accepts.

mod latex_text;
mod mathd;
mod normalize;
mod pystr;
mod symbolic;

/// The answer the reference grades when a response has no balanced box.
const NO_ANSWER: &str = "None";

/// The VPPO preprocessing: `re.sub(r"\s*(<|>|/)\s*", r"\1", response)`.
pub fn vppo_preprocess(response: &str) -> String {
    let c: Vec<char> = response.chars().collect();
    let special = |k: usize| {
        c.get(k)
            .is_some_and(|&ch| ch == '<' || ch == '>' || ch == '/')
    };
    let mut out = String::with_capacity(response.len());
    let mut i = 0;
    while i < c.len() {
        if !pystr::is_space(c[i]) {
            out.push(c[i]);
            i += 1;
            continue;
        }
        let start = i;
        while i < c.len() && pystr::is_space(c[i]) {
            i += 1;
        }
        // A whitespace run touching a '<', '>' or '/' on either side goes.
        let touches = special(i) || (start > 0 && special(start - 1));
        if !touches {
            out.extend(&c[start..i]);
        }
    }
    out
}

/// The content of the last `\boxed{...}`, braces matched, surrounding
/// whitespace stripped; `None` when there is no `\boxed{` or its braces do
/// not close.
pub fn extract_boxed(text: &str) -> Option<String> {
    const OPEN: &str = "\\boxed{";
    let start = text.rfind(OPEN)? + OPEN.len();
    let content = &text[start..];
    let mut depth = 0i64;
    for (i, ch) in content.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if depth == -1 {
            return Some(pystr::strip(&content[..i]).to_string());
        }
    }
    None
}

/// Longest answer (either side, in characters) the normalisers and the
/// symbolic stage see: model output is untrusted, and their time and stack
/// grow with the length. A longer answer is right only when it is the
/// ground truth verbatim.
pub const MAX_ANSWER_CHARS: usize = 2000;

/// `grade_answer(given, ground_truth)` of the reference grader. Answers
/// longer than [`MAX_ANSWER_CHARS`] or nested deeper than the parsers read
/// grade as different unless they are identical.
pub fn grade_answer(given: &str, ground_truth: &str) -> bool {
    // The reference's first step compares normalise(given) with
    // normalise(ground_truth): identical strings always pass.
    if given == ground_truth {
        return true;
    }
    if given.chars().count() > MAX_ANSWER_CHARS || ground_truth.chars().count() > MAX_ANSWER_CHARS {
        return false;
    }
    if mathd::normalize_answer(ground_truth) == mathd::normalize_answer(given) {
        return true;
    }
    let truth = normalize::normalize(ground_truth);
    let given = normalize::normalize(given);
    if truth == given {
        return true;
    }
    if given.is_empty() {
        return false;
    }
    let truth_elems = normalize::split_tuple(&truth);
    let given_elems = normalize::split_tuple(&given);
    // Tuples and intervals must open and close with the same brackets.
    if truth_elems.len() > 1
        && (truth.chars().next() != given.chars().next()
            || truth.chars().last() != given.chars().last())
    {
        return false;
    }
    if truth_elems.len() != given_elems.len() {
        return false;
    }
    truth_elems
        .iter()
        .zip(&given_elems)
        .all(|(t, g)| elements_equal(t, g))
}

fn elements_equal(truth: &str, given: &str) -> bool {
    if normalize::is_frac(truth) && normalize::is_frac(given) {
        // An unreduced fraction is not the reduced one.
        return truth == given;
    }
    if normalize::str_is_int(truth) != normalize::str_is_int(given) {
        // An integer answer admits no symbolic leniency.
        return false;
    }
    symbolic::are_equal(truth, given)
}

/// What [`grade_response`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graded {
    /// The boxed answer, if the response has one.
    pub extracted: Option<String>,
    /// Whether it matches the ground truth.
    pub correct: bool,
}

/// The whole reward computation, with the extracted answer kept.
pub fn grade_response(response: &str, ground_truth: &str) -> Graded {
    let text = vppo_preprocess(response);
    let extracted = extract_boxed(&text);
    let answer = extracted.as_deref().unwrap_or(NO_ANSWER);
    let correct = grade_answer(answer, ground_truth);
    Graded { extracted, correct }
}

/// The VPPO accuracy reward: 1.0 or 0.0.
pub fn accuracy_reward(response: &str, ground_truth: &str) -> f32 {
    if grade_response(response, ground_truth).correct {
        1.0
    } else {
        0.0
    }
}

/// The report of `vppo-engine grade`: the extracted answer (or a line saying
/// none was found), then `1` or `0` on the last line.
pub fn grade_report(response: &str, ground_truth: &str) -> String {
    let g = grade_response(response, ground_truth);
    let first = match &g.extracted {
        Some(answer) => format!("extracted: {answer}"),
        None => "extracted: none (no balanced \\boxed{...} in the response)".to_string(),
    };
    format!("{first}\n{}\n", u8::from(g.correct))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_around_angle_brackets_and_slashes_goes() {
        assert_eq!(
            vppo_preprocess("< think >a  /  b</ think >"),
            "<think>a/b</think>"
        );
        assert_eq!(vppo_preprocess("a b\n<c"), "a b<c");
        assert_eq!(vppo_preprocess("x \u{a0}< 3"), "x<3");
    }
}
