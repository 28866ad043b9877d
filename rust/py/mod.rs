//! The pyo3 layer: argument extraction, GIL release around all file work, error mapping.
//! See `python/shardwise/_core.pyi` for the Python-facing contract.

mod buffers;
mod errors;
mod headers;
mod layout;
mod regions;
mod writer;

use pyo3::prelude::*;

/// Register every binding: one module per part of the core it binds.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    headers::register(m)?;
    layout::register(m)?;
    writer::register(m)?;
    regions::register(m)?;
    Ok(())
}
