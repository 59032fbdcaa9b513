//! Hand-written JSON members for the per-statement record, which the
//! writer renders once per statement: no serde map machinery, and strings
//! that need no escaping (nearly all) copied in one piece.

/// Appends `s` as a JSON string (always ending in its closing quote).
pub fn string(out: &mut Vec<u8>, s: &str) {
    // A fold without early exit, so the compiler checks many bytes per
    // instruction.
    let plain = s
        .bytes()
        .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if plain {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, s).is_err() {
        // Writing a &str into a Vec cannot fail; keep the JSON valid anyway.
        out.extend_from_slice(b"\"\"");
    }
}

/// Appends `,"key":` (`key` is a plain identifier).
fn key(out: &mut Vec<u8>, key: &str) {
    if out.last() != Some(&b'{') {
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Appends a string member.
pub fn str_member(out: &mut Vec<u8>, name: &str, value: &str) {
    key(out, name);
    string(out, value);
}

/// Appends a string member whose value is `prefix` followed by `n`.
pub fn numbered_member(out: &mut Vec<u8>, name: &str, prefix: &str, n: u64) {
    key(out, name);
    string(out, prefix);
    // Reopen the string before its closing quote for the number.
    out.pop();
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.push(b'"');
}

/// Appends a string member, `null` when there is none.
pub fn opt_str_member(out: &mut Vec<u8>, name: &str, value: Option<&str>) {
    key(out, name);
    match value {
        Some(v) => string(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends an array-of-strings member.
pub fn str_array_member(out: &mut Vec<u8>, name: &str, values: &[String]) {
    key(out, name);
    out.push(b'[');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, v);
    }
    out.push(b']');
}

/// Appends an array-of-strings member from borrowed strings (names of
/// flags and the like).
pub fn str_iter_member<'a>(
    out: &mut Vec<u8>,
    name: &str,
    values: impl IntoIterator<Item = &'a str>,
) {
    key(out, name);
    out.push(b'[');
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, v);
    }
    out.push(b']');
}

/// Appends a number member.
pub fn u64_member(out: &mut Vec<u8>, name: &str, value: u64) {
    key(out, name);
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// Appends a number member, `null` when there is none.
pub fn opt_u64_member(out: &mut Vec<u8>, name: &str, value: Option<u64>) {
    key(out, name);
    match value {
        Some(v) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends a boolean member.
pub fn bool_member(out: &mut Vec<u8>, name: &str, value: bool) {
    key(out, name);
    out.extend_from_slice(if value { b"true" } else { b"false" });
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::Value;

    #[test]
    fn strings_round_trip_through_a_json_parser() {
        for s in [
            "plain",
            "",
            "quote \" and \\ back",
            "tab\there",
            "nul\u{0}",
            "del\u{7f}",
            "é ü 日本",
        ] {
            let mut out = Vec::new();
            out.push(b'{');
            str_member(&mut out, "s", s);
            u64_member(&mut out, "n", 42);
            numbered_member(&mut out, "id", s, 7);
            bool_member(&mut out, "b", true);
            opt_u64_member(&mut out, "some", Some(3));
            opt_u64_member(&mut out, "none", None);
            out.push(b'}');
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["s"], s);
            assert_eq!(v["n"], 42);
            assert_eq!(v["id"], format!("{s}7"));
            assert_eq!(v["b"], true);
            assert_eq!(
                (&v["some"], &v["none"]),
                (&serde_json::json!(3), &Value::Null)
            );
        }
    }
}
