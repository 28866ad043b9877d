//! Bindings of the atomic file writer and of directory publication: `write_file(s)`, `fsync_dir`,
//! `publish_dir`; the buffers are held (and the GIL released) for the whole write.

use std::path::PathBuf;

use pyo3::prelude::*;

use super::buffers::{hold, Held};
use super::errors::IntoPyResult;
use crate::publish;
use crate::writer::{self, FileSpec, Piece};

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(write_file, m)?)?;
    m.add_function(wrap_pyfunction!(write_files, m)?)?;
    m.add_function(wrap_pyfunction!(fsync_dir, m)?)?;
    m.add_function(wrap_pyfunction!(publish_dir, m)?)?;
    Ok(())
}

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
    py.detach(|| publish::fsync_dir(&path)).into_py_result(py)
}

/// Atomically make directory `staging` visible as `final`.
#[pyfunction]
fn publish_dir(py: Python<'_>, staging: PathBuf, r#final: PathBuf) -> PyResult<()> {
    py.detach(|| publish::publish_dir(&staging, &r#final))
        .into_py_result(py)
}
