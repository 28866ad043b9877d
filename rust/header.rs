//! Read and fully validate safetensors headers.
//!
//! A safetensors file is an 8-byte little-endian length `N`, then `N` bytes of UTF-8 JSON (an object
//! that starts with `{`, maybe padded with spaces), then the data area. Every tensor entry of the JSON
//! gives `dtype`, `shape` and `data_offsets` relative to the data area; the optional `__metadata__`
//! entry maps strings to strings. The entries must tile the data area exactly and the data area must
//! end where the file ends.
//!
//! [`parse_header`] checks all of that with precise messages (and also detects duplicate names, which a
//! JSON-object-to-map parse silently merges), then hands the JSON to the `safetensors` crate's own
//! `Metadata` deserializer as a final check, so that nothing the reference reader refuses is accepted.
//! Only the header bytes are read: the data area is never touched.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{quote, Error, Result};
use crate::json::{parse_json, validate_entries};
pub use crate::json::{TensorEntry, METADATA_KEY};

/// Largest header the format allows (the `safetensors` crate refuses larger ones).
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// Size of the little-endian header-length prefix.
pub const N_LEN: usize = 8;

/// A parsed and validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// The file, as given.
    pub path: String,
    /// `N`, the header length from the 8-byte prefix.
    pub header_size: u64,
    /// Size of the whole file in bytes.
    pub file_size: u64,
    /// The first `8 + N` bytes of the file, exactly as on disk.
    pub raw: Vec<u8>,
    /// The `__metadata__` entries in file order; `None` when absent.
    pub metadata: Option<Vec<(String, String)>>,
    /// The tensors, in data-offset order (ties, i.e. empty tensors, keep their order in the file).
    pub entries: Vec<TensorEntry>,
}

impl Header {
    /// Offset of the data area in the file: `8 + N`.
    pub fn data_start(&self) -> u64 {
        self.header_size + N_LEN as u64
    }

    /// Length of the data area.
    pub fn data_len(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.data_offsets.1 as u64)
    }
}

/// Read and validate the header of the safetensors file at `path`. Only the header bytes are read.
pub fn read_header(path: &Path) -> Result<Header> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        // A FIFO would block the open until a writer shows up; with O_NONBLOCK it does not, and the
        // file type check below rejects it. Regular files ignore the flag.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, "cannot open the file", e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(path, "cannot stat the file", e))?;
    let file_type = meta.file_type();
    if file_type.is_dir() {
        return Err(Error::io(
            path,
            "cannot read a safetensors header",
            io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    if !file_type.is_file() {
        let kind = if file_type.is_fifo() {
            "a FIFO"
        } else if file_type.is_socket() {
            "a socket"
        } else if file_type.is_char_device() || file_type.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(Error::format(
            path,
            format!("is {kind}, not a regular safetensors file"),
        ));
    }
    let file_size = meta.len();
    check_prefix_room(path, file_size)?;
    let mut prefix = [0u8; N_LEN];
    read_exact_at(&file, path, &mut prefix, 0)?;
    let header_size = u64::from_le_bytes(prefix);
    check_header_size(path, header_size, file_size)?;
    // Both checks above bound header_size by MAX_HEADER_SIZE and by the file size.
    let total = usize::try_from(header_size)
        .ok()
        .and_then(|n| n.checked_add(N_LEN))
        .ok_or_else(|| Error::format(path, "header length does not fit in memory"))?;
    let mut raw = vec![0u8; total];
    raw[..N_LEN].copy_from_slice(&prefix);
    read_exact_at(&file, path, &mut raw[N_LEN..], N_LEN as u64)?;
    parse_header(&path.display().to_string(), raw, file_size)
}

/// [`read_header`] for many files on a pool of `threads` threads (0: one per CPU).
/// Results are in input order; on failure the error of the first failing file in input order.
pub fn read_headers(paths: &[PathBuf], threads: usize) -> Result<Vec<Header>> {
    if paths.len() <= 1 {
        return paths.iter().map(|p| read_header(p)).collect();
    }
    let pool = crate::pool::build_pool(threads)?;
    let results: Vec<Result<Header>> =
        pool.install(|| paths.par_iter().map(|p| read_header(p)).collect());
    results.into_iter().collect()
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            // The size was checked before reading: the file shrank under us.
            Error::format(
                path,
                "the file was truncated while its header was being read",
            )
        } else {
            Error::io(path, "cannot read the header", e)
        }
    })
}

