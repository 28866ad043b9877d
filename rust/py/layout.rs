//! Binding of the fresh-layout planner: `fresh_layout` (names, dtypes, shapes, metadata → header bytes
//! and data offsets).

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::errors::{header_error, IntoPyResult};
use crate::layout;

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fresh_layout, m)?)?;
    Ok(())
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
                    crate::error::quote(&key)
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
                        crate::error::quote(name)
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
