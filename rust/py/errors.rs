//! Map core errors to the `shardwise.errors` family.
//!
//! `Error::Format` -> `shardwise.errors.HeaderError(message)` (a `ValueError`);
//! `Error::Io` -> `shardwise.errors.CheckpointIOError(errno, strerror, filename)` (an `OSError`).
//! The classes are looked up when an error is raised; if `shardwise.errors` cannot be imported the
//! plain `ValueError` / `OSError` are raised instead, with the same arguments.

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::BoundObject;

use crate::error::Error;

fn instantiate<'py>(
    py: Python<'py>,
    class: &str,
    args: impl IntoPyObject<'py, Target = PyTuple>,
) -> PyResult<PyErr> {
    let cls = py.import("shardwise.errors")?.getattr(class)?;
    let args = args.into_pyobject(py).map_err(Into::into)?.into_bound();
    Ok(PyErr::from_value(cls.call1(args)?))
}

/// A `HeaderError` (or `ValueError`) carrying `msg`.
pub fn header_error(py: Python<'_>, msg: String) -> PyErr {
    instantiate(py, "HeaderError", (msg.as_str(),)).unwrap_or_else(|_| PyValueError::new_err(msg))
}

/// The Python exception for a core error.
pub fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
    match &err {
        Error::Format { .. } => header_error(py, err.to_string()),
        Error::Io { path, .. } => {
            let errno = err.errno().unwrap_or(libc::EIO);
            let strerror = err.strerror();
            instantiate(
                py,
                "CheckpointIOError",
                (errno, strerror.as_str(), path.as_str()),
            )
            .unwrap_or_else(|_| PyOSError::new_err((errno, strerror, path.clone())))
        }
    }
}

/// `.map_err(...)` helper: core results into Python results.
pub trait IntoPyResult<T> {
    fn into_py_result(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for crate::error::Result<T> {
    fn into_py_result(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_pyerr(py, e))
    }
}
