//! The pyo3 layer: argument extraction, GIL release around all file work, error mapping.
//! See `python/shardwise/_core.pyi` for the Python-facing contract.

mod buffers;
mod errors;

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::header::{self, Header, MAX_HEADER_SIZE};
use crate::regions::{self, NewFile, Region, RegionFile, Segment};
use crate::writer::{self, FileSpec, Piece};
use crate::{layout, shards};
use buffers::{hold, Held};
use errors::{header_error, IntoPyResult};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MAX_HEADER_SIZE", MAX_HEADER_SIZE)?;
    m.add_class::<SafetensorsHeader>()?;
    m.add_function(wrap_pyfunction!(read_header, m)?)?;
    m.add_function(wrap_pyfunction!(read_headers, m)?)?;
    m.add_function(wrap_pyfunction!(parse_header, m)?)?;
    m.add_function(wrap_pyfunction!(sort_shard_names, m)?)?;
    m.add_function(wrap_pyfunction!(parse_index, m)?)?;
    m.add_function(wrap_pyfunction!(dtype_size, m)?)?;
    m.add_function(wrap_pyfunction!(fresh_layout, m)?)?;
    m.add_function(wrap_pyfunction!(write_file, m)?)?;
    m.add_function(wrap_pyfunction!(write_files, m)?)?;
    m.add_function(wrap_pyfunction!(create_files, m)?)?;
    m.add_function(wrap_pyfunction!(write_regions, m)?)?;
    m.add_function(wrap_pyfunction!(fsync_dir, m)?)?;
    m.add_function(wrap_pyfunction!(publish_dir, m)?)?;
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
            header::quote(&h.path),
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
    layout::dtype_size(dtype).into_py_result(py)
}

