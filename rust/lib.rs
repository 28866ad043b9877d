//! shardwise's native core: safetensors headers, shard sorting, fresh layouts and atomic parallel
//! writes, in pure Rust; `py` (behind the `python` feature) is the only module that touches pyo3.

pub mod dtype;
pub mod error;
pub mod fileio;
pub mod header;
pub mod json;
pub mod layout;
pub mod pool;
pub mod publish;
pub mod regions;
pub mod shards;
pub mod writer;

#[cfg(feature = "python")]
mod py;

/// The `shardwise._core` extension module.
#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _core(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    py::register(m)
}
