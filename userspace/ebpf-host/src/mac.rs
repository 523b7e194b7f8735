//! MAC addresses as the gate's maps key them.

/// A 48-bit Ethernet address.
pub type Mac = [u8; 6];

/// Parses `aa:bb:cc:dd:ee:ff` (hex, `:` or `-` separated).
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &Mac) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_format() {
        let mac = [0x52, 0x54, 0x00, 0xab, 0x0c, 0x01];
        assert_eq!(parse_mac("52:54:00:ab:0c:01"), Some(mac));
        assert_eq!(parse_mac("52-54-00-AB-0C-01"), Some(mac));
        assert_eq!(format_mac(&mac), "52:54:00:ab:0c:01");
        for bad in ["", "52:54:00:ab:0c", "52:54:00:ab:0c:01:02", "52:54:00:ab:0c:1g", "525:4:00:ab:0c:01"] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }
}
