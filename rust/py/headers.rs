//! Bindings of the header reader: `SafetensorsHeader`, `read_header(s)`, `parse_header`, the index
//! and shard-name helpers, `dtype_size`.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::errors::IntoPyResult;
use crate::header::{self, Header, MAX_HEADER_SIZE};
use crate::{dtype, shards};

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MAX_HEADER_SIZE", MAX_HEADER_SIZE)?;
    m.add_class::<SafetensorsHeader>()?;
    m.add_function(wrap_pyfunction!(read_header, m)?)?;
    m.add_function(wrap_pyfunction!(read_headers, m)?)?;
    m.add_function(wrap_pyfunction!(parse_header, m)?)?;
    m.add_function(wrap_pyfunction!(sort_shard_names, m)?)?;
    m.add_function(wrap_pyfunction!(parse_index, m)?)?;
    m.add_function(wrap_pyfunction!(dtype_size, m)?)?;
    Ok(())
}

/// One parsed and validated safetensors header; tensor lists are in data-offset order.
#[pyclass(frozen, module = "shardwise._core")]
pub struct SafetensorsHeader {
    header: Header,
    raw: Py<PyBytes>,
}

impl SafetensorsHeader {
    fn new(py: Python<'_>, mut header: Header) -> Self {
        let raw_bytes = std::mem::take(&mut header.raw);
        let raw = PyBytes::new(py, &raw_bytes).unbind();
        SafetensorsHeader { header, raw }
    }
}

#[pymethods]
impl SafetensorsHeader {
    #[getter]
    fn path(&self) -> &str {
        &self.header.path
    }

    #[getter]
    fn header_size(&self) -> u64 {
        self.header.header_size
    }

    #[getter]
    fn data_start(&self) -> u64 {
        self.header.data_start()
    }

    #[getter]
    fn file_size(&self) -> u64 {
        self.header.file_size
    }

    #[getter]
    fn raw(&self, py: Python<'_>) -> Py<PyBytes> {
        self.raw.clone_ref(py)
    }

    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(md) = &self.header.metadata else {
            return Ok(None);
        };
        let dict = PyDict::new(py);
        for (k, v) in md {
            dict.set_item(k, v)?;
        }
        Ok(Some(dict))
    }

    #[getter]
    fn names(&self) -> Vec<&str> {
        self.header
            .entries
            .iter()
            .map(|e| e.name.as_str())
            .collect()
    }

    #[getter]
    fn dtypes(&self) -> Vec<String> {
        self.header
            .entries
            .iter()
            .map(|e| e.dtype.to_string())
            .collect()
    }

    #[getter]
    fn shapes(&self) -> Vec<Vec<usize>> {
        self.header
            .entries
            .iter()
            .map(|e| e.shape.clone())
            .collect()
    }

    #[getter]
    fn offsets(&self) -> Vec<(usize, usize)> {
        self.header.entries.iter().map(|e| e.data_offsets).collect()
    }

    fn __len__(&self) -> usize {
        self.header.entries.len()
    }

    fn __repr__(&self) -> String {
        let h = &self.header;
        format!(
            "SafetensorsHeader(path={}, tensors={}, header_size={}, data_start={}, file_size={}, metadata={})",
            crate::error::quote(&h.path),
            h.entries.len(),
            h.header_size,
            h.data_start(),
            h.file_size,
            match &h.metadata {
                None => "None".to_string(),
                Some(md) => format!("{} keys", md.len()),
            }
        )
    }
}

/// Parse and fully validate one file's header (data bytes are never read).
#[pyfunction]
fn read_header(py: Python<'_>, path: PathBuf) -> PyResult<SafetensorsHeader> {
    let h = py
        .detach(|| header::read_header(&path))
        .into_py_result(py)?;
    Ok(SafetensorsHeader::new(py, h))
}

/// `read_header` for many files in parallel (GIL released); results in input order.
#[pyfunction]
#[pyo3(signature = (paths, threads = 0))]
fn read_headers(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    threads: usize,
) -> PyResult<Vec<SafetensorsHeader>> {
    let hs = py
        .detach(|| header::read_headers(&paths, threads))
        .into_py_result(py)?;
    Ok(hs
        .into_iter()
        .map(|h| SafetensorsHeader::new(py, h))
        .collect())
}

/// Validate header bytes read elsewhere (e.g. by ranged GETs from object storage): `raw` is the
/// 8-byte prefix and the header, `file_size` the size of the whole file, `path` names it in errors.
#[pyfunction]
fn parse_header(
    py: Python<'_>,
    raw: Vec<u8>,
    file_size: u64,
    path: &str,
) -> PyResult<SafetensorsHeader> {
    let h = py
        .detach(|| header::parse_header(path, raw, file_size))
        .into_py_result(py)?;
    Ok(SafetensorsHeader::new(py, h))
}

/// Numeric-aware sort: `model-2-of-10` before `model-10-of-10`; padding does not matter.
#[pyfunction]
fn sort_shard_names(mut names: Vec<String>) -> Vec<String> {
    shards::sort_shard_names(&mut names);
    names
}

/// What `parse_index` returns: weight map, shard names in numeric order, `total_size`.
type IndexParts = (
    std::collections::BTreeMap<String, String>,
    Vec<String>,
    Option<u64>,
);

/// Validate an index file's bytes: `(weight_map, shards in numeric order, total_size or None)`.
/// HeaderError naming `path` when malformed or when a shard name would escape the folder.
#[pyfunction]
fn parse_index(py: Python<'_>, raw: &[u8], path: &str) -> PyResult<IndexParts> {
    let index = shards::Index::parse(path, raw).into_py_result(py)?;
    let names = index.shards();
    Ok((index.weight_map, names, index.total_size))
}

/// Bytes per element of a safetensors dtype name; HeaderError for unknown names.
#[pyfunction]
fn dtype_size(py: Python<'_>, dtype: &str) -> PyResult<usize> {
    dtype::dtype_size(dtype).into_py_result(py)
}
