//! Fresh layouts: the header bytes and data offsets the `safetensors` writer would produce.
//!
//! The writer (`safetensors::tensor::prepare`, 0.8) sorts tensors by dtype descending (the `Dtype`
//! enum order, which is increasing alignment) and then by name (byte order), lays them out back to
//! back from offset 0, serializes a `Metadata` with serde_json, pads the JSON with spaces to a
//! multiple of 8 bytes and prefixes its length as a little-endian u64. The tensor part here is built
//! with the crate's own `Metadata::new` / `TensorInfo` / `Dtype` and serialized by the crate's own
//! `Serialize` impl.
//!
//! Metadata is where we differ on purpose: the crate keeps `__metadata__` in a `HashMap` with a
//! random hasher, so with two or more keys the key order it writes changes from call to call. We
//! write the keys in the order given (so a header read from disk is reproduced exactly); for zero or
//! one key there is nothing to order and the bytes are identical. The crate also writes invalid JSON
//! (`{},"__metadata__":{}}`) for zero tensors with an empty metadata dict; we write
//! `{"__metadata__":{}}`.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use safetensors::tensor::{Metadata, TensorInfo};

use crate::dtype::{parse_dtype, tensor_nbytes, unknown_dtype};
use crate::error::quote;
use crate::error::{Error, Result};
use crate::header::{MAX_HEADER_SIZE, METADATA_KEY, N_LEN};

/// A fresh layout: the header bytes (8-byte prefix included) and, per input tensor in input order,
/// its `(begin, end)` offsets in the data area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub header: Vec<u8>,
    pub offsets: Vec<(usize, usize)>,
}

impl Layout {
    /// Size of the data area.
    pub fn data_len(&self) -> usize {
        self.offsets.iter().map(|o| o.1).max().unwrap_or(0)
    }
}

/// String-to-string pairs serialized as a JSON object in the given order.
struct OrderedMap<'a>(&'a [(String, String)]);

