//! GGUF reader. A GGUF file is treated as hostile until every count, length, offset and
//! dimension has been checked against the file's real size: a bad file gives a typed
//! [`GgufError`] naming the offending field, never a panic, an out-of-bounds read or an
//! allocation sized by an unchecked number.

mod error;
mod mmap;
mod types;
mod value;

pub use error::{GgufError, Result};
pub use mmap::{advise_huge_pages, Bytes};
pub use types::{file_type_name, GgmlType};
pub use value::{Array, Strings, Value};

use std::collections::HashMap;
use std::path::Path;

pub const MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Arrays of arrays are legal; deeper nesting than this is refused.
pub const MAX_ARRAY_DEPTH: usize = 4;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: u32 = 4;

/// One tensor's description from the header; `offset` is relative to the data section.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost (row length, `ne0`) first, as ggml orders them.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Row length (the contiguous dimension).
    pub fn ne0(&self) -> u64 {
        self.dims[0]
    }
    /// Number of rows: product of all dimensions but the first.
    pub fn n_rows(&self) -> u64 {
        self.dims[1..].iter().product()
    }
}

/// A parsed, validated GGUF file.
pub struct Gguf {
    pub version: u32,
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    bytes: Bytes,
    /// Per tensor, its blocks reordered at load for this CPU's kernels, where they were
    /// (see [`Gguf::replace_layout`]).
    layouts: Vec<std::sync::OnceLock<Vec<u16>>>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Files up to this size are read into memory rather than mapped.
pub const READ_LIMIT: u64 = 2 << 30;

/// How `open` holds a file of `size` bytes: `HEARTH_MMAP=0` copies it into memory,
/// `HEARTH_MMAP=1` maps it (guarded where a lease can be had, else unguarded); by default it
/// is mapped guarded by a read lease ([`mmap`]: a writer is held back until the mapping
/// has become a private copy, so rewriting the file in place cannot SIGBUS the process), and
/// where no lease can be had, copied when up to [`READ_LIMIT`], else mapped unguarded (see
/// SECURITY.md).
///
/// Why map: the weights stay the page cache's (shared with other processes reading the
/// file, dropped and read again under memory pressure instead of pushing the rest out),
/// and loading reads only the pages used, instead of holding the file twice (page cache
/// plus a copy) while it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    Copy,
    MapGuarded,
    Map,
}

pub fn hold(size: u64) -> Hold {
    match std::env::var("HEARTH_MMAP").ok().as_deref() {
        Some("1") => Hold::Map,
        Some("0") => Hold::Copy,
        _ if size <= READ_LIMIT => Hold::MapGuarded,
        _ => Hold::Map,
    }
}

/// Whether `open` copies a file of `size` bytes into memory when no lease can be had.
pub fn read_into_memory(size: u64) -> bool {
    match std::env::var("HEARTH_MMAP").ok().as_deref() {
        Some("1") => false,
        Some("0") => true,
        _ => size <= READ_LIMIT,
    }
}

