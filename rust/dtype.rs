//! safetensors dtypes: the names the crate knows, their bit sizes, and tensor byte sizes.

use safetensors::Dtype;
use serde::Deserialize;

use crate::error::{quote, Error, Result};

/// Every dtype name the safetensors crate knows, in its enum order.
pub const DTYPE_NAMES: [&str; 22] = [
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
];

/// The crate's `Dtype` for a safetensors dtype name (exact, case-sensitive), if it knows it.
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    use serde::de::IntoDeserializer;
    let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        name.into_deserializer();
    Dtype::deserialize(de).ok()
}

/// Bits per element of `dtype`.
pub fn dtype_bits(dtype: Dtype) -> usize {
    dtype.bitsize()
}

pub(crate) fn unknown_dtype(name: &str) -> Error {
    Error::invalid(format!(
        "unknown dtype {}; known dtypes: {}",
        quote(name),
        DTYPE_NAMES.join(", ")
    ))
}

/// Bytes per element of the dtype called `name`. Sub-byte dtypes (F4, F6_*) have no whole byte
/// size and are refused, as are unknown names.
pub fn dtype_size(name: &str) -> Result<usize> {
    let dtype = parse_dtype(name).ok_or_else(|| unknown_dtype(name))?;
    let bits = dtype_bits(dtype);
    if !bits.is_multiple_of(8) {
        return Err(Error::invalid(format!(
            "dtype {dtype} has {bits} bits per element, less than a byte; it has no byte size"
        )));
    }
    Ok(bits / 8)
}

/// Byte size of a tensor of `dtype` and `shape`; messages name the tensor.
pub(crate) fn tensor_nbytes(
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> std::result::Result<usize, String> {
    let overflow = || {
        format!(
            "tensor {}: the size of shape {shape:?} of dtype {dtype} overflows",
            quote(name)
        )
    };
    let nelements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    let nbits = nelements
        .checked_mul(dtype_bits(dtype))
        .ok_or_else(overflow)?;
    if nbits % 8 != 0 {
        return Err(format!(
            "tensor {}: {nelements} elements of the {}-bit dtype {dtype} are not a whole number of bytes",
            quote(name),
            dtype_bits(dtype)
        ));
    }
    Ok(nbits / 8)
}
