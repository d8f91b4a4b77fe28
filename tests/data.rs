//! Data sets: parquet (HF `Image`-feature structs, binaries, paths) and
//! JSONL rows, corrupt rows skipped and counted with the row named, prompt
//! building with the recipe suffix and the length limit.

mod common;

use arrow_array::{Array, ArrayRef, BinaryArray, ListArray, RecordBatch, StringArray, StructArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Schema};
use common::fixtures::case_dir;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vppo_engine::data::prompt::{build_prompt, prompt_text, PromptFormat, Skip};
use vppo_engine::data::{open_rows, Columns, ImageSource, RowCounts};
use vppo_engine::pipeline::Pipeline;

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vppo-data-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn png_bytes() -> Vec<u8> {
    std::fs::read(case_dir("single_noresize").join("img0.png")).unwrap()
}

/// Rows: (problem, answer, images as (bytes, path) pairs).
type Row<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    Vec<(Option<Vec<u8>>, Option<&'a str>)>,
);

fn write_parquet(path: &Path, rows: &[Row], problem_col: &str) {
    let problems = StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
    let answers = StringArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
    let items: Vec<&(Option<Vec<u8>>, Option<&str>)> =
        rows.iter().flat_map(|r| r.2.iter()).collect();
    let bytes = BinaryArray::from(items.iter().map(|i| i.0.as_deref()).collect::<Vec<_>>());
    let paths = StringArray::from(items.iter().map(|i| i.1).collect::<Vec<_>>());
    let image = StructArray::from(vec![
        (
            Arc::new(Field::new("bytes", DataType::Binary, true)),
            Arc::new(bytes) as ArrayRef,
        ),
        (
            Arc::new(Field::new("path", DataType::Utf8, true)),
            Arc::new(paths) as ArrayRef,
        ),
    ]);
    let item_field = Arc::new(Field::new("item", image.data_type().clone(), true));
    let images = ListArray::new(
        item_field.clone(),
        OffsetBuffer::from_lengths(rows.iter().map(|r| r.2.len())),
        Arc::new(image),
        None,
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new(problem_col, DataType::Utf8, true),
        Field::new("answer", DataType::Utf8, true),
        Field::new("images", DataType::List(item_field), true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(problems), Arc::new(answers), Arc::new(images)],
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// Builds every row's prompt, returning the counts and the skip messages.
fn run(
    pipeline: &Pipeline,
    path: &Path,
    columns: &Columns,
    format: &PromptFormat,
) -> (RowCounts, Vec<String>, Vec<usize>) {
    let mut counts = RowCounts::default();
    let mut messages = Vec::new();
    let mut lens = Vec::new();
    for row in open_rows(path, columns).unwrap() {
        match row.unwrap() {
            Err(e) => {
                counts.corrupt += 1;
                messages.push(e.to_string());
            }
            Ok(ex) => match build_prompt(pipeline, &ex, format) {
                Ok(input) => {
                    counts.used += 1;
                    lens.push(input.ids.len());
                }
                Err(Skip::Corrupt(e)) => {
                    counts.corrupt += 1;
                    messages.push(e.to_string());
                }
                Err(Skip::TooLong { .. }) => counts.too_long += 1,
            },
        }
    }
    (counts, messages, lens)
}

#[test]
fn parquet_rows_with_bytes_and_paths_and_corrupt_rows() {
    let dir = scratch("parquet");
    std::fs::write(dir.join("pic.png"), png_bytes()).unwrap();
    let png = png_bytes();
    let rows: Vec<Row> = vec![
        (
            Some("<image>How many circles?"),
            Some("3"),
            vec![(Some(png.clone()), None)],
        ),
        (
            Some("Which is larger? <image>"),
            Some("A"),
            vec![(None, Some("pic.png"))],
        ),
        (
            Some("No answer here <image>"),
            None,
            vec![(Some(png.clone()), None)],
        ),
        (
            Some("<image>Broken image"),
            Some("1"),
            vec![(Some(b"not a png".to_vec()), None)],
        ),
        (
            Some("<image><image>Two placeholders"),
            Some("2"),
            vec![(Some(png.clone()), None)],
        ),
        (Some("Text only, no image."), Some("7"), vec![]),
    ];
    let path = dir.join("train.parquet");
    write_parquet(&path, &rows, "problem");
    let pipeline = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let (counts, messages, lens) = run(
        &pipeline,
        &path,
        &Columns::default(),
        &PromptFormat::default(),
    );
    assert_eq!(
        counts,
        RowCounts {
            used: 3,
            corrupt: 3,
            too_long: 0
        }
    );
    assert!(
        messages[0].starts_with("row 2:") && messages[0].contains("answer"),
        "{messages:?}"
    );
    assert!(
        messages[1].starts_with("row 3:") && messages[1].contains("cannot decode"),
        "{messages:?}"
    );
    assert!(
        messages[2].starts_with("row 4:") && messages[2].contains("placeholder"),
        "{messages:?}"
    );
    // A length limit between the text-only prompt and the image prompts.
    let limit = PromptFormat {
        max_prompt_tokens: lens[2],
        ..PromptFormat::default()
    };
    let (counts, _, _) = run(&pipeline, &path, &Columns::default(), &limit);
    assert_eq!((counts.used, counts.too_long), (1, 2));
    // Configurable column names, and a clear error for a missing one.
    let renamed = dir.join("renamed.parquet");
    write_parquet(&renamed, &rows, "question");
    let cols = Columns {
        problem: "question".into(),
        ..Columns::default()
    };
    assert_eq!(
        run(&pipeline, &renamed, &cols, &PromptFormat::default())
            .0
            .used,
        3
    );
    let err = open_rows(&renamed, &Columns::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`problem` not found") && err.contains("question"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn jsonl_rows_with_paths_and_corrupt_rows() {
    let dir = scratch("jsonl");
    std::fs::write(dir.join("pic.png"), png_bytes()).unwrap();
    let path = dir.join("eval.jsonl");
    let lines = [
        serde_json::json!({"problem": "<image>What is it?", "answer": "5", "images": ["pic.png"]}).to_string(),
        "{ broken json".to_string(),
        serde_json::json!({"problem": "<image>Missing file", "answer": "1", "images": ["nope.png"]}).to_string(),
        String::new(),
        serde_json::json!({"problem": "Plain", "answer": 12}).to_string(),
        serde_json::json!({"problem": "Empty answer", "answer": "  "}).to_string(),
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();
    let rows: Vec<_> = open_rows(&path, &Columns::default())
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len(), 5, "blank lines are not rows");
    let first = rows[0].as_ref().unwrap();
    assert_eq!(first.images, vec![ImageSource::Path(dir.join("pic.png"))]);
    assert_eq!(rows[3].as_ref().unwrap().answer, "12");
    let pipeline = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let (counts, messages, _) = run(
        &pipeline,
        &path,
        &Columns::default(),
        &PromptFormat::default(),
    );
    assert_eq!(
        counts,
        RowCounts {
            used: 2,
            corrupt: 3,
            too_long: 0
        }
    );
    assert!(
        messages[0].starts_with("row 1:") && messages[0].contains("JSON"),
        "{messages:?}"
    );
    assert!(
        messages[1].starts_with("row 2:") && messages[1].contains("nope.png"),
        "{messages:?}"
    );
    assert!(messages[2].starts_with("row 5:"), "{messages:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prompts_carry_the_recipe_suffix_after_a_blank_line() {
    let text = prompt_text("<image>Find x.", &PromptFormat::default());
    assert!(text.starts_with("<image>Find x.\n\nYou first think through the reasoning process"));
    assert!(text.ends_with("enclosed within \\boxed{}."));
    let plain = PromptFormat {
        suffix: String::new(),
        ..PromptFormat::default()
    };
    assert_eq!(prompt_text("Find x.", &plain), "Find x.");
    let err = open_rows(Path::new("data.csv"), &Columns::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("unknown data format"), "{err}");
}

/// A Hugging Face data set's shards (a folder or a glob) read as one table
/// in name order, each row addressable by its global index.
#[test]
fn sharded_parquet_folders_and_globs_read_in_name_order() {
    use vppo_engine::data::shards::{shard_paths, Shards};
    let dir = scratch("shards");
    let png = png_bytes();
    let row =
        |p: &'static str| -> Row<'static> { (Some(p), Some("1"), vec![(Some(png.clone()), None)]) };
    // Written out of order; a README sits beside them as on the Hub.
    write_parquet(
        &dir.join("train-00001-of-00002.parquet"),
        &[row("b0"), row("b1")],
        "problem",
    );
    write_parquet(
        &dir.join("train-00000-of-00002.parquet"),
        &[row("a0"), row("a1"), row("a2")],
        "problem",
    );
    std::fs::write(dir.join("README.md"), "# data\n").unwrap();
    write_parquet(
        &dir.join("test-00000-of-00001.parquet"),
        &[row("t0")],
        "problem",
    );
    let problem = |s: &mut Shards, i: u64| s.read(i).unwrap().unwrap().problem;
    let glob = dir.join("train-*.parquet");
    let mut shards = Shards::open(&glob, &Columns::default()).unwrap();
    assert_eq!(shards.len(), 5);
    let all: Vec<String> = (0..5).map(|i| problem(&mut shards, i)).collect();
    assert_eq!(all, ["a0", "a1", "a2", "b0", "b1"]);
    // Any order (a shuffled epoch): backwards reopens the shard.
    assert_eq!(problem(&mut shards, 4), "b1");
    assert_eq!(problem(&mut shards, 1), "a1");
    assert_eq!(problem(&mut shards, 3), "b0");
    let (file, local) = shards.locate(3);
    assert_eq!(
        (file.file_name().unwrap().to_str().unwrap(), local),
        ("train-00001-of-00002.parquet", 0)
    );
    // The folder takes every parquet file (here the test split too), not
    // the README.
    let folder = shard_paths(&dir).unwrap();
    let names: Vec<&str> = folder
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "test-00000-of-00001.parquet",
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet"
        ]
    );
    // A single file is itself; a glob matching nothing is an error naming it.
    let one = dir.join("train-00000-of-00002.parquet");
    assert_eq!(shard_paths(&one).unwrap(), vec![one.clone()]);
    let none = dir.join("valid-*.parquet");
    let err = Shards::open(&none, &Columns::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("valid-*.parquet") && err.contains("no parquet or JSONL file"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
