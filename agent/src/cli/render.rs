//! The CLI's human output for each command, from the admin API's typed answers.

use std::fmt::Display;

use crate::admin::model::{
    BpfView, CertView, ConnectionView, PolicyView, ServiceView, StatusView, Timestamp, WorkloadView,
};

use super::table::Table;

/// The text for a missing value.
const NONE: &str = "-";

/// `ferry status`: one labelled line per field.
pub fn status(s: &StatusView) -> String {
    let version = match &s.commit {
        Some(c) => format!("{} ({c})", s.version),
        None => s.version.clone(),
    };
    let lines = [
        ("Node", s.node.clone()),
        ("Version", version),
        ("Uptime", duration(s.uptime_seconds as f64)),
        ("Ready", if s.ready { "yes" } else { "no" }.to_owned()),
        ("Pods enrolled", s.pods_enrolled.to_string()),
        ("Active connections", s.active_connections.to_string()),
        ("Log level", or_dash(s.log_level.as_deref())),
        (
            "Policies",
            match &s.policy_error {
                Some(e) => format!("FAILED TO LOAD, every inbound connection is denied: {e}"),
                None => s.policies.to_string(),
            },
        ),
    ];
    labelled(&lines)
}

/// Lines of `Label:  value` with the values aligned.
pub fn labelled(lines: &[(&str, String)]) -> String {
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    lines.iter().map(|(k, v)| format!("{:<width$}  {v}\n", format!("{k}:"), width = width)).collect()
}

/// `ferry workloads`.
pub fn workloads(list: &[WorkloadView]) -> Table {
    let mut t =
        Table::new(&["NAMESPACE", "NAME", "IP", "STEERED", "APP-PEER", "MODE", "IDENTITY", "PROGRAMS"]);
    for w in list {
        let programs: Vec<&str> = w.programs.iter().map(|p| p.strip_prefix("ferry_").unwrap_or(p)).collect();
        let programs = if w.enrolled || !programs.is_empty() {
            join_or_dash(&programs)
        } else if let Some(why) = &w.waiting {
            format!("waiting: {why}")
        } else {
            "not enrolled".to_owned()
        };
        t.row(vec![
            w.namespace.clone(),
            w.name.clone(),
            join_or_dash(&w.ips),
            join_or_dash(&w.steered_ips),
            match (&w.app_source, &w.app_source_note) {
                (Some(source), Some(note)) => format!("{source} ({note})"),
                (Some(source), None) => source.clone(),
                _ => "-".to_owned(),
            },
            w.mode.as_str().to_owned(),
            or_dash(w.identity.as_deref()),
            programs,
        ]);
    }
    t
}

/// `ferry services`.
pub fn services(list: &[ServiceView]) -> Table {
    let mut t = Table::new(&["NAMESPACE", "NAME", "VIPS", "PORTS", "ENDPOINTS"]);
    for s in list {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| {
                if p.port == p.target_port {
                    p.port.to_string()
                } else {
                    format!("{}->{}", p.port, p.target_port)
                }
            })
            .collect();
        let endpoints: Vec<&str> = s.endpoints.iter().map(|e| e.pod.as_str()).collect();
        t.row(vec![
            s.namespace.clone(),
            s.name.clone(),
            join_or_dash(&s.vips),
            join_or_dash(&ports),
            join_or_dash(&endpoints),
        ]);
    }
    t
}

/// `ferry certs`; times relative to `now`.
pub fn certs(list: &[CertView], now: Timestamp) -> Table {
    let mut t = Table::new(&["IDENTITY", "SERIAL", "NOT_AFTER", "NEXT_RENEWAL", "STATE"]);
    for c in list {
        let state = serde_json::to_value(c.state).ok().and_then(|v| v.as_str().map(str::to_owned));
        t.row(vec![
            c.identity.clone(),
            c.serial.clone(),
            when(c.not_after, now),
            c.next_renewal.map_or_else(|| NONE.to_owned(), |r| when(r, now)),
            state.unwrap_or_else(|| NONE.to_owned()),
        ]);
    }
    t
}

