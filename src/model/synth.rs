//! Synthetic models: a GGUF with a real model's shapes, metadata and dtypes
//! but random (valid) weights, so speed can be measured where the real
//! weights cannot be downloaded. A model is described by a small JSON spec
//! (metadata without the big tokenizer arrays, and the tensor list), which
//! `spec_of` extracts from a real GGUF and `write_to` turns back into a GGUF.
//!
//! A spec may also name dtype *mixes*: rule lists that rewrite the dtype of
//! every weight with two or more dims (1-D weights such as norms and biases
//! keep theirs), so one shape can be benchmarked in several quantizations.
//! The rules are data in the spec, never tensor names in this code:
//!
//! ```json
//! "mixes": { "q4_k_m": [["blk.{0,1,2}.attn_v.weight", "Q6_K"],
//!                       ["output.weight", "Q6_K"], ["*", "Q4_K"]] }
//! ```
//!
//! A rule is `[glob, dtype]`; the first rule whose glob matches the tensor
//! name wins, and a tensor no rule matches keeps the spec's dtype. Globs know
//! `*` (any run of characters, dots included), `?` (one character) and
//! `{a,b,c}` (alternatives). Besides the spec's own mixes there are the
//! built-in ones in [`BUILTIN_MIXES`]; a spec's mix of the same name wins.

use std::collections::BTreeMap;
use std::io::Write;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::dtype::DType;
use super::gguf::{Gguf, MetaValue};
use crate::error::{Error, Result};

/// A model's shape: metadata and tensors (name, dtype, GGML dims), and
/// optional named dtype mixes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// Scalar and string metadata (arrays longer than 64 elements dropped).
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Tensors in file order.
    pub tensors: Vec<(String, String, Vec<u64>)>,
    /// Named dtype mixes: `[glob, dtype]` rules, first match wins (see the
    /// module documentation). Optional in the JSON.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mixes: BTreeMap<String, Vec<(String, String)>>,
}

/// The mixes every spec has. `as-is` keeps the spec's dtypes; each other one
/// sets every weight of two or more dims to one dtype, the output and token
/// embedding included (like llama.cpp's `--pure`; llama.cpp's own Q4_0 would
/// keep the output in Q6_K: a spec can say that with its own mix of the same
/// name). Such a mix also sets `general.file_type` to llama.cpp's number for
/// it when the spec has that key.
pub const BUILTIN_MIXES: &[(&str, Option<DType>, u32)] = &[
    ("as-is", None, 0),
    ("q4_0", Some(DType::Q4_0), 2),
    ("q8_0", Some(DType::Q8_0), 7),
    ("f16", Some(DType::F16), 1),
];

impl Spec {
    /// Names of the mixes this spec can be written in: the built-in ones,
    /// then the spec's own.
    pub fn mix_names(&self) -> Vec<String> {
        let mut names: Vec<String> = BUILTIN_MIXES
            .iter()
            .map(|m| m.0.to_string())
            .filter(|n| !self.mixes.contains_key(n))
            .collect();
        names.extend(self.mixes.keys().cloned());
        names
    }

