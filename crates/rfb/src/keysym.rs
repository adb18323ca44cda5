//! X keysyms (what an RFB KeyEvent carries) to Linux input key codes (what virtio-input
//! sends): the keys of a US keyboard. A shifted symbol maps to its key; the client sends
//! the Shift key itself.

/// The Linux key code for `keysym`, or None for a key the keyboard does not have.
pub fn to_linux_key(keysym: u32) -> Option<u16> {
    if let Some(c) = char::from_u32(keysym).filter(|c| c.is_ascii() && !c.is_ascii_control()) {
        return ascii_key(c.to_ascii_lowercase());
    }
    Some(match keysym {
        0xff08 => 14,          // BackSpace
        0xff09 => 15,          // Tab
        0xff0d | 0xff8d => 28, // Return, KP_Enter
        0xff1b => 1,           // Escape
        0xffff => 111,         // Delete
        0xff50 => 102,         // Home
        0xff51 => 105,         // Left
        0xff52 => 103,         // Up
        0xff53 => 106,         // Right
        0xff54 => 108,         // Down
        0xff55 => 104,         // Page_Up
        0xff56 => 109,         // Page_Down
        0xff57 => 107,         // End
        0xff63 => 110,         // Insert
        0xffbe..=0xffc7 => {
            // F1..F10 are 59..68.
            59 + u16::try_from(keysym - 0xffbe).ok()?
        }
        0xffc8 => 87,           // F11
        0xffc9 => 88,           // F12
        0xffe1 => 42,           // Shift_L
        0xffe2 => 54,           // Shift_R
        0xffe3 => 29,           // Control_L
        0xffe4 => 97,           // Control_R
        0xffe5 => 58,           // Caps_Lock
        0xffe7 | 0xffeb => 125, // Meta_L, Super_L
        0xffe8 | 0xffec => 126, // Meta_R, Super_R
        0xffe9 => 56,           // Alt_L
        0xffea => 100,          // Alt_R
        _ => return None,
    })
}

/// The key of a printable ASCII character (lower case for letters).
fn ascii_key(c: char) -> Option<u16> {
    const ROWS: [(&str, u16); 4] = [
        ("qwertyuiop", 16),
        ("asdfghjkl", 30),
        ("zxcvbnm", 44),
        ("1234567890", 2),
    ];
    for (row, first) in ROWS {
        if let Some(i) = row.find(c) {
            return Some(first + u16::try_from(i).ok()?);
        }
    }
    Some(match c {
        ' ' => 57,
        '-' | '_' => 12,
        '=' | '+' => 13,
        '[' | '{' => 26,
        ']' | '}' => 27,
        ';' | ':' => 39,
        '\'' | '"' => 40,
        '`' | '~' => 41,
        '\\' | '|' => 43,
        ',' | '<' => 51,
        '.' | '>' => 52,
        '/' | '?' => 53,
        '!' => 2,
        '@' => 3,
        '#' => 4,
        '$' => 5,
        '%' => 6,
        '^' => 7,
        '&' => 8,
        '*' => 9,
        '(' => 10,
        ')' => 11,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::to_linux_key;

    #[test]
    fn letters_digits_and_named_keys_map_to_linux_codes() {
        assert_eq!(to_linux_key(u32::from('a')), Some(30)); // KEY_A
        assert_eq!(to_linux_key(u32::from('A')), Some(30));
        assert_eq!(to_linux_key(u32::from('q')), Some(16)); // KEY_Q
        assert_eq!(to_linux_key(u32::from('m')), Some(50)); // KEY_M
        assert_eq!(to_linux_key(u32::from('1')), Some(2)); // KEY_1
        assert_eq!(to_linux_key(u32::from('0')), Some(11)); // KEY_0
        assert_eq!(to_linux_key(u32::from('!')), Some(2));
        assert_eq!(to_linux_key(u32::from(' ')), Some(57)); // KEY_SPACE
        assert_eq!(to_linux_key(0xff0d), Some(28)); // Return: KEY_ENTER
        assert_eq!(to_linux_key(0xffbe), Some(59)); // F1
        assert_eq!(to_linux_key(0xffc7), Some(68)); // F10
        assert_eq!(to_linux_key(0xffe1), Some(42)); // Shift_L
    }

    #[test]
    fn unknown_keysyms_map_to_nothing() {
        assert_eq!(to_linux_key(0), None);
        assert_eq!(to_linux_key(0x20ac), None); // EuroSign
        assert_eq!(to_linux_key(u32::MAX), None);
        assert_eq!(to_linux_key(0x7f), None);
    }
}