/// `ferry policies`: one row per rule, so each rule's enforcement shows.
pub fn policies(list: &[PolicyView]) -> Table {
    let mut t = Table::new(&["NAMESPACE", "NAME", "ACTION", "SELECTS", "RULE", "ENFORCED"]);
    for p in list {
        let action = if p.dry_run { format!("{} (dry-run)", p.action) } else { p.action.clone() };
        let selects = if p.workloads.is_empty() { NONE.to_owned() } else { p.workloads.join(",") };
        if p.rules.is_empty() {
            let what = if p.action == "ALLOW" {
                "no rules: matches nothing (denies its workloads)"
            } else {
                "no rules"
            };
            t.row(vec![
                p.namespace.clone(),
                p.name.clone(),
                action,
                selects,
                NONE.to_owned(),
                what.to_owned(),
            ]);
            continue;
        }
        for r in &p.rules {
            t.row(vec![
                p.namespace.clone(),
                p.name.clone(),
                action.clone(),
                selects.clone(),
                r.index.to_string(),
                r.enforcement.clone(),
            ]);
        }
    }
    t
}

/// `ferry connections`.
pub fn connections(list: &[ConnectionView]) -> Table {
    let mut t = Table::new(&[
        "ID",
        "DIRECTION",
        "POD",
        "SRC",
        "ORIGINAL_DST",
        "ENDPOINT",
        "IDENTITIES",
        "PROTOCOL",
        "REQUESTS",
        "BYTES_SENT",
        "BYTES_RECEIVED",
        "AGE",
    ]);
    for c in list {
        let identities = match (&c.source_identity, &c.destination_identity) {
            (None, None) => NONE.to_owned(),
            (s, d) => format!(
                "{} -> {}",
                s.as_deref().map_or_else(|| NONE.to_owned(), short_identity),
                d.as_deref().map_or_else(|| NONE.to_owned(), short_identity)
            ),
        };
        t.row(vec![
            c.id.to_string(),
            c.direction.as_str().to_owned(),
            c.pod.clone(),
            c.src.to_string(),
            c.original_dst.to_string(),
            c.endpoint.map_or_else(|| NONE.to_owned(), |e| e.to_string()),
            identities,
            c.protocol.clone().unwrap_or_else(|| NONE.to_owned()),
            c.requests.to_string(),
            c.bytes_sent.to_string(),
            c.bytes_received.to_string(),
            duration(c.age_seconds),
        ]);
    }
    t
}

/// `ferry bpf`: programs, links per pod, pod counters, maps and node counters, as titled tables.
pub fn bpf(view: &BpfView) -> String {
    if view.capture == "iptables" {
        return "Capture: iptables (the pod's REDIRECT rules send its traffic to this agent; \
                no eBPF programs are loaded)\n"
            .to_owned();
    }
    let mut programs = Table::new(&["NAME", "ID", "TYPE"]);
    for p in &view.programs {
        programs.row(vec![p.name.clone(), p.id.to_string(), or_dash(p.kind.as_deref())]);
    }
    let mut links = Table::new(&["POD", "PROGRAM", "LINK_ID", "CGROUP"]);
    let mut pods = Table::new(&["POD", "OUTBOUND_REDIRECTS", "INBOUND_STEERS"]);
    for pod in &view.pods {
        for l in &pod.links {
            let cgroup = or_dash(pod.cgroup.as_deref());
            links.row(vec![pod.pod.clone(), l.program.clone(), l.id.to_string(), cgroup]);
        }
        pods.row(vec![pod.pod.clone(), pod.outbound_redirects.to_string(), pod.inbound_steers.to_string()]);
    }
    let mut maps = Table::new(&["NAME", "ENTRIES", "MAX_ENTRIES"]);
    for m in &view.maps {
        let max = m.max_entries.map_or_else(|| NONE.to_owned(), |n| n.to_string());
        maps.row(vec![m.name.clone(), m.entries.to_string(), max]);
    }
    let mut counters = Table::new(&["COUNTER", "VALUE"]);
    for (name, value) in &view.counters {
        counters.row(vec![name.clone(), value.to_string()]);
    }
    let sections = [
        ("Programs", programs),
        ("Links", links),
        ("Pod counters", pods),
        ("Maps", maps),
        ("Counters", counters),
    ];
    let mut out = String::new();
    for (i, (title, table)) in sections.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("{title}:\n"));
        if table.is_empty() {
            out.push_str("  (none)\n");
        } else {
            out.push_str(&table.render());
        }
    }
    out
}

