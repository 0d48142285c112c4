//! Flame graphs from `perf script` output, with the `inferno` crate: its perf collapser folds the
//! samples' stacks (`root;outer;...;leaf count`, as Brendan Gregg's stackcollapse-perf writes
//! them) and its flame graph writer draws them as an interactive SVG. The one thing added here is
//! the root: each stack starts with the mesh process it was sampled in (`agent node-b`, say) and
//! then the thread's name, so one picture holds every process and a share per process can be read
//! off the folded file.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, anyhow};
use inferno::collapse::{Collapse as _, perf};
use inferno::flamegraph::{self, color};

/// Stacks and how many samples each was seen in, sorted by stack.
pub type Folded = BTreeMap<String, u64>;

/// Collapses `perf script` text (default fields, recorded with a call graph) into folded stacks,
/// root first. Kernel frames end in `_[k]`. `processes` names the sampled pids; a sample of any
/// other pid is rooted at `pid N`.
/// Counts are inferno's: each sample weighs its event period (cycles, or nanoseconds of a clock
/// event), so a share of the counts is a share of CPU time.
pub fn collapse(script: &[u8], processes: &[(u32, String)]) -> Result<Folded> {
    let text = String::from_utf8_lossy(script);
    if !text.lines().any(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        // Nothing but perf's header comments (inferno insists on seeing an event).
        return Ok(Folded::new());
    }
    let mut options = perf::Options::default();
    options.annotate_kernel = true;
    options.include_pid = true;
    options.nthreads = 1;
    let mut out = Vec::new();
    let folded = std::panic::catch_unwind(move || {
        perf::Folder::from(options).collapse(script, &mut out).map(|()| out)
    });
    let out = folded
        .map_err(|_| anyhow!("inferno's perf collapser panicked on this perf script output"))?
        .context("folding perf script output")?;
    let text = String::from_utf8(out).map_err(|_| anyhow!("inferno folded stacks that are not UTF-8"))?;
    let mut folded = Folded::new();
    for line in text.lines() {
        let (stack, count) =
            line.rsplit_once(' ').ok_or_else(|| anyhow!("folded line without a count: {line:?}"))?;
        let count: u64 = count.parse().with_context(|| format!("bad count in {line:?}"))?;
        // inferno roots each stack at `comm-PID`.
        let (root, frames) = stack.split_once(';').unwrap_or((stack, ""));
        let (comm, pid) = root.rsplit_once('-').unwrap_or((root, ""));
        let process = pid
            .parse::<u32>()
            .ok()
            .and_then(|pid| processes.iter().find(|(p, _)| *p == pid))
            .map_or_else(|| format!("pid {pid}"), |(_, name)| name.clone());
        let stack = [process.as_str(), comm]
            .into_iter()
            .chain(frames.split(';').filter(|f| !f.is_empty()).map(strip_rust_hash))
            .collect::<Vec<_>>()
            .join(";");
        *folded.entry(stack).or_default() += count;
    }
    Ok(folded)
}

/// A legacy-mangled Rust symbol's `::h0123456789abcdef` suffix, which differs between builds.
fn strip_rust_hash(symbol: &str) -> &str {
    match symbol.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => head,
        _ => symbol,
    }
}

/// The folded stacks as text, one `stack count` line each.
pub fn folded_text(folded: &Folded) -> String {
    folded.iter().map(|(stack, count)| format!("{stack} {count}\n")).collect()
}

/// The unit of the counts of `perf script` output: its first sample's event, a clock (ns) or
/// cycles.
pub fn unit(script: &[u8]) -> &'static str {
    let text = String::from_utf8_lossy(script);
    let first = text.lines().find(|l| !l.trim().is_empty() && !l.starts_with(['#', ' ', '\t']));
    match first {
        Some(header) if header.contains("clock") => "ns",
        _ => "cycles",
    }
}

