//! A custom reward from an external program (`reward_command`, EasyR1's
//! `reward_function=file.py:fn`): for each rollout batch the command runs
//! once (through `sh -c`), reads one JSON object per response on stdin
//! (`index`, `problem`, `answer`, `response`) and writes one JSON object
//! per response back, in order, each with a numeric `score`; other numeric
//! keys are averaged over the batch and logged as `reward/<key>`. A reply
//! that is missing, late, not JSON or without a finite score stops the run
//! with the row it is about.

use super::step::{Prompt, RewardFn, Scored, StepError};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct RewardCommand {
    pub command: String,
    /// Longest a batch may take, from start to the last reply.
    pub timeout: Duration,
}

fn fail(msg: String) -> StepError {
    StepError::Reward(msg)
}

impl RewardCommand {
    /// The program's replies, one per request line, into `replies`; on
    /// failure the replies before it stay there (a bad one among them is
    /// the clearer error).
    fn replies(&self, requests: &[String], replies: &mut Vec<String>) -> Result<(), StepError> {
        let cmd = &self.command;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| fail(format!("`{cmd}` could not start: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let input = requests.join("\n") + "\n";
        // Writing and reading on their own threads: a program that answers
        // line by line would otherwise fill a pipe and deadlock with us.
        let writer = std::thread::spawn(move || {
            let r = stdin.write_all(input.as_bytes());
            drop(stdin);
            r
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + self.timeout;
        while replies.len() < requests.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(line)) if line.trim().is_empty() => {}
                Ok(Ok(line)) => replies.push(line),
                Ok(Err(e)) => {
                    let _ = child.kill();
                    return Err(fail(format!("`{cmd}`: reading its output: {e}")));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!(
                        "`{cmd}` answered {} of {} responses within reward_timeout_s = {}; \
                         no reply for row {}",
                        replies.len(),
                        requests.len(),
                        self.timeout.as_secs_f64(),
                        replies.len()
                    )));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(fail(format!(
                        "`{cmd}` ended ({status}) after {} of {} replies; no reply for row {}",
                        replies.len(),
                        requests.len(),
                        replies.len()
                    )));
                }
            }
        }
        let _ = writer.join();
        let status = child.wait().map_err(|e| fail(format!("`{cmd}`: {e}")))?;
        if !status.success() {
            return Err(fail(format!("`{cmd}` failed ({status}) after replying")));
        }
        Ok(())
    }
}

/// One reply: its score and its other numeric keys.
fn parse_reply(line: &str, row: usize) -> Result<(f32, Vec<(String, f64)>), String> {
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| format!("row {row}: the reply `{line}` is not JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("row {row}: the reply `{line}` is not a JSON object"))?;
    let score = obj
        .get("score")
        .and_then(serde_json::Value::as_f64)
        .filter(|s| s.is_finite())
        .ok_or_else(|| format!("row {row}: the reply `{line}` has no finite numeric \"score\""))?;
    let extra = obj
        .iter()
        .filter(|(k, _)| k.as_str() != "score")
        .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
        .collect();
    Ok((score as f32, extra))
}

impl RewardFn for RewardCommand {
    fn score(
        &self,
        prompts: &[Prompt],
        responses: &[(usize, String)],
    ) -> Result<Scored, StepError> {
        let requests: Vec<String> = responses
            .iter()
            .enumerate()
            .map(|(i, (p, text))| {
                serde_json::json!({
                    "index": i,
                    "problem": prompts[*p].problem,
                    "answer": prompts[*p].answer,
                    "response": text,
                })
                .to_string()
            })
            .collect();
        let mut replies = Vec::with_capacity(requests.len());
        let failure = self.replies(&requests, &mut replies).err();
        let mut scores = Vec::with_capacity(replies.len());
        // Extra keys: their mean over the replies that carry them, in the
        // order they first appear.
        let mut sums: Vec<(String, f64, usize)> = Vec::new();
        for (row, line) in replies.iter().enumerate() {
            let (score, extra) =
                parse_reply(line, row).map_err(|e| fail(format!("`{}`: {e}", self.command)))?;
            scores.push(score);
            for (k, x) in extra {
                match sums.iter_mut().find(|(name, ..)| *name == k) {
                    Some(entry) => {
                        entry.1 += x;
                        entry.2 += 1;
                    }
                    None => sums.push((k, x, 1)),
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let extra = sums
            .into_iter()
            .map(|(k, sum, n)| (format!("reward/{k}"), sum / n as f64))
            .collect();
        Ok(Scored {
            rewards: scores,
            extra,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompts() -> Vec<Prompt> {
        ["3", "-1"]
            .iter()
            .map(|a| Prompt {
                input: Default::default(),
                answer: a.to_string(),
                problem: format!("what is {a}?"),
            })
            .collect()
    }

    fn responses() -> Vec<(usize, String)> {
        vec![
            (0, "it is 3".into()),
            (0, "it is 4".into()),
            (1, "-1, surely".into()),
        ]
    }

    fn command(cmd: &str, timeout_s: f64) -> RewardCommand {
        RewardCommand {
            command: cmd.into(),
            timeout: Duration::from_secs_f64(timeout_s),
        }
    }

    /// A small reward program in Python: 1 when the answer is in the
    /// response, and its length as an extra metric.
    #[test]
    fn a_program_scores_every_response_in_order_with_extra_metrics() {
        let dir = std::env::temp_dir().join(format!("vppo-reward-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("my_reward.py");
        std::fs::write(
            &script,
            "import json, sys\n\
             for line in sys.stdin:\n\
             \x20   r = json.loads(line)\n\
             \x20   ok = r['answer'] in r['response'] and r['problem'].startswith('what')\n\
             \x20   print(json.dumps({'score': 1.0 if ok else 0.0, 'length': len(r['response']), 'index': r['index']}), flush=True)\n",
        )
        .unwrap();
        let reward = command(&format!("python3 {}", script.display()), 30.0);
        let Scored {
            rewards: scores,
            extra,
        } = reward.score(&prompts(), &responses()).unwrap();
        assert_eq!(scores, vec![1.0, 0.0, 1.0]);
        assert_eq!(
            extra,
            vec![
                ("reward/index".to_string(), 1.0),
                ("reward/length".to_string(), (7.0 + 7.0 + 10.0) / 3.0)
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_missing_and_late_replies_are_clear_errors() {
        let err = command("read l; echo oops", 10.0)
            .score(&prompts(), &responses())
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 0") && err.contains("not JSON"), "{err}");
        let err = command("read l; echo '{\"score\": 1}'", 10.0)
            .score(&prompts(), &responses())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no reply for row 1"), "{err}");
        let started = std::time::Instant::now();
        let err = command("sleep 5", 0.3)
            .score(&prompts(), &responses())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("reward_timeout_s") && err.contains("row 0"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "killed at the timeout"
        );
        let err = command("exit 3", 10.0)
            .score(&prompts(), &responses())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no reply for row 0"), "{err}");
    }

    #[test]
    fn replies_are_checked_and_name_the_row() {
        assert_eq!(
            parse_reply(r#"{"score": 0.5, "format": 1, "note": "x"}"#, 0).unwrap(),
            (0.5, vec![("format".to_string(), 1.0)])
        );
        for (bad, why) in [
            ("not json", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"reward": 1}"#, "\"score\""),
            (r#"{"score": "high"}"#, "\"score\""),
        ] {
            let err = parse_reply(bad, 7).unwrap_err();
            assert!(err.contains("row 7") && err.contains(why), "{bad}: {err}");
        }
    }
}