/// `spiffe://TD/ns/NS/sa/SA` as `NS/SA` (the table is narrow; JSON has the full ID); anything
/// else unchanged.
pub fn short_identity(id: &str) -> String {
    let short = id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(_, path)| path.strip_prefix("ns/"))
        .and_then(|p| p.split_once("/sa/"))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'));
    match short {
        Some((ns, sa)) => format!("{ns}/{sa}"),
        None => id.to_owned(),
    }
}

/// A duration as `45s`, `3m12s`, `2h5m` or `3d4h`.
pub fn duration(seconds: f64) -> String {
    let s = if seconds.is_finite() && seconds > 0.0 { seconds as u64 } else { 0 };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// An absolute time with its distance from `now`: `2026-05-21T10:00:00Z (in 11h0m)`.
pub fn when(t: Timestamp, now: Timestamp) -> String {
    let delta = t.unix_seconds() - now.unix_seconds();
    let rel = if delta >= 0 {
        format!("in {}", duration(delta as f64))
    } else {
        format!("{} ago", duration(delta.unsigned_abs() as f64))
    };
    format!("{} ({rel})", t.to_rfc3339())
}

fn or_dash(v: Option<&str>) -> String {
    v.unwrap_or(NONE).to_owned()
}

fn join_or_dash<T: Display>(items: &[T]) -> String {
    if items.is_empty() {
        return NONE.to_owned();
    }
    items.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::model::{BpfLinkView, BpfMapView, BpfPodView, BpfProgramView};

    #[test]
    fn durations_and_times() {
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(59.9), "59s");
        assert_eq!(duration(192.0), "3m12s");
        assert_eq!(duration(7500.0), "2h5m");
        assert_eq!(duration(273_600.0), "3d4h");
        assert_eq!(duration(f64::NAN), "0s");
        let now = Timestamp::from_unix_seconds(1_779_271_200);
        let later = Timestamp::from_unix_seconds(1_779_271_200 + 39_600);
        assert_eq!(when(later, now), "2026-05-20T21:00:00Z (in 11h0m)");
        assert_eq!(when(now, later), "2026-05-20T10:00:00Z (11h0m ago)");
    }

    #[test]
    fn identities_shorten_only_when_well_formed() {
        assert_eq!(short_identity("spiffe://cluster.local/ns/default/sa/web"), "default/web");
        assert_eq!(short_identity("spiffe://td/other/path"), "spiffe://td/other/path");
        assert_eq!(short_identity("spiffe://td/ns/a/sa/b/c"), "spiffe://td/ns/a/sa/b/c");
        assert_eq!(short_identity("plain"), "plain");
    }

    #[test]
    fn bpf_has_a_section_per_part() {
        let view = BpfView {
            capture: "ebpf".into(),
            programs: vec![BpfProgramView { name: "ferry_connect4".into(), id: 41, kind: None }],
            pods: vec![BpfPodView {
                pod: "default/client".into(),
                cgroup: Some("/sys/fs/cgroup/client".into()),
                links: vec![BpfLinkView { program: "ferry_connect4".into(), id: 7 }],
                outbound_redirects: 10,
                inbound_steers: 3,
            }],
            maps: vec![BpfMapView { name: "COUNTERS".into(), entries: 2, max_entries: None }],
            counters: Default::default(),
        };
        let text = bpf(&view);
        assert!(text.contains("Programs:\nNAME             ID   TYPE\nferry_connect4   41   -\n"), "{text}");
        assert!(text.contains("default/client   ferry_connect4   7         /sys/fs/cgroup/client"), "{text}");
        assert!(text.contains("default/client   10                   3\n"), "{text}");
        assert!(text.contains("COUNTERS   2         -\n"), "{text}");
        assert!(text.ends_with("Counters:\n  (none)\n"), "{text}");
    }

    #[test]
    fn bpf_of_an_iptables_sidecar_says_so() {
        let view = BpfView { capture: "iptables".into(), ..Default::default() };
        let text = bpf(&view);
        assert!(text.starts_with("Capture: iptables "), "{text}");
        assert!(!text.contains("Programs:"), "{text}");
    }
}
