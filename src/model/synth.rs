//! Synthetic models: a GGUF with a real model's shapes, metadata and dtypes
//! but random (valid) weights, so speed can be measured where the real
//! weights cannot be downloaded. A model is described by a small JSON spec
//! (metadata without the big tokenizer arrays, and the tensor list), which
//! `spec_of` extracts from a real GGUF and `write` turns back into a GGUF.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::dtype::DType;
use super::gguf::{Gguf, GgufWriter, MetaValue};
use crate::error::{Error, Result};

/// A model's shape: metadata and tensors (name, dtype, GGML dims).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// Scalar and string metadata (arrays longer than 64 elements dropped).
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Tensors in file order.
    pub tensors: Vec<(String, String, Vec<u64>)>,
}

fn to_json(v: &MetaValue) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    Some(match v {
        MetaValue::Str(s) => J::String(s.clone()),
        MetaValue::Bool(b) => J::Bool(*b),
        MetaValue::F32(f) => serde_json::json!({ "f32": f }),
        MetaValue::F64(f) => serde_json::json!({ "f64": f }),
        MetaValue::Array(a) if a.len() <= 64 => J::Array(a.iter().filter_map(to_json).collect()),
        MetaValue::Array(_) => return None,
        other => serde_json::json!({ other.type_name(): other.as_f64() }),
    })
}

fn from_json(key: &str, v: &serde_json::Value) -> Result<MetaValue> {
    use serde_json::Value as J;
    let bad = || {
        Error::Input(format!(
            "synth spec: metadata '{key}' has an unsupported value {v}"
        ))
    };
    Ok(match v {
        J::String(s) => MetaValue::Str(s.clone()),
        J::Bool(b) => MetaValue::Bool(*b),
        J::Array(a) => {
            MetaValue::Array(a.iter().map(|x| from_json(key, x)).collect::<Result<_>>()?)
        }
        J::Object(o) if o.len() == 1 => {
            let (ty, n) = o.iter().next().ok_or_else(bad)?;
            let n = n.as_f64().ok_or_else(bad)?;
            match ty.as_str() {
                "u8" => MetaValue::U8(n as u8),
                "i8" => MetaValue::I8(n as i8),
                "u16" => MetaValue::U16(n as u16),
                "i16" => MetaValue::I16(n as i16),
                "u32" => MetaValue::U32(n as u32),
                "i32" => MetaValue::I32(n as i32),
                "u64" => MetaValue::U64(n as u64),
                "i64" => MetaValue::I64(n as i64),
                "f32" => MetaValue::F32(n as f32),
                "f64" => MetaValue::F64(n),
                _ => return Err(bad()),
            }
        }
        J::Number(n) => MetaValue::U32(n.as_u64().ok_or_else(bad)? as u32),
        _ => return Err(bad()),
    })
}

/// The spec of a real model.
pub fn spec_of(g: &Gguf) -> Spec {
    Spec {
        metadata: g
            .metadata
            .iter()
            .filter_map(|(k, v)| to_json(v).map(|j| (k.clone(), j)))
            .collect(),
        tensors: g
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype.to_string(), t.dims.clone()))
            .collect(),
    }
}

/// Byte offsets of the f16 scale fields in one block, which must be finite.
fn scale_offsets(d: DType) -> &'static [usize] {
    match d {
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 | DType::IQ4_NL => &[0],
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q2_K => &[80, 82],
        DType::Q3_K => &[108],
        DType::Q6_K => &[208],
        _ => &[],
    }
}

/// Random but valid data for `n` elements of `dtype`: quantized blocks with
/// small finite scales; float weights near `center` (1 for norm-like 1-D
/// weights, 0 otherwise) so activations stay in range.
pub fn random_data(dtype: DType, n: u64, center: f32, rng: &mut u64) -> Result<Vec<u8>> {
    let bytes = dtype.bytes_for(n).ok_or_else(|| {
        Error::Input(format!(
            "synth: {n} elements of {dtype} are not whole blocks"
        ))
    })?;
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let small = |next: &mut dyn FnMut() -> u64| {
        center + ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
    };
    let mut out = Vec::with_capacity(bytes as usize);
    match dtype {
        DType::F32 => (0..n).for_each(|_| out.extend(small(&mut next).to_le_bytes())),
        DType::F16 => {
            (0..n).for_each(|_| out.extend(half::f16::from_f32(small(&mut next)).to_le_bytes()))
        }
        DType::BF16 => {
            (0..n).for_each(|_| out.extend(half::bf16::from_f32(small(&mut next)).to_le_bytes()))
        }
        _ if dtype.is_supported() => {
            while (out.len() as u64) < bytes {
                let v = next().to_le_bytes();
                out.extend_from_slice(&v);
            }
            out.truncate(bytes as usize);
            let bs = dtype.type_size();
            for block in out.chunks_mut(bs) {
                for &o in scale_offsets(dtype) {
                    let s = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-6);
                    block[o..o + 2].copy_from_slice(&s.to_le_bytes());
                }
            }
        }
        _ => return Err(Error::Input(format!("synth: {dtype} is not supported"))),
    }
    Ok(out)
}

/// A GGUF image for `spec` with random weights.
pub fn write(spec: &Spec, seed: u64) -> Result<Vec<u8>> {
    let mut w = GgufWriter::default();
    for (k, v) in &spec.metadata {
        w.metadata.push((k.clone(), from_json(k, v)?));
    }
    let mut rng = seed | 1;
    for (name, dt, dims) in &spec.tensors {
        let dtype = DType::from_name(dt).ok_or_else(|| {
            Error::Input(format!(
                "synth spec: tensor '{name}' has unknown dtype {dt}"
            ))
        })?;
        let n: u64 = dims.iter().product();
        let center = if dims.len() == 1 { 1.0 } else { 0.0 };
        w.tensors.push((
            name.clone(),
            dims.clone(),
            dtype,
            random_data(dtype, n, center, &mut rng)?,
        ));
    }
    Ok(w.to_bytes())
}
