//! Character classes used by the pre-tokenizers, as llama.cpp defines them.

use unicode_general_category::{get_general_category, GeneralCategory as G};

#[derive(Clone, Copy, Default)]
pub struct Flags {
    pub letter: bool,
    pub number: bool,
    pub whitespace: bool,
    /// Any category at all (unassigned code points have none).
    pub defined: bool,
}

/// llama.cpp's whitespace set (Unicode White_Space).
pub fn is_whitespace(c: char) -> bool {
    matches!(
        c as u32,
        0x09..=0x0D | 0x20 | 0x85 | 0xA0 | 0x1680 | 0x2000..=0x200A | 0x2028 | 0x2029 | 0x202F | 0x205F | 0x3000
    )
}

pub fn flags(c: char) -> Flags {
    let cat = get_general_category(c);
    let letter = matches!(
        cat,
        G::UppercaseLetter
            | G::LowercaseLetter
            | G::TitlecaseLetter
            | G::ModifierLetter
            | G::OtherLetter
    );
    let number = matches!(cat, G::DecimalNumber | G::LetterNumber | G::OtherNumber);
    let whitespace = is_whitespace(c);
    Flags {
        letter,
        number,
        whitespace,
        defined: whitespace || cat != G::Unassigned,
    }
}

/// GPT-2's reversible map from bytes to printable characters.
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("latin-1 is valid")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("small code point")
        };
    }
    table
}
