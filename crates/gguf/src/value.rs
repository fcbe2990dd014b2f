//! Metadata values.

/// One metadata value. Arrays may nest (arrays of arrays are legal GGUF).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// Any integer value as i128, so callers can range-check once.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            Value::Bool(v) => v.into(),
            _ => return None,
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short human rendering (arrays abbreviated).
    pub fn brief(&self) -> String {
        match self {
            Value::String(s) if s.len() > 80 => format!("{:?}…", &s[..s.floor_char_boundary(80)]),
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{} items]", a.len()),
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            other => format!("{}", other.as_int().unwrap_or_default()),
        }
    }
}

/// An array value. Strings and the common number types are stored packed: a 262,144-token
/// vocabulary costs its text and 8 bytes per token, not a 32-byte `Value` and an allocation
/// per entry (Gemma 3's tokens, scores and types took 27 MiB as values, ~4 MiB packed).
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    Strings(Strings),
    F32(Vec<f32>),
    I32(Vec<i32>),
    /// Any other element type, nested arrays included.
    Values(Vec<Value>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::Strings(s) => s.len(),
            Array::F32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::Values(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name ("string", "f32", …; "?" for an empty array of values).
    pub fn item_type(&self) -> &'static str {
        match self {
            Array::Strings(_) => "string",
            Array::F32(_) => "f32",
            Array::I32(_) => "i32",
            Array::Values(v) => v.first().map_or("?", Value::type_name),
        }
    }

    /// The packed strings, if this is an array of strings.
    pub fn strings(&self) -> Option<&Strings> {
        match self {
            Array::Strings(s) => Some(s),
            _ => None,
        }
    }

    /// Item `i` as a number (integers and floats), `None` if out of range or not a number.
    pub fn f64_at(&self, i: usize) -> Option<f64> {
        match self {
            Array::F32(v) => v.get(i).map(|&x| x.into()),
            Array::I32(v) => v.get(i).map(|&x| x.into()),
            Array::Values(v) => v.get(i).and_then(Value::as_f64),
            Array::Strings(_) => None,
        }
    }

    /// Item `i` as an integer, `None` if out of range or not an integer.
    pub fn int_at(&self, i: usize) -> Option<i128> {
        match self {
            Array::I32(v) => v.get(i).map(|&x| x.into()),
            Array::Values(v) => v.get(i).and_then(Value::as_int),
            Array::F32(_) | Array::Strings(_) => None,
        }
    }

    /// Item `i` as a value of its own (strings copied), for display.
    pub fn get(&self, i: usize) -> Option<Value> {
        match self {
            Array::Strings(s) => s.get(i).map(|t| Value::String(t.to_string())),
            Array::F32(v) => v.get(i).map(|&x| Value::F32(x)),
            Array::I32(v) => v.get(i).map(|&x| Value::I32(x)),
            Array::Values(v) => v.get(i).cloned(),
        }
    }
}

/// Strings stored end to end in one buffer, each found by where it ends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Strings {
    text: String,
    ends: Vec<usize>,
}

impl Strings {
    pub fn with_capacity(n: usize) -> Self {
        Strings {
            text: String::new(),
            ends: Vec::with_capacity(n),
        }
    }

    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        // Every boundary is the end of a pushed `&str`, so a char boundary.
        Some(&self.text[start..end])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).unwrap_or_default())
    }
}

impl<'a> FromIterator<&'a str> for Strings {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        let mut s = Strings::default();
        for t in iter {
            s.push(t);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_strings_come_back_as_pushed() {
        let words = ["", "a", "héllo", "", "<0x0A>", "▁the"];
        let s: Strings = words.iter().copied().collect();
        assert_eq!(s.len(), words.len());
        assert_eq!(s.iter().collect::<Vec<_>>(), words);
        assert_eq!(s.get(words.len()), None);
        let a = Array::Strings(s);
        assert_eq!(a.get(2), Some(Value::String("héllo".into())));
        assert_eq!(a.item_type(), "string");
        assert_eq!(a.f64_at(0), None);
    }

    #[test]
    fn packed_numbers_read_as_values_do() {
        let f = Array::F32(vec![1.5, -2.0]);
        assert_eq!(f.f64_at(1), Some(-2.0));
        assert_eq!(f.int_at(0), None);
        let i = Array::I32(vec![3, -1]);
        assert_eq!(i.int_at(1), Some(-1));
        assert_eq!(i.f64_at(0), Some(3.0));
        assert_eq!(i.f64_at(2), None);
    }
}
