//! JSON to YAML, written here because serde_yaml is unmaintained. Block style throughout; strings
//! are double-quoted whenever a plain scalar could be read back as something else (a number, a
//! boolean under YAML 1.1 or 1.2, null, an indicator, a comment) or holds characters YAML cannot
//! show raw.

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// Words YAML 1.1 or 1.2 resolve to null or a boolean, compared case-insensitively.
const RESERVED: [&str; 10] = ["null", "~", "true", "false", "yes", "no", "on", "off", "y", "n"];

/// Renders `value` as a YAML document ending in a newline.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_map(&mut out, map, 0, false),
        Value::Array(items) if !items.is_empty() => write_seq(&mut out, items, 0),
        scalar => {
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
    out
}

/// Writes a mapping at `indent`; with `inline_first` the first key follows a `- ` already written.
fn write_map(out: &mut String, map: &Map<String, Value>, indent: usize, inline_first: bool) {
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 || !inline_first {
            pad(out, indent);
        }
        out.push_str(&string_text(key));
        out.push(':');
        write_value(out, value, indent, false);
    }
}

fn write_seq(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        pad(out, indent);
        out.push('-');
        write_value(out, item, indent, true);
    }
}

/// Writes what follows `key:` or `-` at `indent`: a scalar on the same line, a collection on the
/// next lines, except that a mapping after `-` starts on the same line (the compact form).
fn write_value(out: &mut String, value: &Value, indent: usize, after_dash: bool) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push(if after_dash { ' ' } else { '\n' });
            write_map(out, map, indent + 2, after_dash);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_seq(out, items, indent + 2);
        }
        scalar => {
            out.push(' ');
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// A scalar or an empty collection on one line.
fn scalar_text(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string_text(s),
        Value::Array(_) => "[]".to_owned(),
        Value::Object(_) => "{}".to_owned(),
    }
}

/// A string as a plain scalar when that reads back as the same string, else double-quoted.
fn string_text(s: &str) -> String {
    if plain_is_safe(s) { s.to_owned() } else { double_quoted(s) }
}

fn plain_is_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else { return false };
    // Letters, `_` and `/` never start an indicator, a number or a special float such as `.inf`.
    let safe_start = first.is_alphabetic() || first == '_' || first == '/';
    safe_start
        && !s.ends_with(char::is_whitespace)
        && !s.ends_with(':')
        && !s.contains(": ")
        && !s.contains(" #")
        && s.chars().all(|c| c == ' ' || (is_printable(c) && !c.is_whitespace()) || c == '\u{a0}')
        && !RESERVED.iter().any(|r| r.eq_ignore_ascii_case(s))
}