/// The flame graph of `folded` as an SVG document (inferno's, with its search and zoom), with
/// `title` on top; frames coloured by Rust semantics, counts in `unit`.
pub fn svg(folded: &Folded, title: &str, unit: &str) -> Result<String> {
    let mut options = flamegraph::Options::default();
    options.title = title.to_owned();
    options.subtitle =
        Some("width is the share of CPU time (event periods) in a frame and its callees".to_owned());
    options.colors = color::Palette::Multi(color::MultiPalette::Rust);
    options.hash = true;
    options.count_name = unit.to_owned();
    let text = folded_text(folded);
    let mut out = Vec::new();
    if folded.is_empty() {
        // inferno refuses an empty profile; an empty picture says the same.
        return Ok(format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1200\" height=\"60\"><text x=\"10\" \
             y=\"30\">{}: 0 samples</text></svg>\n",
            title.replace('&', "&amp;").replace('<', "&lt;")
        ));
    }
    flamegraph::from_lines(&mut options, text.lines(), &mut out).context("drawing the flame graph")?;
    String::from_utf8(out).map_err(|_| anyhow!("inferno wrote an SVG that is not UTF-8"))
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
             \t    55d0c0ffee00 tokio::runtime::task::raw::poll+0x10 (/work/release/ferry)\n\n",
            0x24 + shift,
            0x17 + shift
        )
    }

    /// A sample of another process, its stack partly unknown.
    const HAPROXY_SAMPLE: &str = "\
haproxy 77/78 [001]  9290.321000:     250000 cycles:P: 
\t    7f00000000aa aws_lc_0_28_0_gcm_ghash_avx+0x5 (/usr/lib/libcrypto.so.3)
\t    7f00000000bb [unknown] (/usr/lib/libcrypto.so.3)

";

    #[test]
    fn perf_script_collapses_into_stacks_rooted_at_their_process() {
        // Two samples of one chain, from different threads and at other offsets.
        let script = ferry_sample(4243, 0) + &ferry_sample(4244, 9) + HAPROXY_SAMPLE;
        let folded = collapse(script.as_bytes(), &[(4242, "agent node-b".to_owned())]).unwrap();
        let text = folded_text(&folded);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(
            lines[0],
            "agent node-b;tokio-runtime-w;tokio::runtime::task::raw::poll;ferry::proxy::relay::copy;\
             __send;entry_SYSCALL_64_after_hwframe_[k];tcp_sendmsg_[k] 500000",
            "each sample weighs its period"
        );
        assert!(lines[1].starts_with("pid 77;haproxy;"), "{text}");
        assert!(lines[1].ends_with(";aws_lc_0_28_0_gcm_ghash_avx 250000"), "{text}");
        assert_eq!(unit(script.as_bytes()), "cycles");
        assert_eq!(unit(b"ferry 1/2 9290.3: 1001001 cpu-clock:ppp: \n\tabc f (x)\n"), "ns");
    }

    #[test]
    fn comments_and_an_empty_script_give_nothing() {
        assert!(collapse(b"# ========\n# captured on: today\n\n", &[]).unwrap().is_empty());
        assert!(svg(&Folded::new(), "empty", "ns").unwrap().contains("0 samples"));
    }

    #[test]
    fn the_svg_holds_every_frame_with_its_count() {
        let folded: Folded = [("app;main;work", 300), ("app;main;idle", 100)]
            .iter()
            .map(|(s, c)| (s.to_string(), *c))
            .collect();
        let svg = svg(&folded, "a <title>", "samples").unwrap();
        assert!(svg.starts_with("<?xml") && svg.contains("<svg"), "{}", &svg[..200]);
        assert!(svg.contains("a &lt;title&gt;"), "the title is escaped");
        for frame in
            ["work (300 samples, 75.00%)", "idle (100 samples, 25.00%)", "main (400 samples, 100.00%)"]
        {
            assert!(svg.contains(frame), "{frame} missing");
        }
    }

    #[test]
    fn rust_hashes_are_dropped() {
        assert_eq!(strip_rust_hash("ferry::a::b::h0123456789abcdef"), "ferry::a::b");
        assert_eq!(strip_rust_hash("ferry::a::hash"), "ferry::a::hash");
    }
}