impl Gguf {
    /// Opens and validates a GGUF file (read into memory or mapped: [`read_into_memory`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(io(std::io::Error::other("not a regular file")));
        }
        if meta.len() == 0 {
            return Err(GgufError::Truncated {
                what: "magic".into(),
                offset: 0,
                need: 4,
                file_size: 0,
            });
        }
        let guarded = match hold(meta.len()) {
            Hold::Copy => None,
            Hold::MapGuarded | Hold::Map => Bytes::map_guarded(path).ok(),
        };
        let bytes = match guarded {
            Some(bytes) => bytes,
            None if read_into_memory(meta.len()) => {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(&file, meta.len()), &mut buf)
                    .map_err(io)?;
                Bytes::Owned(buf)
            }
            None => Bytes::map(&file).map_err(io)?,
        };
        Self::parse(bytes)
    }

    /// Parses a GGUF image held in memory.
    pub fn from_vec(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Bytes::Owned(bytes))
    }

    fn parse(bytes: Bytes) -> Result<Self> {
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
        };
        let magic: [u8; 4] = r.take("magic", 4)?.try_into().expect("took 4 bytes");
        if magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor_count")?;
        let n_kv = r.u64("metadata_kv_count")?;
        // Smallest possible entries bound the counts by the bytes that remain.
        r.check_count("metadata_kv_count", n_kv, 8 + 4 + 1)?;
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut metadata_index = HashMap::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let type_id = r.u32(&format!("type of metadata key {key:?}"))?;
            let value = r.value(&key, type_id, 0)?;
            if metadata_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
            metadata.push((key, value));
        }
        r.check_count("tensor_count", n_tensors, 8 + 4 + 8 + 4 + 8)?;

        let alignment = match metadata_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let v = metadata[i].1.as_int().ok_or_else(|| GgufError::WrongType {
                    key: "general.alignment".into(),
                    expected: "integer",
                    found: metadata[i].1.type_name(),
                })?;
                let a = u64::try_from(v).unwrap_or(0);
                if a == 0 || !a.is_power_of_two() || a > 65536 {
                    return Err(GgufError::BadAlignment(a));
                }
                a
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32(&format!("n_dims of tensor {name:?}"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::TooManyDims {
                    tensor: name,
                    n_dims,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(r.u64(&format!("dim {d} of tensor {name:?}"))?);
            }
            let type_id = r.u32(&format!("type of tensor {name:?}"))?;
            let offset = r.u64(&format!("offset of tensor {name:?}"))?;
            if dims.contains(&0) {
                return Err(GgufError::ZeroDim { tensor: name, dims });
            }
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| GgufError::DimOverflow {
                    tensor: name.clone(),
                    dims: dims.clone(),
                })?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
                tensor: name.clone(),
                type_id,
            })?;
            if dims[0] % ty.block_len() != 0 {
                return Err(GgufError::RowNotBlockAligned {
                    tensor: name,
                    ty,
                    ne0: dims[0],
                    block: ty.block_len(),
                });
            }
            let n_bytes = (n_elements / ty.block_len())
                .checked_mul(ty.block_bytes())
                .ok_or_else(|| GgufError::DimOverflow {
                    tensor: name.clone(),
                    dims: dims.clone(),
                })?;
            if offset % alignment != 0 {
                return Err(GgufError::MisalignedOffset {
                    tensor: name,
                    offset,
                    alignment,
                });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor(name));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_elements,
                n_bytes,
            });
        }

        let file_size = bytes.len() as u64;
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        if data_offset > file_size && !tensors.is_empty() {
            return Err(GgufError::Truncated {
                what: "tensor data section".into(),
                offset: data_offset,
                need: 1,
                file_size,
            });
        }
        let data_size = file_size.saturating_sub(data_offset);
        for t in &tensors {
            let end = t.offset.saturating_add(t.n_bytes);
            if end > data_size {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    end,
                    data_size,
                });
            }
        }
        let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        for pair in by_offset.windows(2) {
            if pair[0].offset + pair[0].n_bytes > pair[1].offset {
                return Err(GgufError::OverlappingTensors {
                    a: pair[0].name.clone(),
                    b: pair[1].name.clone(),
                });
            }
        }

        Ok(Gguf {
            version,
            alignment,
            data_offset,
            metadata,
            metadata_index,
            layouts: tensors.iter().map(|_| std::sync::OnceLock::new()).collect(),
            tensors,
            tensor_index,
            bytes,
        })
    }

    /// Size of the whole file in bytes.
    pub fn file_size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| GgufError::WrongType {
                key: key.into(),
                expected: "string",
                found: v.type_name(),
            }),
        }
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    /// The name of the quantization mix the file declares (`general.file_type`, as
    /// `llama-quantize` names it, e.g. `Q4_K_M`); `None` when absent, malformed or unknown.
    pub fn file_type(&self) -> Option<&'static str> {
        let ft = self
            .get_int("general.file_type", 0, u32::MAX as i128)
            .ok()??;
        file_type_name(ft as u32)
    }

    /// An integer metadata value that must fit `[min, max]`.
    pub fn get_int(&self, key: &str, min: i128, max: i128) -> Result<Option<i128>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = v.as_int().ok_or_else(|| GgufError::WrongType {
            key: key.into(),
            expected: "integer",
            found: v.type_name(),
        })?;
        if n < min || n > max {
            return Err(GgufError::BadValue {
                key: key.into(),
                detail: format!("{n} is outside {min}..={max}"),
            });
        }
        Ok(Some(n))
    }

    pub fn require_usize(&self, key: &str, min: usize, max: usize) -> Result<usize> {
        self.get_int(key, min as i128, max as i128)?
            .map(|n| n as usize)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    pub fn get_usize(&self, key: &str, min: usize, max: usize) -> Result<Option<usize>> {
        Ok(self
            .get_int(key, min as i128, max as i128)?
            .map(|n| n as usize))
    }

    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let x = v.as_f64().ok_or_else(|| GgufError::WrongType {
            key: key.into(),
            expected: "number",
            found: v.type_name(),
        })?;
        if !x.is_finite() {
            return Err(GgufError::BadValue {
                key: key.into(),
                detail: format!("{x} is not finite"),
            });
        }
        Ok(Some(x as f32))
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(GgufError::WrongType {
                key: key.into(),
                expected: "bool",
                found: v.type_name(),
            }),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&Array>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(Some).ok_or_else(|| GgufError::WrongType {
                key: key.into(),
                expected: "array",
                found: v.type_name(),
            }),
        }
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_position(name).map(|i| &self.tensors[i])
    }

    /// Index of a tensor in [`Gguf::tensors`].
    pub fn tensor_position(&self, name: &str) -> Option<usize> {
        self.tensor_index.get(name).copied()
    }

    /// The bytes of a tensor (validated to lie inside the file when the header was parsed).
    /// For a tensor whose layout was replaced ([`Gguf::replace_layout`]) read
    /// [`Gguf::replaced_layout`] instead: these pages were given back, and after a lease
    /// break (see `mmap`) they read as zeros.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.bytes[start..start + info.n_bytes as usize]
    }

    /// Keeps `layout` — tensor `index`'s bytes reordered for this CPU's kernels, at most
    /// 1/32 larger (Q4_K's scales unpacked to bytes) — in place of the file's bytes of it
    /// from now on, and gives the file's pages that hold only this tensor back to the
    /// system, so the tensor is in memory once. False (and nothing changes) if the tensor's
    /// layout was replaced already, the size is out of bounds or the file was read into
    /// memory rather than mapped (its bytes cannot be given back one tensor at a time, so
    /// the copy would double them).
    pub fn replace_layout(&self, index: usize, layout: Vec<u16>) -> bool {
        let info = &self.tensors[index];
        let size = std::mem::size_of_val(&layout[..]) as u64;
        if !self.can_replace_layout()
            || size < info.n_bytes
            || size > info.n_bytes + info.n_bytes / 32
            || self.layouts[index].set(layout).is_err()
        {
            return false;
        }
        let start = (self.data_offset + info.offset) as usize;
        self.bytes.release(start..start + info.n_bytes as usize);
        true
    }

    /// Whether [`Gguf::replace_layout`] can take a tensor's place (a mapped file).
    pub fn can_replace_layout(&self) -> bool {
        self.bytes.is_mapped()
    }

    /// Tensor `index`'s bytes as [`Gguf::replace_layout`] kept them, if it did.
    pub fn replaced_layout(&self, index: usize) -> Option<&[u16]> {
        self.layouts[index].get().map(|v| &v[..])
    }

    /// Looks a tensor up and checks its shape (`ne0` first).
    pub fn tensor_with_shape(&self, name: &str, shape: &[u64]) -> Result<(&TensorInfo, &[u8])> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        if info.dims != shape {
            return Err(GgufError::ShapeMismatch {
                tensor: name.into(),
                expected: shape.to_vec(),
                found: info.dims.clone(),
            });
        }
        Ok((info, self.tensor_bytes(info)))
    }
}