impl Serialize for OrderedMap<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The layout `safetensors.torch.save_file(tensors, path, metadata=metadata)` writes for tensors
/// with these names, dtype names and shapes (see the module docs about metadata key order).
pub fn fresh_layout(
    names: &[String],
    dtypes: &[String],
    shapes: &[Vec<usize>],
    metadata: Option<&[(String, String)]>,
) -> Result<Layout> {
    if names.len() != dtypes.len() || names.len() != shapes.len() {
        return Err(Error::invalid(format!(
            "names, dtypes and shapes must have the same length (got {}, {} and {})",
            names.len(),
            dtypes.len(),
            shapes.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    let mut parsed = Vec::with_capacity(names.len());
    for ((name, dtype), shape) in names.iter().zip(dtypes).zip(shapes) {
        if name == METADATA_KEY {
            return Err(Error::invalid(format!(
                "a tensor cannot be called {METADATA_KEY:?}"
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(Error::invalid(format!(
                "duplicate tensor name {}",
                quote(name)
            )));
        }
        let dtype = parse_dtype(dtype).ok_or_else(|| unknown_dtype(dtype))?;
        let nbytes = tensor_nbytes(name, dtype, shape).map_err(Error::invalid)?;
        parsed.push((dtype, nbytes));
    }
    if let Some(md) = metadata {
        let mut keys = std::collections::HashSet::with_capacity(md.len());
        for (k, _) in md {
            if !keys.insert(k.as_str()) {
                return Err(Error::invalid(format!(
                    "duplicate metadata key {}",
                    quote(k)
                )));
            }
        }
    }

    // The writer's order: dtype descending, then name.
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&l, &r| {
        parsed[r]
            .0
            .cmp(&parsed[l].0)
            .then_with(|| names[l].cmp(&names[r]))
    });

    let mut offsets = vec![(0usize, 0usize); names.len()];
    let mut infos = Vec::with_capacity(names.len());
    let mut offset = 0usize;
    for &i in &order {
        let (dtype, nbytes) = parsed[i];
        let end = offset
            .checked_add(nbytes)
            .ok_or_else(|| Error::invalid("total data size overflows"))?;
        offsets[i] = (offset, end);
        infos.push((
            names[i].clone(),
            TensorInfo {
                dtype,
                shape: shapes[i].clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }

    let tensors =
        Metadata::new(None, infos).map_err(|e| Error::invalid(format!("invalid layout: {e}")))?;
    let tensors_json = serde_json::to_string(&tensors)
        .map_err(|e| Error::invalid(format!("cannot serialize the header: {e}")))?;
    let json = match metadata {
        None => tensors_json,
        Some(md) => {
            let md_json = serde_json::to_string(&OrderedMap(md))
                .map_err(|e| Error::invalid(format!("cannot serialize the metadata: {e}")))?;
            // `tensors_json` is a JSON object: "{}" or "{...}"; put the metadata first, as the
            // crate does.
            match tensors_json.strip_prefix('{') {
                Some("}") | None => format!("{{\"{METADATA_KEY}\":{md_json}}}"),
                Some(rest) => format!("{{\"{METADATA_KEY}\":{md_json},{rest}"),
            }
        }
    };
    let mut header_json = json.into_bytes();
    let padded = header_json.len().next_multiple_of(N_LEN);
    if padded as u64 > MAX_HEADER_SIZE {
        return Err(Error::invalid(format!(
            "the header would take {padded} bytes, more than the format's maximum of {MAX_HEADER_SIZE}"
        )));
    }
    header_json.resize(padded, b' ');
    let mut header = Vec::with_capacity(N_LEN + padded);
    header.extend_from_slice(&(padded as u64).to_le_bytes());
    header.extend_from_slice(&header_json);
    Ok(Layout { header, offsets })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{dtype_bits, dtype_size, DTYPE_NAMES};
    use std::collections::HashMap;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn json_of(header: &[u8]) -> &str {
        let n = u64::from_le_bytes(header[..8].try_into().unwrap()) as usize;
        assert_eq!(n, header.len() - 8);
        std::str::from_utf8(&header[8..]).unwrap()
    }

    #[test]
    fn dtype_names_and_sizes() {
        for (i, name) in DTYPE_NAMES.iter().enumerate() {
            let d = parse_dtype(name).unwrap();
            assert_eq!(d.to_string(), *name);
            if i > 0 {
                // DTYPE_NAMES follows the enum order, which the writer's sort relies on.
                assert!(parse_dtype(DTYPE_NAMES[i - 1]).unwrap() < d);
            }
        }
        assert_eq!(dtype_size("BF16").unwrap(), 2);
        assert_eq!(dtype_size("BOOL").unwrap(), 1);
        assert_eq!(dtype_size("I64").unwrap(), 8);
        assert_eq!(dtype_size("C64").unwrap(), 8);
        assert_eq!(dtype_size("F8_E4M3").unwrap(), 1);
        assert!(dtype_size("F4").unwrap_err().to_string().contains("4 bits"));
        assert!(dtype_size("F6_E2M3").is_err());
        assert!(dtype_size("bf16")
            .unwrap_err()
            .to_string()
            .contains("unknown dtype"));
        assert!(dtype_size("").is_err());
        assert!(parse_dtype("F32 ").is_none());
    }

    /// Golden bytes from Python `safetensors.torch.save` 0.8.0.
    #[test]
    fn matches_python_safetensors_golden() {
        let names = s(&["b", "c", "a", "B", "z.w", "é", "q\"x"]);
        let dtypes = s(&["I64", "F64", "F32", "BOOL", "BF16", "F16", "U8"]);
        let shapes = vec![
            vec![3],
            vec![0],
            vec![2],
            vec![1],
            vec![2, 2],
            vec![],
            vec![1],
        ];
        let md = vec![("format".to_string(), "pt".to_string())];
        let l = fresh_layout(&names, &dtypes, &shapes, Some(&md)).unwrap();
        let expected = concat!(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"I64","shape":[3],"data_offsets":[0,24]},"#,
            r#""c":{"dtype":"F64","shape":[0],"data_offsets":[24,24]},"a":{"dtype":"F32","shape":[2],"data_offsets":[24,32]},"#,
            r#""z.w":{"dtype":"BF16","shape":[2,2],"data_offsets":[32,40]},"é":{"dtype":"F16","shape":[],"data_offsets":[40,42]},"#,
            r#""q\"x":{"dtype":"U8","shape":[1],"data_offsets":[42,43]},"B":{"dtype":"BOOL","shape":[1],"data_offsets":[43,44]}}"#
        );
        assert_eq!(l.header.len(), 8 + 424);
        assert_eq!(json_of(&l.header).trim_end_matches(' '), expected);
        assert_eq!(
            l.offsets,
            [
                (0, 24),
                (24, 24),
                (24, 32),
                (43, 44),
                (32, 40),
                (40, 42),
                (42, 43)
            ]
        );
        assert_eq!(l.data_len(), 44);
    }

    #[test]
    fn empty_layouts() {
        let l = fresh_layout(&[], &[], &[], None).unwrap();
        assert_eq!(l.header, b"\x08\0\0\0\0\0\0\0{}      ");
        let l = fresh_layout(&[], &[], &[], Some(&[])).unwrap();
        assert_eq!(json_of(&l.header).trim_end(), r#"{"__metadata__":{}}"#);
        let md = vec![("k".to_string(), "v".to_string())];
        let l = fresh_layout(&[], &[], &[], Some(&md)).unwrap();
        assert_eq!(
            json_of(&l.header).trim_end(),
            r#"{"__metadata__":{"k":"v"}}"#
        );
    }

    /// Our bytes equal the crate's own `serialize` output, with metadata in the crate's order.
    #[test]
    fn matches_the_crate_writer() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        let usable: Vec<&str> = DTYPE_NAMES.to_vec();
        for round in 0..200 {
            let count = next(7) as usize;
            let mut names = Vec::new();
            let mut dtypes = Vec::new();
            let mut shapes = Vec::new();
            for i in 0..count {
                names.push(format!("t{}.{}", next(5), i));
                let dtype = usable[next(usable.len() as u64) as usize];
                let ndim = next(4) as usize;
                let mut shape: Vec<usize> = (0..ndim).map(|_| next(4) as usize).collect();
                if !dtype_bits(parse_dtype(dtype).unwrap()).is_multiple_of(8) {
                    // Whole bytes only: an even multiple of 4 elements.
                    shape.push(4);
                }
                dtypes.push(dtype.to_string());
                shapes.push(shape);
            }
            let md: Option<Vec<(String, String)>> = match round % 4 {
                0 => None,
                1 => Some(vec![("format".into(), "pt".into())]),
                2 => Some(vec![]),
                _ => Some(
                    (0..next(5) + 2)
                        .map(|k| (format!("k{k}"), format!("v\"{k}")))
                        .collect(),
                ),
            };
            if count == 0 && md.as_ref().is_some_and(|m| m.is_empty()) {
                continue; // the crate writes invalid JSON there (see the module docs)
            }
            let datas: Vec<Vec<u8>> = names
                .iter()
                .zip(&dtypes)
                .zip(&shapes)
                .map(|((n, d), sh)| {
                    vec![7u8; tensor_nbytes(n, parse_dtype(d).unwrap(), sh).unwrap()]
                })
                .collect();
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = names
                .iter()
                .zip(&dtypes)
                .zip(&shapes)
                .zip(&datas)
                .map(|(((n, d), sh), data)| {
                    let v = safetensors::tensor::TensorView::new(
                        parse_dtype(d).unwrap(),
                        sh.clone(),
                        data,
                    )
                    .unwrap();
                    (n.clone(), v)
                })
                .collect();
            let crate_md: Option<HashMap<String, String>> =
                md.as_ref().map(|m| m.iter().cloned().collect());
            let expected = safetensors::serialize(views, crate_md).unwrap();
            let n = u64::from_le_bytes(expected[..8].try_into().unwrap()) as usize;
            // Reorder our metadata as the crate happened to write it.
            let md_in_crate_order: Option<Vec<(String, String)>> = md.as_ref().map(|m| {
                let text = std::str::from_utf8(&expected[8..8 + n]).unwrap();
                let mut ordered = m.clone();
                ordered.sort_by_key(|(k, _)| text.find(&format!("\"{k}\":")).unwrap());
                ordered
            });
            let l = fresh_layout(&names, &dtypes, &shapes, md_in_crate_order.as_deref()).unwrap();
            assert_eq!(l.header, expected[..8 + n], "round {round}");
            assert_eq!(l.data_len(), expected.len() - 8 - n);
            // Offsets in input order point at each tensor's place in the crate's file.
            let parsed = safetensors::SafeTensors::deserialize(&expected).unwrap();
            for (i, name) in names.iter().enumerate() {
                let t = parsed.tensor(name).unwrap();
                let start = t.data().as_ptr() as usize - expected[8 + n..].as_ptr() as usize;
                assert_eq!((start, start + t.data().len()), l.offsets[i]);
            }
        }
    }

    #[test]
    fn keeps_the_given_metadata_order() {
        let md = vec![
            ("z".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
            ("m".to_string(), "3".to_string()),
        ];
        let l = fresh_layout(&s(&["x"]), &s(&["F32"]), &[vec![1]], Some(&md)).unwrap();
        assert!(json_of(&l.header).starts_with(r#"{"__metadata__":{"z":"1","a":"2","m":"3"},"x":"#));
    }

    #[test]
    fn bad_arguments() {
        let e = |r: Result<Layout>| r.unwrap_err().to_string();
        assert!(e(fresh_layout(&s(&["a"]), &s(&["F99"]), &[vec![1]], None))
            .contains("unknown dtype \"F99\""));
        assert!(e(fresh_layout(
            &s(&["a", "a"]),
            &s(&["F32", "F16"]),
            &[vec![1], vec![1]],
            None
        ))
        .contains("duplicate tensor name"));
        assert!(e(fresh_layout(
            &s(&["a"]),
            &s(&["F32", "F16"]),
            &[vec![1]],
            None
        ))
        .contains("same length"));
        assert!(e(fresh_layout(
            &s(&["__metadata__"]),
            &s(&["F32"]),
            &[vec![1]],
            None
        ))
        .contains("cannot be called"));
        assert!(e(fresh_layout(&s(&["a"]), &s(&["F4"]), &[vec![3]], None))
            .contains("whole number of bytes"));
        assert!(e(fresh_layout(
            &s(&["a"]),
            &s(&["F32"]),
            &[vec![usize::MAX, 2]],
            None
        ))
        .contains("overflows"));
        assert!(e(fresh_layout(
            &s(&["a", "b"]),
            &s(&["U8", "U8"]),
            &[vec![usize::MAX], vec![2]],
            None
        ))
        .contains("overflows"));
        let md = vec![
            ("k".to_string(), "1".to_string()),
            ("k".to_string(), "2".to_string()),
        ];
        assert!(e(fresh_layout(&[], &[], &[], Some(&md))).contains("duplicate metadata key"));
    }

    #[test]
    fn layouts_read_back() {
        let names = s(&["w", "b", "e"]);
        let dtypes = s(&["BF16", "F32", "I64"]);
        let shapes = vec![vec![3, 5], vec![5], vec![0, 2]];
        let l = fresh_layout(&names, &dtypes, &shapes, None).unwrap();
        let total = l.header.len() + l.data_len();
        let h = crate::header::parse_header("mem", l.header.clone(), total as u64).unwrap();
        assert_eq!(h.entries.len(), 3);
        for e in &h.entries {
            let i = names.iter().position(|n| *n == e.name).unwrap();
            assert_eq!(e.data_offsets, l.offsets[i]);
            assert_eq!(e.shape, shapes[i]);
        }
    }
}
