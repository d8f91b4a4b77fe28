//! A 40,000-row parquet data set with an image per row is read row by row:
//! the heap never holds more than a small fraction of the file (a counting
//! allocator measures the peak while iterating).

use arrow_array::{Array, ArrayRef, BinaryArray, ListArray, RecordBatch, StringArray, StructArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Schema};
use parquet::file::properties::WriterProperties;
use std::sync::Arc;
use vppo_engine::alloc_stats::{peak_bytes, start_peak, CountingAllocator};
use vppo_engine::data::{open_rows, Columns};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const ROWS: usize = 40_000;
const IMAGE_BYTES: usize = 2_000;
/// Rows per row group, as Hugging Face writes image data sets.
const ROW_GROUP: usize = 100;

#[test]
fn a_40k_row_image_set_streams_in_bounded_memory() {
    let path = std::env::temp_dir().join(format!("vppo-stream-{}.parquet", std::process::id()));
    let item = Field::new(
        "item",
        DataType::Struct(
            vec![
                Field::new("bytes", DataType::Binary, true),
                Field::new("path", DataType::Utf8, true),
            ]
            .into(),
        ),
        true,
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("problem", DataType::Utf8, false),
        Field::new("answer", DataType::Utf8, false),
        Field::new("images", DataType::List(Arc::new(item.clone())), true),
    ]));
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(ROW_GROUP))
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&path).unwrap(),
        schema.clone(),
        Some(props),
    )
    .unwrap();
    for chunk in 0..ROWS / 1000 {
        let problems = StringArray::from(
            (0..1000)
                .map(|i| format!("<image>Problem {}", chunk * 1000 + i))
                .collect::<Vec<_>>(),
        );
        let answers =
            StringArray::from((0..1000).map(|i| format!("{}", i % 97)).collect::<Vec<_>>());
        // Distinct pseudo-random bytes per row, so compression cannot shrink them.
        let blobs: Vec<Vec<u8>> = (0..1000)
            .map(|i| {
                (0..IMAGE_BYTES)
                    .map(|j| {
                        ((chunk * 1000 + i) as u32)
                            .wrapping_mul(2_654_435_761)
                            .wrapping_add(j as u32 * 40_503)
                            .to_le_bytes()[1]
                    })
                    .collect()
            })
            .collect();
        let bytes = BinaryArray::from(blobs.iter().map(|b| Some(b.as_slice())).collect::<Vec<_>>());
        let paths = StringArray::from(vec![None::<&str>; 1000]);
        let images = StructArray::from(vec![
            (
                Arc::new(Field::new("bytes", DataType::Binary, true)),
                Arc::new(bytes) as ArrayRef,
            ),
            (
                Arc::new(Field::new("path", DataType::Utf8, true)),
                Arc::new(paths) as ArrayRef,
            ),
        ]);
        assert_eq!(images.len(), 1000);
        let list = ListArray::new(
            Arc::new(item.clone()),
            OffsetBuffer::from_lengths(vec![1; 1000]),
            Arc::new(images),
            None,
        );
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(problems), Arc::new(answers), Arc::new(list)],
        )
        .unwrap();
        writer.write(&batch).unwrap();
    }
    writer.close().unwrap();
    let file_bytes = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(
        file_bytes > ROWS * IMAGE_BYTES / 2,
        "the file should hold the image bytes ({file_bytes} bytes)"
    );

    let base = start_peak();
    let mut rows = 0;
    let mut image_bytes = 0;
    for row in open_rows(&path, &Columns::default()).unwrap() {
        let ex = row.unwrap().unwrap();
        assert_eq!(ex.row, rows);
        rows += 1;
        image_bytes += ex.images.len() * IMAGE_BYTES;
    }
    let peak = peak_bytes() - base;
    std::fs::remove_file(&path).unwrap();
    assert_eq!(rows, ROWS);
    assert_eq!(image_bytes, ROWS * IMAGE_BYTES);
    println!(
        "read {ROWS} rows ({file_bytes} bytes on disk) with a peak of {peak} bytes on the heap"
    );
    assert!(
        peak < file_bytes / 10,
        "peak heap {peak} bytes for a {file_bytes}-byte file: not streaming"
    );
}