    /// This spec with the dtypes of mix `name` (see the module documentation).
    /// Errors name the mix and the rule or tensor at fault: an unknown mix
    /// (listing the known ones), a bad glob, an unknown or unsupported dtype,
    /// a tensor whose rows are not whole blocks of its new dtype.
    pub fn with_mix(&self, name: &str) -> Result<Spec> {
        let mut out = self.clone();
        // The rules as (brace-expanded globs, dtype); a built-in mix is one
        // rule that matches everything.
        let rules: Vec<(Vec<String>, DType)> = if let Some(rules) = self.mixes.get(name) {
            rules
                .iter()
                .map(|(glob, dt)| {
                    let bad = |why: String| {
                        Error::Input(format!(
                            "synth spec: mix '{name}', rule [{glob:?}, {dt:?}]: {why}"
                        ))
                    };
                    Ok((
                        expand_braces(glob).map_err(bad)?,
                        parse_dtype(dt).map_err(bad)?,
                    ))
                })
                .collect::<Result<_>>()?
        } else if let Some((_, dtype, file_type)) = BUILTIN_MIXES.iter().find(|m| m.0 == name) {
            let Some(dtype) = dtype else {
                return Ok(out);
            };
            if let Some(v) = out.metadata.get_mut("general.file_type") {
                *v = serde_json::json!({ "u32": file_type });
            }
            vec![(vec!["*".to_string()], *dtype)]
        } else {
            return Err(Error::Input(format!(
                "synth: unknown mix '{name}'; this spec has: {}",
                self.mix_names().join(", ")
            )));
        };
        for (tname, dt, dims) in &mut out.tensors {
            if dims.len() < 2 {
                continue;
            }
            let hit = rules
                .iter()
                .find(|(globs, _)| globs.iter().any(|g| glob_match(g, tname)));
            if let Some((_, dtype)) = hit {
                *dt = dtype.to_string();
                tensor_dtype(tname, dt, dims)
                    .map_err(|e| Error::Input(format!("{e} (mix '{name}')")))?;
            }
        }
        Ok(out)
    }

    /// Checks that every tensor can be written: a known, supported dtype,
    /// at least one dim, and rows (`dims[0]`) of whole blocks.
    pub fn check(&self) -> Result<()> {
        for (name, dt, dims) in &self.tensors {
            tensor_dtype(name, dt, dims)?;
        }
        Ok(())
    }
}

fn parse_dtype(dt: &str) -> std::result::Result<DType, String> {
    let d = DType::from_name(dt).ok_or_else(|| format!("unknown dtype {dt}"))?;
    if !d.is_supported() {
        return Err(format!(
            "kiln cannot compute with {d}; supported: {}",
            DType::supported()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(d)
}

/// The dtype and element count of a spec tensor, checked against its dims.
fn tensor_dtype(name: &str, dt: &str, dims: &[u64]) -> Result<(DType, u64)> {
    let bad = |why: String| Error::Input(format!("synth spec: tensor '{name}' {dims:?}: {why}"));
    let dtype = parse_dtype(dt).map_err(bad)?;
    if dims.is_empty() || dims.contains(&0) {
        return Err(bad("needs at least one dim, none of them 0".into()));
    }
    let bs = dtype.block_size() as u64;
    if !dims[0].is_multiple_of(bs) {
        return Err(bad(format!(
            "cannot be {dtype}: its rows of {} elements are not whole {bs}-element blocks",
            dims[0]
        )));
    }
    let n = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&n| dtype.bytes_for(n).is_some_and(|b| b < 1 << 48))
        .ok_or_else(|| bad("too many elements".into()))?;
    Ok((dtype, n))
}

/// Expands `{a,b}` alternatives (nested ones too) into plain `*`/`?` globs.
fn expand_braces(glob: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = glob.find('{') else {
        if glob.contains('}') {
            return Err("'}' without '{'".into());
        }
        return Ok(vec![glob.to_string()]);
    };
    // The matching close brace, and the top-level commas in between.
    let (mut depth, mut close, mut cuts) = (0usize, None, vec![open]);
    for (i, c) in glob.char_indices().skip_while(|&(i, _)| i < open) {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(i);
                    break;
                }
            }
            ',' if depth == 1 => cuts.push(i),
            _ => {}
        }
    }
    let close = close.ok_or("'{' without '}'")?;
    cuts.push(close);
    let (head, tail) = (&glob[..open], &glob[close + 1..]);
    let mut out = Vec::new();
    for w in cuts.windows(2) {
        let alt = &glob[w[0] + 1..w[1]];
        out.extend(expand_braces(&format!("{head}{alt}{tail}"))?);
    }
    Ok(out)
}