fn check_prefix_room(path: &Path, file_size: u64) -> Result<()> {
    if file_size < N_LEN as u64 {
        return Err(Error::format(
            path,
            format!(
                "file is too short to be a safetensors file ({file_size} bytes; the header length alone takes 8)"
            ),
        ));
    }
    Ok(())
}

fn check_header_size(path: &Path, header_size: u64, file_size: u64) -> Result<()> {
    if header_size > MAX_HEADER_SIZE {
        return Err(Error::format(
            path,
            format!(
                "header length {header_size} exceeds the format's maximum of {MAX_HEADER_SIZE} bytes"
            ),
        ));
    }
    if header_size > file_size.saturating_sub(N_LEN as u64) {
        return Err(Error::format(
            path,
            format!(
                "header length {header_size} runs past the end of the file ({file_size} bytes)"
            ),
        ));
    }
    Ok(())
}

/// A header's parts, validated on their own (without the file it belongs to).
pub(crate) struct Validated {
    pub header_size: u64,
    pub metadata: Option<Vec<(String, String)>>,
    pub entries: Vec<TensorEntry>,
    /// Size of the data area the entries declare.
    pub data_len: u64,
}

/// Validate `raw` (the 8-byte prefix and the header bytes) on its own: the length prefix matches,
/// the JSON is well formed and the entries tile a data area, whose size is returned.
pub(crate) fn validate_raw(path: &Path, raw: &[u8]) -> Result<Validated> {
    check_prefix_room(path, raw.len() as u64)?;
    let mut prefix = [0u8; N_LEN];
    prefix.copy_from_slice(&raw[..N_LEN]);
    let header_size = u64::from_le_bytes(prefix);
    if header_size > MAX_HEADER_SIZE {
        return Err(Error::format(
            path,
            format!(
                "header length {header_size} exceeds the format's maximum of {MAX_HEADER_SIZE} bytes"
            ),
        ));
    }
    let given = raw.len() - N_LEN;
    if header_size != given as u64 {
        return Err(Error::format(
            path,
            format!("header length prefix says {header_size} bytes but the header has {given}"),
        ));
    }
    let (metadata, entries) = parse_json(&raw[N_LEN..]).map_err(|msg| Error::format(path, msg))?;
    let data_len = validate_entries(&entries).map_err(|msg| Error::format(path, msg))?;
    // Belt and braces: the reference implementation must accept it too. Our checks are a superset
    // of its checks, so this only fires if the two disagree.
    if let Ok(text) = std::str::from_utf8(&raw[N_LEN..]) {
        if let Err(e) = serde_json::from_str::<safetensors::tensor::Metadata>(text) {
            return Err(Error::format(
                path,
                format!("header rejected by the safetensors library: {e}"),
            ));
        }
    }
    Ok(Validated {
        header_size,
        metadata,
        entries,
        data_len: data_len as u64,
    })
}

