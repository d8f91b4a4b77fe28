//! TensorBoard event files, written directly: a TFRecord stream (length,
//! masked CRC-32C of the length, the record, its masked CRC-32C) of
//! `tensorflow.Event` protos holding scalar summaries. No maintained Rust
//! crate writes them without a protobuf compiler at build time (`tboard`
//! needs `protoc`; `tensorboard-rs` is unmaintained since 2022 and pulls
//! image 0.23), and the three messages needed are a few fields each.
//! `tensorboard --logdir` and `wandb sync --sync-tensorboard` read them.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TensorBoardError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The CRC TFRecord stores: CRC-32C rotated and offset, so a CRC of data
/// that holds CRCs stays well distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u32, wire: u8, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | wire as u64, out);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// What an event carries besides its time and step.
pub enum EventBody<'a> {
    /// `file_version`, the first event of every file.
    FileVersion,
    /// Scalars (`Summary.Value` with `simple_value`).
    Scalars(&'a [(String, f64)]),
    /// `SessionLog.START`: TensorBoard drops the events at this step and
    /// later written before it (a resumed run rewrites them).
    SessionStart,
}

/// One `tensorflow.Event`, protobuf-encoded.
pub fn encode_event(wall_time: f64, step: u64, body: &EventBody) -> Vec<u8> {
    let mut out = Vec::new();
    key(1, 1, &mut out); // wall_time: double
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        // proto3 leaves a default value out, as TensorBoard's writer does.
        key(2, 0, &mut out); // step: int64
        varint(step, &mut out);
    }
    match body {
        EventBody::FileVersion => bytes_field(3, b"brain.Event:2", &mut out),
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values.iter() {
                let mut value = Vec::new();
                bytes_field(1, tag.as_bytes(), &mut value); // tag
                key(2, 5, &mut value); // simple_value: float
                value.extend_from_slice(&(*v as f32).to_le_bytes());
                bytes_field(1, &value, &mut summary); // Summary.value
            }
            bytes_field(5, &summary, &mut out); // Event.summary
        }
        EventBody::SessionStart => {
            let mut log = Vec::new();
            key(1, 0, &mut log); // status = START
            varint(1, &mut log);
            bytes_field(7, &log, &mut out); // Event.session_log
        }
    }
    out
}

/// One TFRecord around `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Appends events to a new `events.out.tfevents.*` file in a directory;
/// each event is flushed as it is written (a crash loses nothing written).
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// A new event file in `dir` (created if needed). `resumed_at`: the
    /// first step a resumed run writes, as a session start: TensorBoard
    /// then drops the events at and after it that the first attempt logged.
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> Result<Self, TensorBoardError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e: std::io::Error| TensorBoardError::Io {
                path: path.clone(),
                reason: e.to_string(),
            }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let secs = now() as u64;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        // TensorBoard's naming; the pid and a counter keep two files of one
        // second apart (a resume in the same process and second).
        let mut n = 0u32;
        let (path, file) = loop {
            let path = dir.join(format!(
                "events.out.tfevents.{secs}.{host}.{}.{n}.v2",
                std::process::id()
            ));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(io(&path)(e)),
            }
        };
        let mut w = Self { path, file };
        w.write(0, &EventBody::FileVersion)?;
        if let Some(step) = resumed_at {
            w.write(step, &EventBody::SessionStart)?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, step: u64, body: &EventBody) -> Result<(), TensorBoardError> {
        let bytes = record(&encode_event(now(), step, body));
        self.file
            .write_all(&bytes)
            .and_then(|()| self.file.flush())
            .map_err(|e| TensorBoardError::Io {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    /// Every finite number as a scalar named by its key, at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<(), TensorBoardError> {
        let finite: Vec<(String, f64)> = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .cloned()
            .collect();
        if finite.is_empty() {
            return Ok(());
        }
        self.write(step, &EventBody::Scalars(&finite))
    }
}

/// The numeric fields of a JSON object, as (name, value), `step` left out.
pub fn numeric_fields(v: &serde_json::Value) -> Vec<(String, f64)> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| k.as_str() != "step")
                .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                .collect()
        })
        .unwrap_or_default()
}

/// A scalar read back from an event file: (step, tag, value).
pub type Scalar = (u64, String, f32);