/// YAML's printable set, minus the characters YAML 1.1 reads as line breaks.
fn is_printable(c: char) -> bool {
    matches!(c, '\u{20}'..='\u{7e}' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
        && !matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
}

fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c == ' ' || is_printable(c) => out.push(c),
            c if u32::from(c) <= 0xff => {
                let _ = write!(out, "\\x{:02X}", u32::from(c));
            }
            c if u32::from(c) <= 0xffff => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\U{:08X}", u32::from(c));
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use yaml_rust2::{Yaml, YamlLoader};

    /// Parses YAML with an independent parser and converts it back to JSON.
    fn parse_back(text: &str) -> Value {
        let docs = YamlLoader::load_from_str(text)
            .unwrap_or_else(|e| panic!("emitted YAML does not parse: {e}\n{text}"));
        assert_eq!(docs.len(), 1, "{text}");
        to_json(&docs[0])
    }

    fn to_json(y: &Yaml) -> Value {
        match y {
            Yaml::Null => Value::Null,
            Yaml::Boolean(b) => json!(b),
            Yaml::Integer(i) => json!(i),
            Yaml::Real(r) => json!(r.parse::<f64>().unwrap_or_else(|e| panic!("{r}: {e}"))),
            Yaml::String(s) => json!(s),
            Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
            Yaml::Hash(h) => Value::Object(
                h.iter()
                    .map(|(k, v)| match k {
                        Yaml::String(k) => (k.clone(), to_json(v)),
                        other => panic!("key read back as {other:?}, not a string"),
                    })
                    .collect(),
            ),
            other => panic!("unexpected YAML node {other:?}"),
        }
    }

    const TRICKY: &[&str] = &[
        "",
        " lead",
        "trail ",
        "yes",
        "No",
        "ON",
        "y",
        "null",
        "Null",
        "~",
        "true",
        "FALSE",
        "123",
        "1.5",
        "0x1F",
        "0o17",
        "1e3",
        "-1",
        "+1",
        ".5",
        ".inf",
        "-.inf",
        ".NaN",
        "- item",
        "-",
        "a: b",
        "a #b",
        "a#b",
        "key:",
        "#comment",
        "@at",
        "`tick",
        "'single",
        "\"double",
        "multi\nline",
        "tab\there",
        "bell\u{7}",
        "del\u{7f}",
        "unicode é ✓ 日本",
        "line\u{2028}sep",
        "\u{feff}bom",
        "nonchar\u{fffe}",
        "astral 😀",
        "[list]",
        "{map}",
        "*alias",
        "&anchor",
        "!tag",
        "|pipe",
        ">fold",
        "%pct",
        "10.0.0.1:80",
        "[fd00::1]:443",
        "spiffe://td/ns/a/sa/b",
        "2026-05-20T10:00:00Z",
        "=",
        "?",
        "?x",
        ",comma",
        "a\\b",
        "ends\\",
        "with \"quotes\" inside",
        "a, b",
        "x: ",
        "  ",
        "\r\n",
        "nul\u{0}",
        "ns/default/sa/x",
        "1:30",
        "0777",
        "nbsp\u{a0}x",
    ];

    #[test]
    fn tricky_strings_read_back_unchanged() {
        for s in TRICKY {
            let v = json!(s);
            assert_eq!(parse_back(&to_yaml(&v)), v, "value {s:?} -> {:?}", to_yaml(&v));
            let v = json!({ *s: s, "list": [s] });
            assert_eq!(parse_back(&to_yaml(&v)), v, "key {s:?} -> {:?}", to_yaml(&v));
        }
    }

    #[test]
    fn nested_documents_read_back_unchanged() {
        let v = json!({
            "workloads": [
                {"namespace": "default", "name": "client", "ips": ["10.0.0.5", "fd00::5"],
                 "mode": "strict", "identity": null, "programs": [], "meta": {}},
                {"namespace": "prod", "name": "web", "ips": [], "nested": [[1, 2], [], [[3]]],
                 "deep": {"a": {"b": {"c": [true, false, null, -7, 2.5, 1e100]}}}}
            ],
            "empty_list": [],
            "empty_map": {},
            "count": 18446744073u64,
        });
        assert_eq!(parse_back(&to_yaml(&v)), v, "{}", to_yaml(&v));
        for top in [json!([]), json!({}), json!(null), json!(7), json!("yes"), json!([[], {}])] {
            assert_eq!(parse_back(&to_yaml(&top)), top, "{}", to_yaml(&top));
        }
    }

    #[test]
    fn layout_is_conventional_block_style() {
        // Keys in sorted order, so the result is the same whether or not serde_json keeps order.
        let v = json!({"meta": {"ready": true}, "name": "web", "none": null,
                       "ports": [{"port": 80, "target_port": 8080}], "vips": ["10.96.0.10"],
                       "z": [[1, 2], {"a": []}]});
        let want = "\
meta:
  ready: true
name: web
none: null
ports:
  - port: 80
    target_port: 8080
vips:
  - \"10.96.0.10\"
z:
  -
    - 1
    - 2
  - a: []
";
        assert_eq!(to_yaml(&v), want);
    }

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(
            string_text("spiffe://cluster.local/ns/default/sa/web"),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(string_text("default/client"), "default/client");
        assert_eq!(string_text("yes"), "\"yes\"");
        assert_eq!(string_text("10.0.0.1"), "\"10.0.0.1\"");
        assert_eq!(string_text("a\nb\u{7}"), "\"a\\nb\\x07\"");
        assert_eq!(string_text("\u{2028}"), "\"\\u2028\"");
        assert_eq!(string_text("\u{fffe}"), "\"\\uFFFE\"");
        assert_eq!(scalar_text(&json!(u64::MAX)), "18446744073709551615");
    }
}
