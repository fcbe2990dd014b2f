use std::path::PathBuf;

/// Everything that can be wrong with a GGUF file. Each variant names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0} (supported: 2 and 3)")]
    UnsupportedVersion(u32),
    #[error(
        "file truncated: {what} at offset {offset} needs {need} bytes but the file has {file_size}"
    )]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        file_size: u64,
    },
    #[error("{field} is {count}, more than this file can hold (at most {max})")]
    TooMany { field: String, count: u64, max: u64 },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("metadata key {key:?} has unknown value type {type_id}")]
    UnknownValueType { key: String, type_id: u32 },
    #[error("metadata key {key:?}: arrays nested deeper than {max_depth}")]
    NestingTooDeep { key: String, max_depth: usize },
    #[error("metadata key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("tensor {0:?} appears twice")]
    DuplicateTensor(String),
    #[error("general.alignment is {0}; it must be a non-zero power of two at most 65536")]
    BadAlignment(u64),
    #[error("tensor {tensor:?} has {n_dims} dimensions (at most 4)")]
    TooManyDims { tensor: String, n_dims: u32 },
    #[error("tensor {tensor:?} has a zero dimension: {dims:?}")]
    ZeroDim { tensor: String, dims: Vec<u64> },
    #[error("tensor {tensor:?}: element count of dims {dims:?} overflows")]
    DimOverflow { tensor: String, dims: Vec<u64> },
    #[error("tensor {tensor:?} has unknown or unsupported type id {type_id}")]
    UnknownTensorType { tensor: String, type_id: u32 },
    #[error(
        "tensor {tensor:?}: row length {ne0} is not a multiple of the {ty} block length {block}"
    )]
    RowNotBlockAligned {
        tensor: String,
        ty: crate::GgmlType,
        ne0: u64,
        block: u64,
    },
    #[error("tensor {tensor:?}: offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedOffset {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor {tensor:?}: bytes {offset}..{end} lie outside the data section of {data_size} bytes")]
    TensorOutOfBounds {
        tensor: String,
        offset: u64,
        end: u64,
        data_size: u64,
    },
    #[error("tensors {a:?} and {b:?} overlap in the data section")]
    OverlappingTensors { a: String, b: String },
    #[error("required metadata key {0:?} is missing")]
    MissingKey(String),
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("metadata key {key:?} has an out-of-range value: {detail}")]
    BadValue { key: String, detail: String },
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
    #[error("tensor {tensor:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor {tensor:?} has type {found}, which is not usable here ({detail})")]
    UnsupportedType {
        tensor: String,
        found: crate::GgmlType,
        detail: String,
    },
}

pub type Result<T> = std::result::Result<T, GgufError>;
