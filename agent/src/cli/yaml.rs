//! JSON to YAML for `-o yaml` and `config-dump`, through serde-saphyr (maintained; serde_yaml is
//! not). It quotes any string a YAML 1.1 or 1.2 reader could take for something else.

use serde_json::Value;

/// Why a value could not be rendered as YAML.
pub type Error = serde_saphyr::SerializeError;

/// Renders `value` as a block-style YAML document ending in a newline.
pub fn to_yaml(value: &Value) -> Result<String, Error> {
    let options = serde_saphyr::ser_options! {
        // Indent sequences under their key, as the CLI always has.
        compact_list_indent: false,
        // Never fold a long single-line string (a SAN, a path) over several lines; strings with
        // newlines still come out as literal `|` blocks.
        folded_wrap_chars: usize::MAX,
    };
    serde_saphyr::to_string_with_options(value, options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Renders `value` and parses the text back.
    fn round_trip(value: &Value) -> (String, Value) {
        let text = to_yaml(value).unwrap_or_else(|e| panic!("{value}: {e}"));
        let back = serde_saphyr::from_str(&text)
            .unwrap_or_else(|e| panic!("emitted YAML does not parse: {e}\n{text}"));
        (text, back)
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
        "multi\nline\n",
        "trailing\n\n",
        "\nlead",
        "x\n ",
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
        "---",
        "...",
        "<<",
        "10.0.0.1:80",
        "[fd00::1]:443",
        "fd00::5",
        "::1",
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
            for v in [json!(s), json!({ *s: s, "list": [s] })] {
                let (text, back) = round_trip(&v);
                assert_eq!(back, v, "{s:?} -> {text:?}");
            }
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
            "max": u64::MAX,
            "min": i64::MIN,
            "long": "word ".repeat(40),
        });
        let (text, back) = round_trip(&v);
        assert_eq!(back, v, "{text}");
        for top in [json!([]), json!({}), json!(null), json!(7), json!("yes"), json!([[], {}])] {
            let (text, back) = round_trip(&top);
            assert_eq!(back, top, "{text}");
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
  - - 1
    - 2
  - a: []
";
        assert_eq!(to_yaml(&v).expect("yaml"), want);
    }

    #[test]
    fn multi_line_strings_are_literal_blocks_and_long_lines_stay_whole() {
        let long = "x ".repeat(60);
        let v = json!({"desc": "line one\nline two\n", "long": long});
        let want = format!("desc: |\n  line one\n  line two\nlong: \"{long}\"\n");
        assert_eq!(to_yaml(&v).expect("yaml"), want);
    }

    #[test]
    fn quotes_only_when_needed() {
        let yaml = |s: &str| to_yaml(&json!(s)).expect("yaml");
        assert_eq!(
            yaml("spiffe://cluster.local/ns/default/sa/web"),
            "spiffe://cluster.local/ns/default/sa/web\n"
        );
        assert_eq!(yaml("default/client"), "default/client\n");
        assert_eq!(yaml("yes"), "\"yes\"\n");
        assert_eq!(yaml("10.0.0.1"), "\"10.0.0.1\"\n");
        assert_eq!(yaml("[fd00::1]:443"), "\"[fd00::1]:443\"\n");
        assert_eq!(yaml("a\nb\u{7}"), "\"a\\nb\\a\"\n");
        assert_eq!(yaml("\u{fffe}"), "\"\\uFFFE\"\n");
        assert_eq!(to_yaml(&json!(u64::MAX)).expect("yaml"), "18446744073709551615\n");
    }
}