/// Whether `name` matches a glob of `*` and `?` (after brace expansion).
fn glob_match(glob: &str, name: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (glob.chars().collect(), name.chars().collect());
    let (mut i, mut j) = (0, 0);
    // Where the last `*` was, and where in `s` it would next resume.
    let mut star: Option<(usize, usize)> = None;
    while j < s.len() {
        if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && (p[i] == '?' || p[i] == s[j]) {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
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
        mixes: BTreeMap::new(),
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

/// One step of xorshift64 (state must be nonzero).
fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// A well-mixed nonzero seed from `x` (splitmix64's finalizer).
fn mix_seed(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

/// Bytes each parallel chunk of output fills (a multiple of every block size).
const CHUNK: usize = 1 << 20;

/// Bytes per element and encoder of a float dtype.
type FloatEnc = (usize, fn(f32) -> Vec<u8>);

/// Random but valid data for `n` elements of `dtype`: quantized blocks with
/// small finite scales; float weights near `center` (1 for norm-like 1-D
/// weights, 0 otherwise) so activations stay in range. Deterministic in the
/// state `rng`, which it advances; filled in parallel, about 1 GB/s a core.
pub fn random_data(dtype: DType, n: u64, center: f32, rng: &mut u64) -> Result<Vec<u8>> {
    let bytes = dtype
        .bytes_for(n)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| {
            Error::Input(format!(
                "synth: {n} elements of {dtype} are not whole blocks"
            ))
        })?;
    if !dtype.is_supported() {
        return Err(Error::Input(format!("synth: {dtype} is not supported")));
    }
    *rng |= 1;
    let base = xorshift(rng);
    let mut out = vec![0u8; bytes];
    let float: Option<FloatEnc> = match dtype {
        DType::F32 => Some((4, |x| x.to_le_bytes().to_vec())),
        DType::F16 => Some((2, |x| half::f16::from_f32(x).to_le_bytes().to_vec())),
        DType::BF16 => Some((2, |x| half::bf16::from_f32(x).to_le_bytes().to_vec())),
        _ => None,
    };
    if let Some((size, encode)) = float {
        // 4096 encoded values near `center`, picked by 12 random bits each.
        let mut s = mix_seed(base);
        let table: Vec<u8> = (0..4096)
            .flat_map(|_| {
                let u = (xorshift(&mut s) >> 40) as f32 / (1u64 << 24) as f32;
                encode(center + (u - 0.5) * 0.04)
            })
            .collect();
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut s = mix_seed(base ^ c as u64);
                let mut bits = 0u64;
                for (k, e) in chunk.chunks_exact_mut(size).enumerate() {
                    if k % 5 == 0 {
                        bits = xorshift(&mut s);
                    }
                    let i = ((bits >> (12 * (k % 5))) & 4095) as usize * size;
                    e.copy_from_slice(&table[i..i + size]);
                }
            });
        return Ok(out);
    }
    let bs = dtype.type_size();
    let offsets = scale_offsets(dtype);
    out.par_chunks_mut(CHUNK / bs * bs)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = mix_seed(base ^ c as u64);
            let mut words = chunk.chunks_exact_mut(8);
            for w in &mut words {
                w.copy_from_slice(&xorshift(&mut s).to_le_bytes());
            }
            let rest = words.into_remainder();
            let r = xorshift(&mut s).to_le_bytes();
            rest.copy_from_slice(&r[..rest.len()]);
            for block in chunk.chunks_exact_mut(bs) {
                for &o in offsets {
                    let sc = half::f16::from_f32(0.001 + (xorshift(&mut s) % 1000) as f32 * 1e-6);
                    block[o..o + 2].copy_from_slice(&sc.to_le_bytes());
                }
                center_k_mins(dtype, block, &mut s);
            }
        });
    Ok(out)
}

