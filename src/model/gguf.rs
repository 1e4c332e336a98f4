//! GGUF reader: memory-mapped, zero-copy tensor views, versions 2 and 3.
//!
//! Every length, count and offset in the header is checked against the file
//! size before it is used, so a truncated or lying file gives a [`GgufError`]
//! naming the problem, never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::dtype::DType;

/// `"GGUF"` read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// GGML_MAX_DIMS: no GGUF tensor has more dimensions.
pub const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// What went wrong reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The header is malformed.
    #[error("{0}")]
    Format(String),
}

fn err<T>(msg: impl Into<String>) -> Result<T, GgufError> {
    Err(GgufError::Format(msg.into()))
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as a number, if it is one (bools are 0 or 1).
    pub fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            MetaValue::U8(v) => v as f64,
            MetaValue::I8(v) => v as f64,
            MetaValue::U16(v) => v as f64,
            MetaValue::I16(v) => v as f64,
            MetaValue::U32(v) => v as f64,
            MetaValue::I32(v) => v as f64,
            MetaValue::F32(v) => v as f64,
            MetaValue::Bool(v) => v as u8 as f64,
            MetaValue::U64(v) => v as f64,
            MetaValue::I64(v) => v as f64,
            MetaValue::F64(v) => v,
            MetaValue::Str(_) | MetaValue::Array(_) => return None,
        })
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF type name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
            MetaValue::Array(_) => "array",
        }
    }
}

impl fmt::Display for MetaValue {
    /// Short form: long arrays are summarized.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::Str(s) => {
                let one_line: String = s.chars().take(60).collect();
                let one_line = one_line.replace('\n', "\\n");
                if s.chars().count() > 60 {
                    write!(f, "{one_line:?}…")
                } else {
                    write!(f, "{one_line:?}")
                }
            }
            MetaValue::Array(a) => {
                let kind = a.first().map_or("empty", |v| v.type_name());
                if a.len() <= 8 {
                    write!(f, "[")?;
                    for (i, v) in a.iter().enumerate() {
                        if i > 0 {
                            write!(f, ", ")?;
                        }
                        write!(f, "{v}")?;
                    }
                    write!(f, "]")
                } else {
                    write!(f, "[{} × {kind}]", a.len())
                }
            }
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            other => write!(f, "{}", other.as_f64().unwrap_or(f64::NAN)),
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Dimensions in GGML order: `dims[0]` is the contiguous (fastest) one.
    pub dims: Vec<u64>,
    /// Element type.
    pub dtype: DType,
    /// Offset of the data from the start of the file.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An opened GGUF file: metadata, tensor directory and zero-copy data views.
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in key order.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment (`general.alignment`, default 32).
    pub alignment: u64,
    index: BTreeMap<String, usize>,
    storage: Storage,
}

