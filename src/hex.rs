//! Lower-case hex of hashes, as shards, plans and model cards record them. A leaf: anything may
//! use it.

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
