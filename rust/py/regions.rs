//! Bindings of the collective writer's file work: `create_files` (full-size files with their headers)
//! and `write_regions` (each rank's segments, written with `pwritev`).

use std::path::PathBuf;

use pyo3::prelude::*;

use super::buffers::{hold, Held};
use super::errors::IntoPyResult;
use crate::regions::{self, NewFile, Region, RegionFile, Segment};

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(create_files, m)?)?;
    m.add_function(wrap_pyfunction!(write_regions, m)?)?;
    Ok(())
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