impl fmt::Debug for Gguf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Memory-map and parse a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; kiln never writes model files. As with
        // any mmap, a file truncated by another process while mapped is UB;
        // that is the documented contract of memmap2.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(Storage::Mmap(map)).map_err(|e| match e {
            GgufError::Format(m) => GgufError::Format(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parse a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf, GgufError> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Gguf, GgufError> {
        let bytes = storage.bytes();
        let mut r = Reader { b: bytes, pos: 0 };
        let magic = r.u32("magic")?;
        if magic != MAGIC {
            if magic.swap_bytes() == MAGIC {
                return err("big-endian GGUF is not supported; convert the model to little-endian");
            }
            return err(format!(
                "not a GGUF file: bad magic {:02x?} (expected \"GGUF\"); is this the right file?",
                &bytes[..4.min(bytes.len())]
            ));
        }
        let version = r.u32("version")?;
        match version {
            2 | 3 => {}
            1 => return err("GGUF version 1 is not supported (only 2 and 3); re-convert the model with a current GGUF converter"),
            v => return err(format!("unknown GGUF version {v} (kiln reads versions 2 and 3)")),
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each kv takes at least 8 (key len) + 4 (type) + 1 bytes; each tensor
        // at least 8 + 4 + 8 + 4 + 8.
        if n_kv > r.remaining() / 13 {
            return err(format!(
                "metadata count {n_kv} is impossible for a file of {} bytes (header corrupt or truncated)",
                bytes.len()
            ));
        }
        if n_tensors > r.remaining() / 32 {
            return err(format!(
                "tensor count {n_tensors} is impossible for a file of {} bytes (header corrupt or truncated)",
                bytes.len()
            ));
        }

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("type of metadata {key:?}"))?;
            let value = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return err(format!("duplicate metadata key {key:?}"));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(MetaValue::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
            Some(v) => {
                return err(format!(
                    "general.alignment must be a power-of-two u32, found {v} ({})",
                    v.type_name()
                ))
            }
        };

        let mut raw = Vec::with_capacity(n_tensors as usize);
        let mut index = BTreeMap::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor #{i} name"))?;
            let n_dims = r.u32(&format!("tensor {name:?} dimension count"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return err(format!(
                    "tensor {name:?} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})"
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(r.u64(&format!("tensor {name:?} dimension {d}"))?);
            }
            let ty = r.u32(&format!("tensor {name:?} type"))?;
            let dtype = DType::from_id(ty).ok_or_else(|| {
                GgufError::Format(format!(
                    "tensor {name:?} has unknown dtype id {ty}; kiln knows GGML types 0..=35 (is the file from a newer GGUF writer?)"
                ))
            })?;
            let offset = r.u64(&format!("tensor {name:?} offset"))?;
            if index.insert(name.clone(), raw.len()).is_some() {
                return err(format!("duplicate tensor name {name:?}"));
            }
            raw.push((name, dims, dtype, offset));
        }

        let data_start = align_up(r.pos as u64, alignment);
        let file_len = bytes.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, dtype, rel) in raw {
            let mut n: u64 = 1;
            for &d in &dims {
                n = n.checked_mul(d).filter(|&n| n <= file_len.saturating_mul(8)).ok_or_else(|| {
                    GgufError::Format(format!(
                        "tensor {name:?} has absurd dimensions {dims:?} for a file of {file_len} bytes"
                    ))
                })?;
            }
            let size = dtype.bytes_for(n).ok_or_else(|| {
                GgufError::Format(format!(
                    "tensor {name:?}: {n} elements of {dtype} are not a whole number of {}-element blocks",
                    dtype.block_size()
                ))
            })?;
            if rel % alignment != 0 {
                return err(format!(
                    "tensor {name:?} offset {rel} is not a multiple of the alignment {alignment}"
                ));
            }
            let offset = data_start.saturating_add(rel);
            let end = offset.saturating_add(size);
            if end > file_len {
                return err(format!(
                    "tensor {name:?} (bytes {offset}..{end}) lies past the end of the file ({file_len} bytes): the file is truncated or corrupt; download it again"
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                dtype,
                offset,
                size,
            });
        }

        Ok(Gguf {
            version,
            metadata,
            tensors,
            alignment,
            index,
            storage,
        })
    }

    /// The tensor with this name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (a view into the mapped file).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        // Bounds were checked at parse time.
        &self.storage.bytes()[info.offset as usize..(info.offset + info.size) as usize]
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A metadata string value.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key).and_then(MetaValue::as_str)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.meta_str("general.architecture")
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.storage.bytes().len() as u64
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a).saturating_mul(a)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&[u8], GgufError> {
        if n > self.remaining() {
            return err(format!(
                "file truncated: reading {what} needs {n} bytes at offset {}, but the file has {} bytes",
                self.pos,
                self.b.len()
            ));
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let s = self.take(len, what)?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_string()),
            // GGUF writers accept any bytes; keep them readable.
            Err(_) => Ok(String::from_utf8_lossy(s).into_owned()),
        }
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>(key)?[0]),
            1 => MetaValue::I8(self.arr::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => {
                let b = self.arr::<1>(key)?[0];
                if b > 1 {
                    return err(format!(
                        "metadata {key:?}: bool has value {b} (expected 0 or 1)"
                    ));
                }
                MetaValue::Bool(b == 1)
            }
            8 => MetaValue::Str(self.string(key)?),
            9 => {
                if depth > 0 {
                    return err(format!("metadata {key:?}: nested arrays are not supported"));
                }
                let elem = self.u32(key)?;
                let count = self.u64(key)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => return err(format!("metadata {key:?}: array of unknown type id {elem}")),
                };
                if count > self.remaining() / min {
                    return err(format!(
                        "metadata {key:?}: array of {count} elements cannot fit in the {} bytes left (file truncated or corrupt)",
                        self.remaining()
                    ));
                }
                let mut v = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    v.push(self.value(elem, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr(key)?)),
            t => return err(format!("metadata {key:?} has unknown value type id {t}")),
        })
    }
}

/// Writes GGUF images: used by tests and tools that make synthetic models.
#[derive(Default)]
pub struct GgufWriter {
    /// Metadata to write, in order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensors: name, GGML dims, dtype, raw data.
    pub tensors: Vec<(String, Vec<u64>, DType, Vec<u8>)>,
}

impl GgufWriter {
    /// Serialize as GGUF version 3 with 32-byte alignment.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut b, k);
            b.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut b, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, dtype, data) in &self.tensors {
            put_str(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&dtype.id().to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align_up(offset + data.len() as u64, DEFAULT_ALIGNMENT);
        }
        let start = align_up(b.len() as u64, DEFAULT_ALIGNMENT) as usize;
        b.resize(start, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            b.resize(start + off as usize, 0);
            b.extend_from_slice(data);
        }
        b
    }
}

fn type_id(v: &MetaValue) -> u32 {
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

fn put_value(b: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => b.push(*x),
        MetaValue::I8(x) => b.push(*x as u8),
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
            let elem = a.first().map_or(4, type_id);
            b.extend_from_slice(&elem.to_le_bytes());
            b.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(b, x);
            }
        }
    }
}
