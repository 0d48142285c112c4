//! Flame graphs from `perf script` output: the samples' stacks collapsed into folded form
//! (`comm;outer;...;leaf count`, as Brendan Gregg's stackcollapse-perf writes them) and drawn as
//! an SVG, root at the bottom, each frame as wide as the samples under it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::plot::escape;

/// Width of the picture, in pixels.
const WIDTH: f64 = 1200.0;
/// Left and right margin.
const PAD: f64 = 10.0;
/// Room above the frames for the title.
const TOP: f64 = 60.0;
/// Room below the frames.
const BOTTOM: f64 = 10.0;
/// Height of one frame.
const FRAME_H: f64 = 16.0;
/// Frames under this share of all samples are not drawn (nor is anything above them).
const MIN_SHARE: f64 = 0.001;
/// Font size of the frame labels, and the width one of their characters takes, about.
const FONT: f64 = 11.0;
const CHAR_W: f64 = FONT * 0.6;

/// Stacks and how many samples each was seen in, sorted by stack.
pub type Folded = BTreeMap<String, u64>;

/// Collapses `perf script` text (default fields, recorded with a call graph) into folded stacks:
/// one per distinct call chain, its frames root first, prefixed by the thread's command name.
pub fn collapse(script: &str) -> Folded {
    let mut folded = Folded::new();
    let mut comm: Option<String> = None;
    let mut frames: Vec<String> = Vec::new();
    for line in script.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if let Some(comm) = comm.take() {
                let stack = std::iter::once(comm).chain(frames.drain(..).rev()).collect::<Vec<_>>().join(";");
                *folded.entry(stack).or_default() += 1;
            }
            frames.clear();
        } else if line.starts_with(char::is_whitespace) {
            if comm.is_some() {
                frames.push(frame(line));
            }
        } else if !line.starts_with('#') {
            comm = Some(sample_comm(line));
        }
    }
    folded
}

/// The command name of a sample's header line, `comm  pid/tid  [cpu]  time: period event:`. The
/// name may hold spaces, so it runs up to the first field that is a pid.
fn sample_comm(header: &str) -> String {
    let fields: Vec<&str> = header.split_whitespace().collect();
    let is_pid = |f: &&str| f.split('/').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let end = fields.iter().skip(1).position(is_pid).map_or(1, |i| i + 1);
    clean(&fields[..end].join(" "))
}

/// One stack line, `addr symbol+0xoff (dso)`, as a frame name: the symbol without its offset,
/// or `[dso]` when the symbol is unknown; kernel frames end in `_[k]`.
fn frame(line: &str) -> String {
    let line = line.trim();
    // The address comes first; the frame is named by symbol and object file alone.
    let rest = line.split_once(char::is_whitespace).map_or("", |(_, rest)| rest.trim());
    let (symbol, dso) = match rest.rfind(" (") {
        Some(i) if rest.ends_with(')') => (&rest[..i], &rest[i + 2..rest.len() - 1]),
        _ => (rest, ""),
    };
    let symbol = match symbol.rfind("+0x") {
        Some(i) if symbol[i + 3..].bytes().all(|b| b.is_ascii_hexdigit()) => &symbol[..i],
        _ => symbol,
    };
    let symbol = strip_rust_hash(symbol);
    let kernel = dso.starts_with("[kernel");
    let name = if symbol.is_empty() || symbol == "[unknown]" {
        match dso.rsplit('/').next() {
            Some(file) if !file.is_empty() && dso != "[unknown]" => {
                format!("[{}]", file.trim_matches(['[', ']']))
            }
            _ => "[unknown]".to_owned(),
        }
    } else {
        clean(symbol)
    };
    if kernel { format!("{name}_[k]") } else { name }
}

/// A legacy-mangled Rust symbol's `::h0123456789abcdef` suffix, which differs between builds.
fn strip_rust_hash(symbol: &str) -> &str {
    match symbol.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => head,
        _ => symbol,
    }
}

/// A frame name without the folded format's separators.
fn clean(name: &str) -> String {
    name.replace(';', ",").replace('\n', " ")
}

/// The folded stacks as text, one `stack count` line each.
pub fn folded_text(folded: &Folded) -> String {
    folded.iter().map(|(stack, count)| format!("{stack} {count}\n")).collect()
}

/// A node of the call tree: its samples (inclusive) and its callees by name.
#[derive(Default)]
struct Node {
    count: u64,
    children: BTreeMap<String, Node>,
}

impl Node {
    fn tree(folded: &Folded) -> Node {
        let mut root = Node::default();
        for (stack, &count) in folded {
            root.count += count;
            let mut node = &mut root;
            for name in stack.split(';') {
                node = node.children.entry(name.to_owned()).or_default();
                node.count += count;
            }
        }
        root
    }
}

/// What a frame belongs to, for its colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kernel,
    Crypto,
    Ferry,
    Other,
}