fn read_varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// (field, wire type, payload) of each field of a message.
fn fields(b: &[u8]) -> Option<Vec<(u32, u8, &[u8])>> {
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let k = read_varint(b, &mut i)?;
        let (field, wire) = ((k >> 3) as u32, (k & 7) as u8);
        let start = i;
        let len = match wire {
            0 => {
                read_varint(b, &mut i)?;
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let n = read_varint(b, &mut i)? as usize;
                let s = i;
                i += n;
                out.push((field, wire, b.get(s..i)?));
                continue;
            }
            _ => return None,
        };
        if wire == 0 {
            out.push((field, wire, &b[start..i]));
        } else {
            i += len;
            out.push((field, wire, b.get(start..i)?));
        }
    }
    Some(out)
}

/// Every scalar in an event file, checking each record's CRCs (what
/// TensorBoard's reader checks).
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>, TensorBoardError> {
    let bytes = std::fs::read(path).map_err(|e| TensorBoardError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let corrupt = |reason: String| TensorBoardError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let header = bytes
            .get(i..i + 12)
            .ok_or_else(|| corrupt(format!("truncated record header at byte {i}")))?;
        let len = u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) as usize;
        if masked_crc32c(&header[..8]).to_le_bytes() != header[8..12] {
            return Err(corrupt(format!("bad length CRC at byte {i}")));
        }
        let data = bytes
            .get(i + 12..i + 12 + len)
            .ok_or_else(|| corrupt(format!("truncated record at byte {i}")))?;
        let crc = bytes
            .get(i + 12 + len..i + 16 + len)
            .ok_or_else(|| corrupt(format!("truncated record CRC at byte {i}")))?;
        if masked_crc32c(data).to_le_bytes() != crc {
            return Err(corrupt(format!("bad data CRC at byte {i}")));
        }
        i += 16 + len;
        let event = fields(data).ok_or_else(|| corrupt("undecodable event".into()))?;
        let mut step = 0;
        for (f, _, payload) in &event {
            if *f == 2 {
                step = read_varint(payload, &mut 0).unwrap_or(0);
            }
        }
        for (f, _, summary) in event.iter().filter(|(f, w, _)| *f == 5 && *w == 2) {
            let _ = f;
            for (_, _, value) in fields(summary)
                .ok_or_else(|| corrupt("undecodable summary".into()))?
                .iter()
                .filter(|(f, w, _)| *f == 1 && *w == 2)
            {
                let (mut tag, mut v) = (String::new(), None);
                for (vf, _, p) in
                    fields(value).ok_or_else(|| corrupt("undecodable value".into()))?
                {
                    match vf {
                        1 => tag = String::from_utf8_lossy(p).into_owned(),
                        2 if p.len() == 4 => {
                            v = Some(f32::from_le_bytes(p.try_into().expect("4 bytes")))
                        }
                        _ => {}
                    }
                }
                if let Some(v) = v {
                    out.push((step, tag, v));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Byte for byte what the `tensorboard` package (2.21, its protos and
    /// RecordWriter) serialises for the same events.
    #[test]
    fn events_and_records_match_tensorboards_own_bytes() {
        let values = [
            ("val/accuracy".to_string(), 0.25),
            ("loss".to_string(), -1.5),
        ];
        assert_eq!(
            hex(&encode_event(1234.5, 7, &EventBody::Scalars(&values))),
            "0900000000004a934010072a220a130a0c76616c2f6163637572616379150000803e0a0b0a046c6f7373150000c0bf"
        );
        assert_eq!(
            hex(&encode_event(1234.5, 0, &EventBody::FileVersion)),
            "0900000000004a93401a0d627261696e2e4576656e743a32"
        );
        assert_eq!(
            hex(&encode_event(1234.5, 3, &EventBody::SessionStart)),
            "0900000000004a934010033a020801"
        );
        assert_eq!(
            hex(&record(b"hello")),
            "0500000000000000eab2043e68656c6c6fbb1f1c19"
        );
    }

    #[test]
    fn a_written_file_reads_back_and_a_flipped_bit_is_caught() {
        let dir = std::env::temp_dir().join(format!("vppo-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = EventWriter::create(&dir, Some(2)).unwrap();
        w.scalars(
            3,
            &[
                ("a".into(), 0.5),
                ("nan".into(), f64::NAN),
                ("b".into(), 2.0),
            ],
        )
        .unwrap();
        let path = w.path().to_path_buf();
        assert!(path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents."));
        let got = read_scalars(&path).unwrap();
        assert_eq!(
            got,
            vec![(3, "a".to_string(), 0.5), (3, "b".to_string(), 2.0)]
        );
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = read_scalars(&path).unwrap_err().to_string();
        assert!(err.contains("CRC"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn crc32c_is_the_castagnoli_checksum() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }
}
