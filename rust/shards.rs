//! Numeric-aware ("natural") ordering of shard file names, and the checkpoint index model
//! (`model.safetensors.index.json` / `pytorch_model.bin.index.json`).
//!
//! A name is cut into runs of ASCII digits and runs of anything else. Two names compare run by run:
//! digit runs by numeric value (any length, leading zeros ignored), other runs as strings (byte
//! order), and a digit run sorts before a non-digit run at the same position. Names that are equal
//! under this comparison (they differ only in zero padding) are ordered by their raw bytes, so the
//! order is total and deterministic. `model-2-of-10` < `model-10-of-10`, and
//! `model-00002-of-00010` < `model-10-of-00010`. Full paths compare the same way, as whole strings.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// One run of a name.
#[derive(Debug, PartialEq, Eq)]
enum Run<'a> {
    /// ASCII digits with leading zeros stripped (empty for zero).
    Num(&'a str),
    Text(&'a str),
}

impl Ord for Run<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            // Without leading zeros, a longer digit string is a larger number.
            (Run::Num(a), Run::Num(b)) => a.len().cmp(&b.len()).then_with(|| a.cmp(b)),
            (Run::Text(a), Run::Text(b)) => a.cmp(b),
            (Run::Num(_), Run::Text(_)) => Ordering::Less,
            (Run::Text(_), Run::Num(_)) => Ordering::Greater,
        }
    }
}

impl PartialOrd for Run<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The runs of `s`, lazily.
fn runs(s: &str) -> impl Iterator<Item = Run<'_>> {
    let mut rest = s;
    std::iter::from_fn(move || {
        let first = rest.as_bytes().first()?;
        let is_digit = first.is_ascii_digit();
        // ASCII digits are single bytes, so this split is always on a char boundary.
        let end = rest
            .bytes()
            .position(|b| b.is_ascii_digit() != is_digit)
            .unwrap_or(rest.len());
        let (run, tail) = rest.split_at(end);
        rest = tail;
        Some(if is_digit {
            Run::Num(run.trim_start_matches('0'))
        } else {
            Run::Text(run)
        })
    })
}

/// Natural comparison of two names (see the module docs). A total order.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    runs(a).cmp(runs(b)).then_with(|| a.cmp(b))
}

/// Sort shard names (or paths) naturally; see the module docs.
pub fn sort_shard_names<S: AsRef<str>>(names: &mut [S]) {
    names.sort_by(|a, b| natural_cmp(a.as_ref(), b.as_ref()));
}

/// A checkpoint index: which file holds each tensor. Only the fields shardwise relies on are
/// modelled; callers keep the raw bytes for everything else (`metadata`, extra keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// tensor name → shard file name (a plain name inside the index's folder)
    pub weight_map: BTreeMap<String, String>,
    /// `metadata.total_size`, when present and a non-negative integer
    pub total_size: Option<u64>,
}

/// Whether `name` is a plain file name: it cannot point outside the folder it is joined to.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

impl Index {
    /// Parse and validate an index file's bytes. `path` names the file in errors.
    pub fn parse(path: &str, raw: &[u8]) -> Result<Index> {
        let text = std::str::from_utf8(raw)
            .map_err(|e| Error::format(path, format!("not UTF-8 ({e})")))?;
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not valid JSON ({e})")))?;
        let serde_json::Value::Object(mut top) = value else {
            return Err(Error::format(path, "an index must be a JSON object"));
        };
        let Some(serde_json::Value::Object(map)) = top.remove("weight_map") else {
            return Err(Error::format(path, "an index needs a 'weight_map' object"));
        };
        let mut weight_map = BTreeMap::new();
        for (tensor, file) in map {
            let serde_json::Value::String(file) = file else {
                return Err(Error::format(
                    path,
                    format!("'weight_map' value of {tensor:?} must be a file name"),
                ));
            };
            if !is_plain_file_name(&file) {
                return Err(Error::format(
                    path,
                    format!("shard name {file:?} (of tensor {tensor:?}) would escape the index's folder"),
                ));
            }
            weight_map.insert(tensor, file);
        }
        let total_size = top
            .get("metadata")
            .and_then(|m| m.get("total_size"))
            .and_then(serde_json::Value::as_u64);
        Ok(Index {
            weight_map,
            total_size,
        })
    }