/// A bounds-checked little-endian cursor over the file image.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, what: &str, n: u64) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                need: n,
                file_size: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(what, N as u64)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_item_bytes` long must fit in what remains.
    fn check_count(&self, field: &str, count: u64, min_item_bytes: u64) -> Result<()> {
        let max = self.remaining() / min_item_bytes;
        if count > max {
            return Err(GgufError::TooMany {
                field: field.to_string(),
                count,
                max,
            });
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        self.str(what).map(str::to_string)
    }

    /// A string borrowed from the file image.
    fn str(&mut self, what: &str) -> Result<&'a str> {
        let start = self.pos as u64;
        let len = self.u64(&format!("length of {what}"))?;
        if len > self.remaining() {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                need: len,
                file_size: self.buf.len() as u64,
            });
        }
        let bytes = self.take(what, len)?;
        std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            what: what.to_string(),
            offset: start,
        })
    }

    fn value(&mut self, key: &str, type_id: u32, depth: usize) -> Result<Value> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => {
                let b = self.array::<1>(key)?[0];
                if b > 1 {
                    return Err(GgufError::BadValue {
                        key: key.into(),
                        detail: format!("bool byte is {b}"),
                    });
                }
                Value::Bool(b == 1)
            }
            8 => Value::String(self.string(&format!("value of {key:?}"))?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestingTooDeep {
                        key: key.into(),
                        max_depth: MAX_ARRAY_DEPTH,
                    });
                }
                let elem_type = self.u32(&format!("array type of {key:?}"))?;
                let len = self.u64(&format!("array length of {key:?}"))?;
                let min_elem = match elem_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => {
                        return Err(GgufError::UnknownValueType {
                            key: key.into(),
                            type_id: elem_type,
                        })
                    }
                };
                self.check_count(&format!("array length of {key:?}"), len, min_elem)?;
                let len = len as usize;
                let what = format!("item of {key:?}");
                Value::Array(match elem_type {
                    8 => {
                        let mut items = Strings::with_capacity(len);
                        for _ in 0..len {
                            items.push(self.str(&what)?);
                        }
                        Array::Strings(items)
                    }
                    6 => Array::F32(
                        (0..len)
                            .map(|_| Ok(f32::from_le_bytes(self.array(&what)?)))
                            .collect::<Result<_>>()?,
                    ),
                    5 => Array::I32(
                        (0..len)
                            .map(|_| Ok(i32::from_le_bytes(self.array(&what)?)))
                            .collect::<Result<_>>()?,
                    ),
                    _ => {
                        let mut items = Vec::with_capacity(len);
                        for _ in 0..len {
                            items.push(self.value(key, elem_type, depth + 1)?);
                        }
                        Array::Values(items)
                    }
                })
            }
            10 => Value::U64(u64::from_le_bytes(self.array(key)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            _ => {
                return Err(GgufError::UnknownValueType {
                    key: key.into(),
                    type_id,
                })
            }
        })
    }
}