/// Validate `raw` (the 8-byte prefix and the header bytes) of a file of `file_size` bytes.
///
/// Pure: [`read_header`] calls it on what it read; tests call it on bytes.
pub fn parse_header(path: &str, raw: Vec<u8>, file_size: u64) -> Result<Header> {
    let p = Path::new(path);
    check_prefix_room(p, raw.len() as u64)?;
    let mut prefix = [0u8; N_LEN];
    prefix.copy_from_slice(&raw[..N_LEN]);
    check_header_size(p, u64::from_le_bytes(prefix), file_size)?;
    let v = validate_raw(p, &raw)?;
    let data_end = (N_LEN as u64)
        .checked_add(v.header_size)
        .and_then(|n| n.checked_add(v.data_len))
        .ok_or_else(|| Error::format(p, "data area size overflows"))?;
    if data_end > file_size {
        let last = v.entries.last().map_or("", |e| e.name.as_str());
        return Err(Error::format(
            p,
            format!(
                "data of tensor {} runs past the end of the file (the data area ends at byte {data_end}, the file has {file_size} bytes)",
                quote(last)
            ),
        ));
    }
    if data_end < file_size {
        return Err(Error::format(
            p,
            format!(
                "{} trailing bytes after the last tensor (the data area ends at byte {data_end}, the file has {file_size} bytes)",
                file_size - data_end
            ),
        ));
    }
    Ok(Header {
        path: path.to_string(),
        header_size: v.header_size,
        file_size,
        raw,
        metadata: v.metadata,
        entries: v.entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;
    use std::io::Write;

    /// A header + data with `json` padded like the safetensors writer does.
    fn file_bytes(json: &str, data_len: usize) -> Vec<u8> {
        let mut h = json.as_bytes().to_vec();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(std::iter::repeat_n(0xabu8, data_len));
        out
    }

    fn write_tmp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        let mut f = File::create(&p).unwrap();
        f.write_all(bytes).unwrap();
        p
    }

    fn read_bytes(bytes: &[u8]) -> Result<Header> {
        let dir = tempfile::tempdir().unwrap();
        let p = write_tmp(&dir, "m.safetensors", bytes);
        read_header(&p)
    }

    /// The error message of reading `bytes`, which must be a Format error naming the file.
    fn format_err(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = write_tmp(&dir, "bad.safetensors", bytes);
        match read_header(&p) {
            Err(Error::Format {
                path: Some(path),
                msg,
            }) => {
                assert_eq!(path, p.display().to_string());
                msg
            }
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    const GOOD: &str = r#"{"__metadata__":{"format":"pt","b":"x"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"e":{"dtype":"BF16","shape":[0,4],"data_offsets":[24,24]},"s":{"dtype":"I64","shape":[],"data_offsets":[24,32]}}"#;

    #[test]
    fn reads_a_valid_header() {
        let bytes = file_bytes(GOOD, 32);
        let h = read_bytes(&bytes).unwrap();
        assert_eq!(h.header_size as usize, bytes.len() - 32 - 8);
        assert_eq!(h.file_size as usize, bytes.len());
        assert_eq!(h.raw, bytes[..bytes.len() - 32]);
        assert_eq!(h.data_start(), 8 + h.header_size);
        assert_eq!(h.data_len(), 32);
        assert_eq!(
            h.metadata,
            Some(vec![
                ("format".into(), "pt".into()),
                ("b".into(), "x".into())
            ])
        );
        let names: Vec<_> = h.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["w", "e", "s"]);
        assert_eq!(h.entries[2].shape, Vec::<usize>::new());
        assert_eq!(h.entries[2].dtype, Dtype::I64);
        assert_eq!(h.entries[1].data_offsets, (24, 24));
    }

    #[test]
    fn entries_come_in_offset_order() {
        let json = r#"{"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        let h = read_bytes(&file_bytes(json, 4)).unwrap();
        assert_eq!(h.entries[0].name, "a");
        assert_eq!(h.entries[1].name, "b");
        assert_eq!(h.metadata, None);
    }

    #[test]
    fn empty_header_is_valid() {
        let h = read_bytes(&file_bytes("{}", 0)).unwrap();
        assert!(h.entries.is_empty());
        assert_eq!(h.metadata, None);
        let h = read_bytes(&file_bytes(r#"{"__metadata__":{}}"#, 0)).unwrap();
        assert_eq!(h.metadata, Some(vec![]));
    }

    #[test]
    fn null_metadata_is_absent_like_the_crate() {
        let json = r#"{"__metadata__":null,"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let h = read_bytes(&file_bytes(json, 1)).unwrap();
        assert_eq!(h.metadata, None);
    }

    #[test]
    fn too_short_files() {
        for n in 0..8 {
            let msg = format_err(&vec![0u8; n]);
            assert!(msg.contains("too short"), "{msg}");
        }
    }

    #[test]
    fn header_length_checks() {
        let mut b = (MAX_HEADER_SIZE + 1).to_le_bytes().to_vec();
        b.extend(b"{}      ");
        assert!(format_err(&b).contains("exceeds the format's maximum"));
        let mut b = u64::MAX.to_le_bytes().to_vec();
        b.extend(b"{}      ");
        assert!(format_err(&b).contains("exceeds"));
        let mut b = 100u64.to_le_bytes().to_vec();
        b.extend(b"{}      ");
        let msg = format_err(&b);
        assert!(
            msg.contains("header length 100 runs past the end of the file (16 bytes)"),
            "{msg}"
        );
        let b = 0u64.to_le_bytes().to_vec();
        assert!(format_err(&b).contains("empty"));
    }

    #[test]
    fn bad_utf8_and_bad_json() {
        let mut b = file_bytes(GOOD, 32);
        b[10] = 0xff;
        assert!(format_err(&b).contains("UTF-8"));
        assert!(format_err(&file_bytes(" {}", 0)).contains("start with '{'"));
        assert!(format_err(&file_bytes("[1]", 0)).contains("start with '{'"));
        assert!(format_err(&file_bytes("{\"a\":", 0)).contains("not valid JSON"));
        assert!(format_err(&file_bytes("{} x", 0)).contains("not valid JSON"));
        assert!(format_err(&file_bytes("{}\0", 0)).contains("not valid JSON"));
        let msg = format_err(&file_bytes(r#"{"a":5}"#, 0));
        assert!(msg.contains("tensor \"a\": invalid entry"), "{msg}");
        let msg = format_err(&file_bytes(r#"{"a":{"dtype":"F32","shape":[1]}}"#, 4));
        assert!(msg.contains("missing field"), "{msg}");
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            4,
        ));
        assert!(msg.contains("invalid entry"), "{msg}");
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        ));
        assert!(msg.contains("duplicate field"), "{msg}");
    }

    #[test]
    fn deep_nesting_does_not_crash() {
        let json = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(format_err(&file_bytes(&json, 0)).contains("invalid entry"));
        let json = format!("{{\"a\":{}", "[".repeat(100_000));
        assert!(format_err(&file_bytes(&json, 0)).contains("JSON"));
    }

    #[test]
    fn unknown_dtype() {
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
            16,
        ));
        assert!(msg.contains("unknown dtype \"F128\""), "{msg}");
    }

    #[test]
    fn offsets_must_tile() {
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
            3,
        ));
        assert!(msg.contains("does not start at offset 0"), "{msg}");
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
            3,
        ));
        assert!(msg.contains("overlaps"), "{msg}");
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#,
            5,
        ));
        assert!(msg.contains("hole of 1 bytes"), "{msg}");
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[2,0]}}"#,
            0,
        ));
        assert!(msg.contains("end before they begin"), "{msg}");
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            2,
        ));
        assert!(msg.contains("runs past the end of the file"), "{msg}");
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            7,
        ));
        assert!(msg.contains("3 trailing bytes"), "{msg}");
    }

    #[test]
    fn sizes_must_match() {
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            4,
        ));
        assert!(msg.contains("need 8 bytes"), "{msg}");
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,4]}}"#,
            4,
        ));
        assert!(msg.contains("overflows"), "{msg}");
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"F64","shape":[1152921504606846976],"data_offsets":[0,4]}}"#,
            4,
        ));
        assert!(msg.contains("overflows"), "{msg}");
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
            2,
        ));
        assert!(msg.contains("whole number of bytes"), "{msg}");
        // Even sub-byte tensors are fine.
        read_bytes(&file_bytes(
            r#"{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#,
            2,
        ))
        .unwrap();
    }

    #[test]
    fn duplicates_are_refused() {
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#,
            0,
        ));
        assert!(msg.contains("duplicate entry \"a\""), "{msg}");
        // The same name spelled with an escape is still the same name.
        let msg = format_err(&file_bytes(
            r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"\u0061":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#,
            0,
        ));
        assert!(msg.contains("duplicate entry"), "{msg}");
        let msg = format_err(&file_bytes(r#"{"__metadata__":{},"__metadata__":{}}"#, 0));
        assert!(msg.contains("duplicate entry \"__metadata__\""), "{msg}");
        let msg = format_err(&file_bytes(r#"{"__metadata__":{"k":"1","k":"2"}}"#, 0));
        assert!(msg.contains("duplicate key \"k\""), "{msg}");
    }

    #[test]
    fn metadata_must_be_strings() {
        let msg = format_err(&file_bytes(r#"{"__metadata__":{"k":1}}"#, 0));
        assert!(
            msg.contains("value of key \"k\" is not a string: 1"),
            "{msg}"
        );
        let msg = format_err(&file_bytes(r#"{"__metadata__":[]}"#, 0));
        assert!(msg.contains("not a JSON object"), "{msg}");
        let msg = format_err(&file_bytes(r#"{"__metadata__":"x"}"#, 0));
        assert!(msg.contains("not a JSON object"), "{msg}");
    }

    #[test]
    fn the_crate_agrees_on_valid_files() {
        let bytes = file_bytes(GOOD, 32);
        let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let h = read_bytes(&bytes).unwrap();
        assert_eq!(n as u64, h.header_size);
        assert_eq!(meta.offset_keys(), ["w", "e", "s"]);
    }

    #[test]
    fn directories_and_missing_files_are_io_errors() {
        let dir = tempfile::tempdir().unwrap();
        match read_header(dir.path()) {
            Err(e @ Error::Io { .. }) => assert_eq!(e.errno(), Some(libc::EISDIR)),
            other => panic!("{other:?}"),
        }
        match read_header(&dir.path().join("missing")) {
            Err(e @ Error::Io { .. }) => assert_eq!(e.errno(), Some(libc::ENOENT)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fifo_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        let c = std::ffi::CString::new(p.display().to_string()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(read_header(&p), Err(Error::Format { .. })));
    }

    #[test]
    fn many_files_first_error_in_input_order() {
        let dir = tempfile::tempdir().unwrap();
        let good = file_bytes(GOOD, 32);
        let mut paths = Vec::new();
        for i in 0..20 {
            let bytes = if i == 7 || i == 13 {
                vec![1, 2, 3]
            } else {
                good.clone()
            };
            paths.push(write_tmp(&dir, &format!("f{i}.safetensors"), &bytes));
        }
        let err = read_headers(&paths, 4).unwrap_err();
        assert_eq!(err.path(), Some(paths[7].display().to_string().as_str()));
        let ok: Vec<_> = paths
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 7 && *i != 13)
            .map(|(_, p)| p.clone())
            .collect();
        let hs = read_headers(&ok, 0).unwrap();
        assert_eq!(hs.len(), ok.len());
        for (h, p) in hs.iter().zip(&ok) {
            assert_eq!(h.path, p.display().to_string());
        }
        assert!(read_headers(&[], 0).unwrap().is_empty());
    }

    /// Random truncations and byte flips of a valid file never panic.
    #[test]
    fn corruptions_never_panic() {
        let good = file_bytes(GOOD, 32);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let mut b = good.clone();
            match next() % 3 {
                0 => b.truncate((next() as usize) % b.len()),
                1 => {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                _ => {
                    let i = (next() as usize) % 8;
                    b[i] = next() as u8;
                }
            }
            let h = parse_header("x", b.clone(), b.len() as u64);
            let _ = h;
            let _ = read_bytes(&b);
        }
    }
}
