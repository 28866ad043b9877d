//! The JSON of a safetensors header: its entries in file order (duplicates kept, which a map parse
//! would merge), `__metadata__`, and the check that the entries tile the data area.

use safetensors::Dtype;
use serde::de::{MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashSet;
use std::fmt;

use crate::dtype::{parse_dtype, tensor_nbytes};
use crate::error::quote;

/// The key of the free-form string-to-string metadata entry.
pub const METADATA_KEY: &str = "__metadata__";

/// One tensor entry of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// `(begin, end)` relative to the start of the data area.
    pub data_offsets: (usize, usize),
}

/// The top-level JSON object as (key, raw value) pairs, in order, duplicates kept.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A tensor entry as written in the JSON (unknown fields are ignored, as by the safetensors crate).
#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

type Parsed = (Option<Vec<(String, String)>>, Vec<TensorEntry>);

/// Parse the JSON header into metadata and entries sorted by data offsets. Errors are messages.
pub(crate) fn parse_json(bytes: &[u8]) -> std::result::Result<Parsed, String> {
    if bytes.is_empty() {
        return Err("header is empty (length 0)".into());
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "header is not valid UTF-8 (invalid byte at offset {} of the header)",
            e.valid_up_to()
        )
    })?;
    if !text.starts_with('{') {
        return Err("header does not start with '{' (it must be a JSON object)".into());
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let top =
        Entries::deserialize(&mut de).map_err(|e| format!("header is not valid JSON: {e}"))?;
    de.end()
        .map_err(|e| format!("header is not valid JSON: {e}"))?;

    let mut seen = HashSet::with_capacity(top.0.len());
    let mut metadata = None;
    let mut entries = Vec::with_capacity(top.0.len());
    for (name, value) in top.0 {
        if !seen.insert(name.clone()) {
            return Err(format!("duplicate entry {} in the header", quote(&name)));
        }
        if name == METADATA_KEY {
            metadata = parse_metadata(value)?;
            continue;
        }
        let info: RawInfo = serde_json::from_str(value.get())
            .map_err(|e| format!("tensor {}: invalid entry: {e}", quote(&name)))?;
        let dtype = parse_dtype(&info.dtype).ok_or_else(|| {
            format!(
                "tensor {} has unknown dtype {}",
                quote(&name),
                quote(&info.dtype)
            )
        })?;
        entries.push(TensorEntry {
            name,
            dtype,
            shape: info.shape,
            data_offsets: info.data_offsets,
        });
    }
    // Stable: tensors at the same offsets (empty ones) keep their order in the file.
    entries.sort_by_key(|e| e.data_offsets);
    Ok((metadata, entries))
}

/// `__metadata__`: an object of strings (duplicates and non-strings refused), or null (as absent,
/// as the safetensors crate reads it).
fn parse_metadata(value: &RawValue) -> std::result::Result<Option<Vec<(String, String)>>, String> {
    if value.get() == "null" {
        return Ok(None);
    }
    let raw: Entries<'_> = serde_json::from_str(value.get())
        .map_err(|e| format!("{METADATA_KEY} is not a JSON object of strings: {e}"))?;
    let mut seen = HashSet::with_capacity(raw.0.len());
    let mut out = Vec::with_capacity(raw.0.len());
    for (key, v) in raw.0 {
        if !seen.insert(key.clone()) {
            return Err(format!("duplicate key {} in {METADATA_KEY}", quote(&key)));
        }
        let s: String = serde_json::from_str(v.get()).map_err(|_| {
            format!(
                "{METADATA_KEY} value of key {} is not a string: {}",
                quote(&key),
                truncate(v.get(), 80)
            )
        })?;
        out.push((key, s));
    }
    Ok(Some(out))
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Check that the entries (sorted by offsets) tile `[0, data_len)` and that every entry's byte
/// length matches its dtype and shape. Returns `data_len`.
pub(crate) fn validate_entries(entries: &[TensorEntry]) -> std::result::Result<usize, String> {
    let mut expected = 0usize;
    let mut previous: Option<&TensorEntry> = None;
    for e in entries {
        let (begin, end) = e.data_offsets;
        if end < begin {
            return Err(format!(
                "tensor {} has data_offsets [{begin}, {end}] that end before they begin",
                quote(&e.name)
            ));
        }
        if begin != expected {
            return Err(match previous {
                None => format!(
                    "the data area does not start at offset 0: the first tensor, {}, begins at {begin}",
                    quote(&e.name)
                ),
                Some(prev) if begin < expected => format!(
                    "tensor {} (data_offsets [{begin}, {end}]) overlaps tensor {} (data_offsets [{}, {}])",
                    quote(&e.name),
                    quote(&prev.name),
                    prev.data_offsets.0,
                    prev.data_offsets.1
                ),
                Some(prev) => format!(
                    "hole of {} bytes in the data area between tensor {} (ends at {expected}) and tensor {} (begins at {begin})",
                    begin - expected,
                    quote(&prev.name),
                    quote(&e.name)
                ),
            });
        }
        let nbytes = tensor_nbytes(&e.name, e.dtype, &e.shape)?;
        if end - begin != nbytes {
            return Err(format!(
                "tensor {} has data_offsets [{begin}, {end}] ({} bytes) but dtype {} and shape {:?} need {nbytes} bytes",
                quote(&e.name),
                end - begin,
                e.dtype,
                e.shape
            ));
        }
        expected = end;
        previous = Some(e);
    }
    Ok(expected)
}