    /// The distinct shard names the index lists, in numeric order.
    pub fn shards(&self) -> Vec<String> {
        let mut names: Vec<String> = self.weight_map.values().cloned().collect();
        sort_shard_names(&mut names);
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(names: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        sort_shard_names(&mut v);
        v
    }

    #[test]
    fn numbers_compare_numerically() {
        assert_eq!(
            sorted(&["model-10-of-10", "model-2-of-10", "model-1-of-10"]),
            ["model-1-of-10", "model-2-of-10", "model-10-of-10"]
        );
        assert_eq!(
            sorted(&["model-10-of-00010", "model-00002-of-00010"]),
            ["model-00002-of-00010", "model-10-of-00010"]
        );
        assert_eq!(
            sorted(&[
                "/ckpt/model-00003-of-00003.safetensors",
                "/ckpt/model-00001-of-00003.safetensors",
                "/ckpt/model-00002-of-00003.safetensors"
            ]),
            [
                "/ckpt/model-00001-of-00003.safetensors",
                "/ckpt/model-00002-of-00003.safetensors",
                "/ckpt/model-00003-of-00003.safetensors"
            ]
        );
        // Bigger than any integer type.
        assert_eq!(
            sorted(&["a123456789012345678901234567890", "a99"]),
            ["a99", "a123456789012345678901234567890"]
        );
    }

    #[test]
    fn padding_ties_are_broken_by_raw_bytes() {
        assert_eq!(sorted(&["m-2", "m-002", "m-02"]), ["m-002", "m-02", "m-2"]);
        assert_eq!(natural_cmp("m-0", "m-00"), Ordering::Less);
        assert_eq!(natural_cmp("x", "x"), Ordering::Equal);
    }

    #[test]
    fn names_without_digits_sort_as_strings() {
        assert_eq!(sorted(&["b", "a", "ab", ""]), ["", "a", "ab", "b"]);
        assert_eq!(sorted(&["é", "e", "z"]), ["e", "z", "é"]);
    }

    /// A small deterministic generator of names over an alphabet rich in digits and zeros.
    fn random_names(seed: u64, count: usize) -> Vec<String> {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet: Vec<char> = "0001239-ab.é".chars().collect();
        (0..count)
            .map(|_| {
                let len = (next() % 8) as usize;
                (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect()
            })
            .collect()
    }

    #[test]
    fn is_a_total_order() {
        let names = random_names(42, 60);
        for a in &names {
            assert_eq!(natural_cmp(a, a), Ordering::Equal);
            for b in &names {
                let ab = natural_cmp(a, b);
                assert_eq!(ab, natural_cmp(b, a).reverse(), "{a:?} {b:?}");
                assert_eq!(ab == Ordering::Equal, a == b);
                for c in &names {
                    if ab != Ordering::Greater && natural_cmp(b, c) != Ordering::Greater {
                        assert_ne!(natural_cmp(a, c), Ordering::Greater, "{a:?} {b:?} {c:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn sorting_is_a_permutation_and_idempotent() {
        for seed in 1..50 {
            let names = random_names(seed, 30);
            let mut once = names.clone();
            sort_shard_names(&mut once);
            let mut twice = once.clone();
            sort_shard_names(&mut twice);
            assert_eq!(once, twice);
            let mut a = names.clone();
            let mut b = once.clone();
            a.sort();
            b.sort();
            assert_eq!(a, b);
            // Sorting does not depend on the input order.
            let mut rev: Vec<String> = names.into_iter().rev().collect();
            sort_shard_names(&mut rev);
            assert_eq!(rev, once);
        }
    }

    #[test]
    fn numbers_ignore_padding() {
        for i in 0u64..60 {
            for j in 0u64..60 {
                for (pi, pj) in [(0, 0), (5, 0), (0, 5), (3, 7)] {
                    let a = format!("model-{i:0pi$}-of-00060.safetensors");
                    let b = format!("model-{j:0pj$}-of-60.safetensors");
                    let ord = natural_cmp(&a, &b);
                    if i != j {
                        assert_eq!(ord, i.cmp(&j), "{a} {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn index_parses_and_sorts_its_shards() {
        let raw = br#"{"metadata": {"total_size": 12, "x": 1}, "weight_map": {
            "b": "model-10-of-10.safetensors", "a": "model-2-of-10.safetensors",
            "c": "model-2-of-10.safetensors"}}"#;
        let index = Index::parse("i.json", raw).expect("valid");
        assert_eq!(index.total_size, Some(12));
        assert_eq!(index.weight_map.len(), 3);
        assert_eq!(
            index.shards(),
            vec!["model-2-of-10.safetensors", "model-10-of-10.safetensors"]
        );
    }

    #[test]
    fn index_rejects_bad_input_naming_the_file() {
        for raw in [
            &b"{"[..],
            b"[]",
            b"[{}, {\"a\": \"model.safetensors\"}]",
            b"{\"metadata\": {}}",
            b"{}",
            b"{\"weight_map\": []}",
            b"{\"weight_map\": {\"a\": 3}}",
            b"{\"weight_map\": {\"a\": \"../x.safetensors\"}}",
            b"{\"weight_map\": {\"a\": \"/etc/passwd\"}}",
            b"{\"weight_map\": {\"a\": \"..\"}}",
            b"\xff\xfe",
        ] {
            let err = Index::parse("dir/idx.json", raw).expect_err("must fail");
            assert!(err.to_string().contains("dir/idx.json"), "{err}");
        }
    }
}