/// Give a Q4_K or Q5_K super-block (random bytes, finite scales) mins
/// that center its weights, as a real quantizer's do: w = d·sc·q − dmin·m
/// with random 6-bit sc and m biases every weight by about d·7.5·sc, and
/// a model of such rows sums it coherently until its activations
/// overflow. Here dmin = d, sc is 1..=8 (Q5_K: 1..=4) from the xorshift
/// state `s`, and m is sc times the middle of q's range, so each
/// sub-block's weights are d·sc·(q − mid). Other dtypes are left as they
/// are, and their random stream untouched.
fn center_k_mins(dtype: DType, block: &mut [u8], s: &mut u64) {
    let (max_sc, mid2) = match dtype {
        DType::Q4_K => (8u64, 15u64),
        DType::Q5_K => (4, 31),
        _ => return,
    };
    let bits = xorshift(s);
    let (d0, d1) = (block[0], block[1]);
    block[2] = d0;
    block[3] = d1;
    let sc: [u8; 8] = std::array::from_fn(|j| (1 + (bits >> (4 * j)) % max_sc) as u8);
    // (m = ⌈sc · mid2 / 2⌉ ≤ 62: a 6-bit field.)
    let m: [u8; 8] = std::array::from_fn(|j| (u64::from(sc[j]) * mid2).div_ceil(2) as u8);
    // The 12 scale bytes as llama.cpp's get_scale_min_k4 reads them.
    let q = &mut block[4..16];
    for j in 0..4 {
        q[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
}

/// The GGUF type id of a metadata value.
fn meta_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::Str(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_meta(b: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => b.push(*x),
        MetaValue::I8(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => b.push(*x as u8),
        MetaValue::Str(s) => put_str(b, s),
        MetaValue::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Array(a) => {
            b.extend_from_slice(&a.first().map_or(4, meta_type).to_le_bytes());
            b.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_meta(b, x);
            }
        }
    }
}

/// Writes a GGUF (version 3) for `spec` with random weights to `out`,
/// streaming: one tensor's data is in memory at a time, so an 8B-class model
/// needs well under a gigabyte. Returns the bytes written.
pub fn write_to(spec: &Spec, seed: u64, out: &mut dyn Write) -> Result<u64> {
    let io = |e: std::io::Error| Error::Input(format!("synth: writing the GGUF: {e}"));
    let mut metadata = Vec::new();
    for (k, v) in &spec.metadata {
        metadata.push((k.as_str(), from_json(k, v)?));
    }
    let align = match metadata.iter().find(|(k, _)| *k == "general.alignment") {
        Some((_, MetaValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(Error::Input(format!(
                "synth spec: general.alignment must be a power-of-two u32, found {v:?}"
            )))
        }
        None => 32,
    };
    let mut tensors = Vec::new();
    for (name, dt, dims) in &spec.tensors {
        tensors.push(tensor_dtype(name, dt, dims)?);
    }
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(spec.tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in &metadata {
        put_str(&mut head, k);
        head.extend_from_slice(&meta_type(v).to_le_bytes());
        put_meta(&mut head, v);
    }
    let mut offset = 0u64;
    let mut sizes = Vec::new();
    for ((name, _, dims), &(dtype, n)) in spec.tensors.iter().zip(&tensors) {
        put_str(&mut head, name);
        head.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&dtype.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        // Checked by tensor_dtype.
        let size = dtype.bytes_for(n).unwrap_or(0);
        sizes.push(size);
        offset = (offset + size).next_multiple_of(align);
    }
    let pad = |len: u64| vec![0u8; (len.next_multiple_of(align) - len) as usize];
    let mut written = head.len() as u64;
    out.write_all(&head).map_err(io)?;
    let p = pad(written);
    out.write_all(&p).map_err(io)?;
    written += p.len() as u64;
    let mut rng = mix_seed(seed);
    for ((_, _, dims), (&(dtype, n), size)) in spec.tensors.iter().zip(tensors.iter().zip(sizes)) {
        let center = if dims.len() == 1 { 1.0 } else { 0.0 };
        let data = random_data(dtype, n, center, &mut rng)?;
        debug_assert_eq!(data.len() as u64, size);
        out.write_all(&data).map_err(io)?;
        let p = pad(size);
        out.write_all(&p).map_err(io)?;
        written += size + p.len() as u64;
    }
    out.flush().map_err(io)?;
    Ok(written)
}

/// A GGUF image for `spec` with random weights, in memory (see [`write_to`]).
pub fn write(spec: &Spec, seed: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_to(spec, seed, &mut out)?;
    Ok(out)
}
