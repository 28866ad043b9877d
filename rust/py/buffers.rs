//! Borrow the bytes of Python buffer-protocol objects for writes with the GIL released.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A held buffer: the `PyBuffer` keeps the exporter's memory alive and unmoved until dropped
/// (which needs the GIL; pyo3 takes it in `Drop`).
pub struct Held {
    _buffer: PyBuffer<u8>,
    ptr: usize,
    len: usize,
}

impl Held {
    /// Address and length, to rebuild the slice on another thread (see [`RawSlice::as_slice`]).
    pub fn raw(&self) -> RawSlice {
        RawSlice {
            ptr: self.ptr,
            len: self.len,
        }
    }
}

/// A (pointer, length) pair that may cross into `Python::detach`.
#[derive(Clone, Copy)]
pub struct RawSlice {
    ptr: usize,
    len: usize,
}

impl RawSlice {
    /// The bytes.
    ///
    /// # Safety
    /// The [`Held`] this came from must outlive the returned slice.
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: a C-contiguous buffer of `len` bytes starts at `ptr` (checked when it was taken)
        // and stays alive while the `Held` does (the caller's contract).
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

/// Take the bytes of any C-contiguous buffer-protocol object (`bytes`, `bytearray`, `memoryview`,
/// numpy arrays of any dtype, ...). `what` names it in error messages.
pub fn hold(obj: &Bound<'_, PyAny>, what: &dyn Fn() -> String) -> PyResult<Held> {
    let buffer = match PyBuffer::<u8>::get(obj) {
        Ok(b) => b,
        Err(first) => {
            // Not a buffer of unsigned bytes (or not a buffer at all): look at it as a memoryview
            // and reinterpret it as bytes, which only C-contiguous views allow.
            let py = obj.py();
            let builtins = py.import("builtins")?;
            let view = builtins.getattr("memoryview")?.call1((obj,)).map_err(|_| {
                PyTypeError::new_err(format!(
                    "{}: expected a bytes-like object (buffer protocol), got {}",
                    what(),
                    type_name(obj)
                ))
            })?;
            if !view.getattr("c_contiguous")?.is_truthy()? {
                return Err(not_contiguous(what));
            }
            let cast = view.call_method1("cast", ("B",))?;
            PyBuffer::<u8>::get(&cast).map_err(|_| {
                PyTypeError::new_err(format!("{}: unusable buffer: {first}", what()))
            })?
        }
    };
    if !buffer.is_c_contiguous() {
        return Err(not_contiguous(what));
    }
    let ptr = buffer.buf_ptr() as usize;
    let len = buffer.len_bytes();
    Ok(Held {
        _buffer: buffer,
        ptr,
        len,
    })
}

fn not_contiguous(what: &dyn Fn() -> String) -> PyErr {
    PyValueError::new_err(format!(
        "{}: the buffer is not C-contiguous (make it contiguous first, e.g. tensor.contiguous())",
        what()
    ))
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "an unknown type".into())
}