impl Kind {
    fn of(name: &str) -> Kind {
        let lower = name.to_ascii_lowercase();
        if name == "[k]" || name.ends_with("_[k]") {
            Kind::Kernel
        } else if ["aws_lc", "aws-lc", "aes", "gcm", "libcrypto"].iter().any(|k| lower.contains(k)) {
            Kind::Crypto
        } else if name.contains("ferry::") {
            Kind::Ferry
        } else {
            Kind::Other
        }
    }

    /// Base colour; each frame varies it a little by name so neighbours stand apart.
    fn rgb(self) -> [u8; 3] {
        match self {
            Kind::Kernel => [230, 140, 60],
            Kind::Crypto => [160, 120, 210],
            Kind::Ferry => [80, 150, 220],
            Kind::Other => [220, 90, 80],
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Kernel => "kernel",
            Kind::Crypto => "crypto",
            Kind::Ferry => "ferry",
            Kind::Other => "other",
        }
    }
}

/// The frame's fill: its kind's colour, lightened by up to 40 by a hash of its name.
fn fill(name: &str) -> String {
    let hash = name.bytes().fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
    let lift = (hash % 41) as u8;
    let [r, g, b] = Kind::of(name).rgb().map(|c| c.saturating_add(lift));
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// One frame to draw.
struct Rect {
    name: String,
    count: u64,
    depth: usize,
    /// Samples to the left of it on its row.
    offset: u64,
}

/// The frames at least [`MIN_SHARE`] wide, parents before children; the root `all` is depth 0.
fn layout(folded: &Folded) -> (u64, Vec<Rect>) {
    let root = Node::tree(folded);
    let total = root.count;
    let mut rects = Vec::new();
    let mut todo = vec![("all".to_owned(), &root, 0usize, 0u64)];
    while let Some((name, node, depth, offset)) = todo.pop() {
        if total == 0 || (node.count as f64) < MIN_SHARE * total as f64 {
            continue;
        }
        let mut child_offset = offset;
        for (child, n) in &node.children {
            todo.push((child.clone(), n, depth + 1, child_offset));
            child_offset += n.count;
        }
        rects.push(Rect { name, count: node.count, depth, offset });
    }
    (total, rects)
}

/// The label that fits `width` pixels: the whole name, or its start and "..", or nothing.
fn fit(name: &str, width: f64) -> Option<String> {
    let room = ((width - 6.0) / CHAR_W).floor().max(0.0) as usize;
    let len = name.chars().count();
    if len <= room {
        Some(name.to_owned())
    } else if room >= 4 {
        Some(name.chars().take(room - 2).chain("..".chars()).collect())
    } else {
        None
    }
}

/// The flame graph of `folded` as an SVG document, with `title` on top.
pub fn svg(folded: &Folded, title: &str) -> String {
    let (total, rects) = layout(folded);
    let depth = rects.iter().map(|r| r.depth).max().unwrap_or(0);
    let height = TOP + (depth + 1) as f64 * FRAME_H + BOTTOM;
    let plot_w = WIDTH - 2.0 * PAD;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="{FONT}">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" font-size="15" font-weight="bold" text-anchor="middle">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="40" text-anchor="middle" fill="#555">{total} samples; width is the share of samples in a frame and its callees; frames under {}% left out; hover for counts</text>"##,
        WIDTH / 2.0,
        MIN_SHARE * 100.0
    );
    for (i, kind) in [Kind::Ferry, Kind::Crypto, Kind::Kernel, Kind::Other].iter().enumerate() {
        let [r, g, b] = kind.rgb();
        let lx = PAD + i as f64 * 80.0;
        let _ = writeln!(
            svg,
            r##"<rect x="{lx}" y="44" width="10" height="10" fill="#{r:02x}{g:02x}{b:02x}"/>"##
        );
        let _ = writeln!(svg, r#"<text x="{}" y="53">{}</text>"#, lx + 14.0, kind.label());
    }
    for rect in &rects {
        let x = PAD + rect.offset as f64 / total as f64 * plot_w;
        let w = rect.count as f64 / total as f64 * plot_w;
        let y = height - BOTTOM - (rect.depth + 1) as f64 * FRAME_H;
        let share = rect.count as f64 * 100.0 / total as f64;
        let fill = if rect.depth == 0 { "#cccccc".to_owned() } else { fill(&rect.name) };
        let name = escape(&rect.name);
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.2}" y="{y:.1}" width="{w:.2}" height="{}" fill="{fill}" rx="2"><title>{name} ({} samples, {share:.2}%)</title></rect>"#,
            FRAME_H - 1.0,
            rect.count
        );
        if let Some(label) = fit(&rect.name, w) {
            let _ = writeln!(
                svg,
                r#"<text x="{:.2}" y="{:.1}" pointer-events="none">{}</text>"#,
                x + 3.0,
                y + FRAME_H - 4.5,
                escape(&label)
            );
        }
    }
    svg += "</svg>\n";
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ferry sample as `perf script` prints it, from thread `tid`, its frames at offsets
    /// shifted by `shift`.
    fn ferry_sample(tid: u32, shift: u32) -> String {
        format!(
            "tokio-runtime-w 4242/{tid}  9290.319473:     250000 cycles:P: \n\
             \tffffffff81567004 tcp_sendmsg+0x{:x} ([kernel.kallsyms])\n\
             \tffffffff81000130 entry_SYSCALL_64_after_hwframe+0x76 ([kernel.kallsyms])\n\
             \t    7f4c6d6f2ad7 __send+0x{:x} (/usr/lib/x86_64-linux-gnu/libc.so.6)\n\
             \t    55d0c0ffee01 ferry::proxy::relay::copy::h0123456789abcdef+0x1a1 (/work/release/ferry)\n\
             \t    55d0c0ffee00 <tokio::task::Task<[u8; 4]> as Future>::poll+0x10 (/work/release/ferry)\n\n",
            0x24 + shift,
            0x17 + shift
        )
    }

    /// A sample from a thread whose name holds a space, its stack partly unknown.
    const HAPROXY_SAMPLE: &str = "\
haproxy worker 77/78 [001]  9290.321000:     250000 cycles:P: 
\t    7f00000000aa aws_lc_0_28_0_gcm_ghash_avx+0x5 (/usr/lib/libcrypto.so.3)
\t    7f00000000bb [unknown] (/usr/lib/libcrypto.so.3)
\tffffffffffffffff [unknown] ([unknown])
";

    #[test]
    fn perf_script_collapses_into_counted_root_first_stacks() {
        // Two samples of one chain, from different threads of one name and at other offsets.
        let script = ferry_sample(4243, 0) + &ferry_sample(4244, 9) + HAPROXY_SAMPLE;
        let folded = collapse(&script);
        let text = folded_text(&folded);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "haproxy worker;[unknown];[libcrypto.so.3];aws_lc_0_28_0_gcm_ghash_avx 1",
                "tokio-runtime-w;<tokio::task::Task<[u8, 4]> as Future>::poll;ferry::proxy::relay::copy;\
                 __send;entry_SYSCALL_64_after_hwframe_[k];tcp_sendmsg_[k] 2",
            ]
        );
    }

    #[test]
    fn comments_and_an_empty_script_give_nothing() {
        assert!(collapse("# ========\n# captured on: today\n\n").is_empty());
        assert!(svg(&Folded::new(), "empty").contains("0 samples"));
    }

    fn folded(lines: &[(&str, u64)]) -> Folded {
        lines.iter().map(|(s, c)| (s.to_string(), *c)).collect()
    }

    /// (title text, width) of every frame in the SVG.
    fn frames(svg: &str) -> Vec<(String, f64)> {
        svg.lines()
            .filter(|l| l.starts_with("<rect x=") && l.contains("<title>"))
            .map(|l| {
                let width = l.split("width=\"").nth(1).and_then(|s| s.split('"').next()).unwrap();
                let title = l.split("<title>").nth(1).and_then(|s| s.split(" (").next()).unwrap();
                (title.to_owned(), width.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn one_rect_per_frame_as_wide_as_its_samples() {
        let svg = svg(&folded(&[("app;main;work", 300), ("app;main;idle", 100)]), "t");
        let frames = frames(&svg);
        let names: Vec<&str> = frames.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 5, "{names:?}");
        for name in ["all", "app", "main", "work", "idle"] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        let width = |n: &str| frames.iter().find(|(f, _)| f == n).unwrap().1;
        let full = WIDTH - 2.0 * PAD;
        assert!((width("all") - full).abs() < 0.01);
        assert!((width("main") - full).abs() < 0.01);
        assert!((width("work") - full * 0.75).abs() < 0.01);
        assert!((width("idle") - full * 0.25).abs() < 0.01);
        assert!(svg.contains("<title>work (300 samples, 75.00%)</title>"));
    }

    #[test]
    fn frames_under_a_thousandth_are_dropped_with_their_callees() {
        let svg = svg(&folded(&[("app;hot", 10_000), ("app;rare;deeper", 5)]), "t");
        let names: Vec<String> = frames(&svg).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["all", "app", "hot"]);
        assert!(!svg.contains("rare") && !svg.contains("deeper"));
    }

    #[test]
    fn labels_are_cut_to_fit() {
        assert_eq!(fit("main", 200.0).as_deref(), Some("main"));
        let cut = fit("a_rather_long_function_name", 80.0).unwrap();
        assert!(cut.ends_with("..") && (cut.chars().count() as f64) * CHAR_W <= 80.0, "{cut}");
        assert_eq!(fit("main", 10.0), None);
    }

    #[test]
    fn frames_are_coloured_by_kind() {
        assert_eq!(Kind::of("tcp_sendmsg_[k]"), Kind::Kernel);
        assert_eq!(Kind::of("aws_lc_0_28_0_aes_hw_ctr32_encrypt_blocks"), Kind::Crypto);
        assert_eq!(Kind::of("_aesni_ctr32_ghash_6x"), Kind::Crypto);
        assert_eq!(Kind::of("[libcrypto.so.3]"), Kind::Crypto);
        assert_eq!(Kind::of("ferry::proxy::relay::copy"), Kind::Ferry);
        assert_eq!(Kind::of("tokio::runtime::park"), Kind::Other);
        assert_ne!(fill("ferry::a"), fill("tcp_sendmsg_[k]"));
    }
}