fn extract_metadata(
    py: Python<'_>,
    metadata: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<Vec<(String, String)>>> {
    let Some(obj) = metadata.filter(|m| !m.is_none()) else {
        return Ok(None);
    };
    let items = match obj.cast::<PyDict>() {
        Ok(d) => d.items().into_any(),
        Err(_) => obj.call_method0("items")?,
    };
    let mut out = Vec::new();
    for item in items.try_iter()? {
        let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
        let key: String = k.extract().map_err(|_| {
            header_error(
                py,
                format!("metadata keys must be str, got {}", type_name(&k)),
            )
        })?;
        let value: String = v.extract().map_err(|_| {
            header_error(
                py,
                format!(
                    "metadata values must be str, got {} for key {}",
                    type_name(&v),
                    header::quote(&key)
                ),
            )
        })?;
        out.push((key, value));
    }
    Ok(Some(out))
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Header bytes (8-byte prefix included) and per-input (begin, end) data offsets, byte-identical to
/// what the `safetensors` library writes for the same tensors and metadata (metadata keys are
/// written in the mapping's iteration order).
#[pyfunction]
#[pyo3(signature = (names, dtypes, shapes, metadata))]
fn fresh_layout(
    py: Python<'_>,
    names: Vec<String>,
    dtypes: Vec<String>,
    shapes: Vec<Vec<i64>>,
    metadata: Option<Bound<'_, PyAny>>,
) -> PyResult<LayoutResult> {
    let md = extract_metadata(py, metadata.as_ref())?;
    let mut ushapes = Vec::with_capacity(shapes.len());
    for (i, shape) in shapes.iter().enumerate() {
        let s: Option<Vec<usize>> = shape.iter().map(|&d| usize::try_from(d).ok()).collect();
        match s {
            Some(s) => ushapes.push(s),
            None => {
                let name = names.get(i).map_or("?", |n| n.as_str());
                return Err(header_error(
                    py,
                    format!(
                        "tensor {} has a negative dimension in shape {shape:?}",
                        header::quote(name)
                    ),
                ));
            }
        }
    }
    let l = layout::fresh_layout(&names, &dtypes, &ushapes, md.as_deref()).into_py_result(py)?;
    Ok((PyBytes::new(py, &l.header).unbind(), l.offsets))
}

/// `fresh_layout`'s result: header bytes and per-input (begin, end) offsets.
type LayoutResult = (Py<PyBytes>, Vec<(usize, usize)>);

/// A file to write whose buffers are held for the duration of the call.
struct HeldFile {
    path: PathBuf,
    header: Held,
    pieces: Vec<(u64, Held)>,
}

fn hold_file(
    path: PathBuf,
    header: &Bound<'_, PyAny>,
    pieces: &Bound<'_, PyAny>,
) -> PyResult<HeldFile> {
    let shown = path.display().to_string();
    let header = hold(header, &|| format!("{shown}: header"))?;
    let mut held = Vec::new();
    for (i, item) in pieces.try_iter()?.enumerate() {
        let (offset, obj): (u64, Bound<'_, PyAny>) = item?.extract()?;
        held.push((
            offset,
            hold(&obj, &|| format!("{shown}: piece {i} (offset {offset})"))?,
        ));
    }
    Ok(HeldFile {
        path,
        header,
        pieces: held,
    })
}

fn write_held(py: Python<'_>, files: &[HeldFile], fsync: bool, threads: usize) -> PyResult<u64> {
    py.detach(|| {
        // SAFETY: every slice borrows from a `Held` in `files`, which outlives this closure.
        let specs: Vec<FileSpec<'_>> = files
            .iter()
            .map(|f| FileSpec {
                path: f.path.clone(),
                header: unsafe { f.header.raw().as_slice() },
                pieces: f
                    .pieces
                    .iter()
                    .map(|(offset, h)| Piece {
                        offset: *offset,
                        data: unsafe { h.raw().as_slice() },
                    })
                    .collect(),
            })
            .collect();
        writer::write_files(&specs, fsync, threads)
    })
    .into_py_result(py)
}

/// Write `header` then every buffer at `len(header) + offset` into a pre-sized temp file next to
/// `path`, in parallel with the GIL released; rename it into place. Returns the bytes written.
#[pyfunction]
#[pyo3(signature = (path, header, pieces, fsync = true, threads = 0))]
fn write_file(
    py: Python<'_>,
    path: PathBuf,
    header: Bound<'_, PyAny>,
    pieces: Bound<'_, PyAny>,
    fsync: bool,
    threads: usize,
) -> PyResult<u64> {
    let held = hold_file(path, &header, &pieces)?;
    write_held(py, std::slice::from_ref(&held), fsync, threads)
}

/// `write_file` for several files sharing one thread pool; all-or-nothing per file.
#[pyfunction]
#[pyo3(signature = (files, fsync = true, threads = 0))]
fn write_files(
    py: Python<'_>,
    files: Bound<'_, PyAny>,
    fsync: bool,
    threads: usize,
) -> PyResult<u64> {
    let mut held = Vec::new();
    for item in files.try_iter()? {
        let (path, header, pieces): (PathBuf, Bound<'_, PyAny>, Bound<'_, PyAny>) =
            item?.extract()?;
        held.push(hold_file(path, &header, &pieces)?);
    }
    write_held(py, &held, fsync, threads)
}

/// fsync a directory so that renames inside it are durable.
#[pyfunction]
fn fsync_dir(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    py.detach(|| writer::fsync_dir(&path)).into_py_result(py)
}

/// Atomically make directory `staging` visible as `final`.
#[pyfunction]
fn publish_dir(py: Python<'_>, staging: PathBuf, r#final: PathBuf) -> PyResult<()> {
    py.detach(|| writer::publish_dir(&staging, &r#final))
        .into_py_result(py)
}

/// Create files at their final size with their header written (the coordinator of a distributed
/// save); all-or-nothing.
#[pyfunction]
#[pyo3(signature = (files, fsync = true))]
fn create_files(py: Python<'_>, files: Bound<'_, PyAny>, fsync: bool) -> PyResult<()> {
    let mut held = Vec::new();
    for item in files.try_iter()? {
        let (path, header, size): (PathBuf, Bound<'_, PyAny>, u64) = item?.extract()?;
        let shown = path.display().to_string();
        let h = hold(&header, &|| format!("{shown}: header"))?;
        held.push((path, h, size));
    }
    py.detach(|| {
        // SAFETY: every slice borrows from a `Held` in `held`, which outlives this closure.
        let specs: Vec<NewFile<'_>> = held
            .iter()
            .map(|(path, h, size)| NewFile {
                path: path.clone(),
                header: unsafe { h.raw().as_slice() },
                size: *size,
            })
            .collect();
        regions::create_files(&specs, fsync)
    })
    .into_py_result(py)
}

/// Segments from a C-contiguous buffer of int64 triples (src, dst, len).
fn segments_of(obj: &Bound<'_, PyAny>, what: &dyn Fn() -> String) -> PyResult<Vec<Segment>> {
    let held = hold(obj, what)?;
    // SAFETY: the slice borrows from `held`, alive for this function.
    let bytes = unsafe { held.raw().as_slice() };
    if bytes.len() % 24 != 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{}: segments must be int64 triples (src, dst, len); got {} bytes",
            what(),
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(bytes.len() / 24);
    for t in bytes.chunks_exact(24) {
        let mut v = [0u64; 3];
        for (k, word) in t.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(word);
            let x = i64::from_ne_bytes(b);
            v[k] = u64::try_from(x).map_err(|_| {
                pyo3::exceptions::PyValueError::new_err(format!(
                    "{}: negative segment value {x}",
                    what()
                ))
            })?;
        }
        out.push(Segment {
            src: v[0],
            dst: v[1],
            len: v[2],
        });
    }
    Ok(out)
}

/// A file's held buffers and their segments.
type HeldRegions = (PathBuf, Vec<(Held, Vec<Segment>)>);

/// Write byte ranges of buffers into existing files with positional writes (`pwritev` per run
/// contiguous in the file), in parallel with the GIL released; fsync each file if asked.
#[pyfunction]
#[pyo3(signature = (files, fsync = true, threads = 0))]
fn write_regions(
    py: Python<'_>,
    files: Bound<'_, PyAny>,
    fsync: bool,
    threads: usize,
) -> PyResult<u64> {
    let mut held: Vec<HeldRegions> = Vec::new();
    for item in files.try_iter()? {
        let (path, regions): (PathBuf, Bound<'_, PyAny>) = item?.extract()?;
        let shown = path.display().to_string();
        let mut rs = Vec::new();
        for (i, r) in regions.try_iter()?.enumerate() {
            let (data, segs): (Bound<'_, PyAny>, Bound<'_, PyAny>) = r?.extract()?;
            let h = hold(&data, &|| format!("{shown}: region {i}"))?;
            let s = segments_of(&segs, &|| format!("{shown}: region {i} segments"))?;
            rs.push((h, s));
        }
        held.push((path, rs));
    }
    py.detach(|| {
        // SAFETY: every slice borrows from a `Held` in `held`, which outlives this closure.
        let specs: Vec<RegionFile<'_>> = held
            .iter()
            .map(|(path, rs)| RegionFile {
                path: path.clone(),
                regions: rs
                    .iter()
                    .map(|(h, s)| Region {
                        data: unsafe { h.raw().as_slice() },
                        segments: s.clone(),
                    })
                    .collect(),
            })
            .collect();
        regions::write_regions(&specs, fsync, threads)
    })
    .into_py_result(py)
}
