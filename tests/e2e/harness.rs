//! Self-tests of the simulated-node harness (no agent): connectivity, cgroup placement, teardown
//! on drop and on panic, two linked nodes, the sweep of leftovers, and the agent wrapper.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use ferry_tests::testapp::{self, ConnectOpts};
use ferry_tests::{Agent, MeshFile, Pod, SimNode, cgroup, cleanup, link_nodes, names, netns};

/// Timeout for quick commands.
const SHORT: Duration = Duration::from_secs(10);

/// `ip netns list`, as an operator would check it.
fn ip_netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `ip netns list` shows `name` as a whole word.
fn netns_listed(name: &str) -> bool {
    ip_netns_list().lines().any(|l| l.split_whitespace().next() == Some(name))
}

/// "net:[inode]" of a namespace file, as /proc/PID/ns/net links read.
fn netns_id(path: &Path) -> String {
    format!("net:[{}]", std::fs::metadata(path).expect("netns file").ino())
}

/// Connects from `client` to `server`'s IPv4 and IPv6 addresses and checks every connection:
/// echo intact, answered by `tag`, and (no agent, no NAT) the server saw the client's own address,
/// which is also the address the client used.
fn echo_over_both_families(
    client: &Pod,
    server: &Pod,
    port: u16,
    opts: &ConnectOpts,
    tag: &str,
) -> Result<()> {
    for (dst, src) in [
        (IpAddr::from(server.ipv4()), IpAddr::from(client.ipv4())),
        (IpAddr::from(server.ipv6()), IpAddr::from(client.ipv6())),
    ] {
        let report = testapp::connect(client, SocketAddr::new(dst, port), opts)?;
        let conns = opts.conns as u64;
        assert_eq!((report.ok, report.failed), (conns, 0), "{report:?}");
        assert_eq!(report.tags.get(tag), Some(&conns), "{report:?}");
        assert_eq!(report.bytes_echoed, conns * opts.bytes as u64, "{report:?}");
        assert_eq!(ips(&report.peers_seen_by_server), vec![src; opts.conns], "{report:?}");
        assert_eq!(ips(&report.local_addrs), vec![src; opts.conns], "{report:?}");
    }
    Ok(())
}

/// The IPs (without ports) of "ip:port" / "[ip]:port" strings.
fn ips(addrs: &[String]) -> Vec<IpAddr> {
    addrs.iter().map(|a| a.parse::<SocketAddr>().expect("socket address").ip()).collect()
}

#[test]
fn pods_on_one_node_reach_each_other_over_v4_and_v6() -> Result<()> {
    let mut node = SimNode::new("node-a", 1)?;
    let client = node.add_pod("client")?;
    let server = node.add_pod("server-1")?;
    assert_eq!(client.ipv4(), Ipv4Addr::new(10, 233, 1, 2));
    assert_eq!(server.ipv6().to_string(), "fd00:233:1::3");
    let _server = testapp::serve(&server, 8080, "server-1")?;

    let opts = ConnectOpts { bytes: 200_000, conns: 4, ..ConnectOpts::default() };
    echo_over_both_families(&client, &server, 8080, &opts, "server-1")?;
    // Unreachable port: the report says failed, it is not a harness error.
    let report =
        testapp::connect(&client, SocketAddr::new(server.ipv4().into(), 9), &ConnectOpts::default())?;
    assert_eq!((report.ok, report.failed), (0, 1), "{report:?}");
    assert!(report.errors[0].contains("connect"), "{report:?}");
    Ok(())
}

#[test]
fn rr_measures_round_trips() -> Result<()> {
    let mut node = SimNode::new("node-rr", 7)?;
    let client = node.add_pod("client")?;
    let server = node.add_pod("server")?;
    let _server = testapp::serve(&server, 7000, "rr")?;
    let report = testapp::rr(&client, SocketAddr::new(server.ipv4().into(), 7000), 1024, 300, 20)?;
    assert_eq!(report.count, 300);
    assert!(report.p50_us > 0.0, "{report:?}");
    assert!(report.p50_us <= report.p90_us && report.p90_us <= report.p99_us, "{report:?}");
    assert!(report.mean_us > 0.0, "{report:?}");
    Ok(())
}

#[test]
fn code_lands_in_the_pod_netns_and_cgroup() -> Result<()> {
    let mut node = SimNode::new("node-cg", 2)?;
    let pod = node.add_pod("client")?;
    let pod_cgroup = cgroup::relative(pod.cgroup_path())?;
    let pod_netns = netns_id(pod.netns_path());
    assert!(
        pod_cgroup.starts_with("/ferry-test-") && pod_cgroup.ends_with("-node-cg/client"),
        "{pod_cgroup}"
    );

    let (child_cgroup, child_netns) = pod.run_in_cgroup(|| {
        let netns = std::fs::read_link("/proc/self/ns/net").unwrap().display().to_string();
        (cgroup::of_process("self").unwrap(), netns)
    })?;
    assert_eq!(child_cgroup, pod_cgroup);
    assert_eq!(child_netns, pod_netns);

    // A panic in the child comes back as an error, and the test process is unaffected.
    let err = pod.run_in_cgroup(|| -> u32 { panic!("child blew up") }).unwrap_err();
    assert!(format!("{err:#}").contains("child blew up"), "{err:#}");

    // Processes from pod.command() are in both too.
    let mut cat = pod.command("cat");
    cat.arg("/proc/self/cgroup");
    let out = pod.output(cat, SHORT)?;
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("0::{pod_cgroup}\n")), "{out:?}");

    // netns_command() and run() enter the netns but stay in the test's own cgroup.
    let own_cgroup = cgroup::of_process("self")?;
    let mut readlink = pod.netns_command("readlink");
    readlink.arg("/proc/self/ns/net");
    let out = pod.output(readlink, SHORT)?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pod_netns);
    let (thread_netns, thread_cgroup) = pod.run(|| {
        let netns = std::fs::read_link("/proc/thread-self/ns/net").unwrap().display().to_string();
        (netns, cgroup::of_process("thread-self").unwrap())
    });
    assert_eq!(thread_netns, pod_netns);
    assert_eq!(thread_cgroup, own_cgroup);
    assert_ne!(thread_cgroup, pod_cgroup);

    // The node command runs in the node netns, whose forwarding is on.
    let mut cat = node.command("cat");
    cat.arg("/proc/sys/net/ipv6/conf/all/forwarding");
    let out = pod.output(cat, SHORT)?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    assert_eq!(netns::read_sysctl(node.netns_path(), "net/ipv4/ip_forward")?, "1");
    Ok(())
}

/// What a node made, recorded before it is dropped.
#[derive(Debug, Default, Clone)]
struct Made {
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
}

fn build_node_with_running_pod(name: &str, index: u8) -> Result<(SimNode, Made, ferry_tests::ChildGuard)> {
    let mut node = SimNode::new(name, index)?;
    let pod = node.add_pod("app")?;
    let mut sleep = pod.command("sleep");
    sleep.arg("1000");
    let sleeper = pod.spawn(sleep)?;
    assert!(netns::links(node.netns_name())?.contains(&pod.host_ifname().to_owned()));
    assert!(netns::links(pod.netns_name())?.contains(&"eth0".to_owned()));
    let made = Made {
        netns: vec![node.netns_name().to_owned(), pod.netns_name().to_owned()],
        cgroups: vec![node.cgroup_root().to_owned(), pod.cgroup_path().to_owned()],
    };
    for ns in &made.netns {
        assert!(netns_listed(ns), "{ns} missing from {}", ip_netns_list());
        assert!(ns.starts_with("fy"), "{ns}");
    }
    assert!(made.cgroups.iter().all(|c| c.is_dir()));
    Ok((node, made, sleeper))
}

fn assert_gone(made: &Made) {
    let listed = ip_netns_list();
    for ns in &made.netns {
        assert!(!listed.lines().any(|l| l.starts_with(ns.as_str())), "{ns} still listed: {listed}");
    }
    for cg in &made.cgroups {
        assert!(!cg.exists(), "{} still exists", cg.display());
    }
}

#[test]
fn dropping_a_node_removes_everything_and_kills_its_processes() -> Result<()> {
    let (node, made, mut sleeper) = build_node_with_running_pod("node-drop", 3)?;
    drop(node);
    assert_gone(&made);
    // The pod's process was killed by the teardown (its guard still owns the pid).
    let status = sleeper.wait_timeout(SHORT)?;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    Ok(())
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let made = Mutex::new(Made::default());
    let result = std::panic::catch_unwind(|| {
        let (_node, built, _sleeper) = build_node_with_running_pod("node-panic", 4).unwrap();
        *made.lock().unwrap() = built;
        panic!("test failure inside the scope");
    });
    assert!(result.is_err());
    let made = made.into_inner().unwrap();
    assert_eq!(made.netns.len(), 2);
    assert_gone(&made);
}

/// This process's namespaces whose name ends in `-<name>`.
fn own_netns_named(name: &str) -> Vec<String> {
    let prefix = format!("{}{}-", names::NETNS_PREFIX, std::process::id());
    let suffix = format!("-{name}");
    netns::list().unwrap().into_iter().filter(|n| n.starts_with(&prefix) && n.ends_with(&suffix)).collect()
}

#[test]
fn a_pod_that_fails_half_way_is_cleaned_up() -> Result<()> {
    let mut node = SimNode::new("node-partial", 5)?;
    node.add_pod("first")?;
    // The next pod's veth will be vp3: taking that name makes it fail after its netns exists.
    netns::run_ip(Some(node.netns_name()), &["link", "add", "vp3", "type", "bridge"])?;
    let err = node.add_pod("second").unwrap_err();
    assert!(format!("{err:#}").contains("vp3"), "{err:#}");
    assert!(own_netns_named("second").is_empty(), "{:?}", own_netns_named("second"));
    assert!(!node.cgroup_root().join("second").exists());
    assert!(node.pod("second").is_none());
    // Refused before anything is made.
    assert!(node.add_pod("first").is_err());
    assert!(node.add_pod("bad/name").is_err());
    assert_eq!(own_netns_named("first").len(), 1);
    // The node goes on working: the next pod gets the next address.
    let third = node.add_pod("third")?;
    assert_eq!(third.ipv4(), Ipv4Addr::new(10, 233, 5, 4));
    Ok(())
}

#[test]
fn linked_nodes_route_pod_to_pod() -> Result<()> {
    let mut a = SimNode::new("node-a", 1)?;
    let mut b = SimNode::new("node-b", 2)?;
    let client = a.add_pod("client")?;
    let server = b.add_pod("server")?;
    let link = link_nodes(&a, &b)?;
    assert_eq!((link.a().ifname.as_str(), link.b().ifname.as_str()), ("ln2", "ln1"));
    assert_eq!(link.a().netns_name, a.netns_name());
    assert!(netns::links(&link.b().netns_name)?.contains(&link.b().ifname));
    assert!(link_nodes(&a, &b).is_err(), "a second link on the same nodes must be refused");

    let _server = testapp::serve(&server, 9090, "remote")?;
    let opts = ConnectOpts { bytes: 50_000, conns: 2, ..ConnectOpts::default() };
    echo_over_both_families(&client, &server, 9090, &opts, "remote")?;

    drop(link);
    assert!(!netns::links(a.netns_name())?.contains(&"ln2".to_owned()));
    let report = testapp::connect(
        &client,
        SocketAddr::new(server.ipv4().into(), 9090),
        &ConnectOpts { timeout_ms: 500, ..ConnectOpts::default() },
    )?;
    assert_eq!(report.failed, 1, "without the link the route is gone: {report:?}");
    Ok(())
}

/// Leftovers as a crashed run would leave them; whatever the sweep misses is removed on drop.
struct FakeLeftovers {
    netns: String,
    cgroup: PathBuf,
    orphan: std::process::Child,
}

impl FakeLeftovers {
    fn create() -> Result<Self> {
        // Above the kernel's pid limit, so the "owner" is certainly not running.
        let dead = 4_194_304 + std::process::id();
        let netns = format!("{}{dead}-0-stale", names::NETNS_PREFIX);
        let cgroup = cgroup::cgroup2_mount()?.join(format!("{}{dead}-0-stale", names::CGROUP_PREFIX));
        // The orphan holds none of our pipes, so a failed test cannot hang on it.
        let orphan = Command::new("sleep").arg("1000").stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let made = Self { netns, cgroup, orphan };
        netns::add(&made.netns)?;
        let inner = made.cgroup.join("pod");
        std::fs::create_dir_all(&inner)?;
        std::fs::write(inner.join("cgroup.procs"), made.orphan.id().to_string())?;
        Ok(made)
    }
}

impl Drop for FakeLeftovers {
    fn drop(&mut self) {
        let _ = self.orphan.kill();
        let _ = self.orphan.wait();
        let _ = netns::delete(&self.netns);
        let _ = cgroup::remove_tree(&self.cgroup, Duration::from_secs(2));
    }
}

#[test]
fn sweep_removes_leftovers_of_dead_processes_only() -> Result<()> {
    let mut stale = FakeLeftovers::create()?;
    let mut live = SimNode::new("node-live", 6)?;
    let live_pod = live.add_pod("app")?;

    // Another test process sweeping at the same time may get to the leftovers first, so this
    // checks the outcome rather than which sweep did it.
    let report = cleanup::sweep_stale()?;
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(!netns_listed(&stale.netns), "{report:?}");
    assert!(!stale.cgroup.exists(), "{report:?}");
    assert_eq!(stale.orphan.wait()?.signal(), Some(libc::SIGKILL));
    // This process's objects are untouched.
    assert!(netns_listed(live.netns_name()) && netns_listed(live_pod.netns_name()));
    assert!(live_pod.cgroup_path().is_dir());
    Ok(())
}

/// A stand-in agent: checks its arguments, reports its netns and cgroup in the ready event, and
/// exits 0 on SIGTERM.
const FAKE_AGENT: &str = r#"#!/bin/sh
[ "$1" = run ] && [ "$2" = --config ] && [ "$4" = --events ] || { echo "bad args: $*" >&2; exit 3; }
grep -q '^node = "node-agent"' "$3" || { echo "bad mesh file" >&2; exit 4; }
echo "fake agent starting" >&2
trap 'exit 0' TERM
printf '{"event":"ready","netns":"%s","cgroup":"%s"}\n' "$(readlink /proc/self/ns/net)" "$(grep '^0::' /proc/self/cgroup | cut -c4-)" >> "$5"
printf '{"event":"conn_close","bytes_sent":123}\n' >> "$5"
while :; do sleep 0.05; done
"#;

fn script(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[test]
fn agent_runs_in_the_node_netns_and_reports_events() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = script(dir.path(), "fake-ferry", FAKE_AGENT)?;
    let mut node = SimNode::new("node-agent", 8)?;
    let pod = node.add_pod("client")?;
    let mut mesh = MeshFile::new("node-agent");
    mesh.pod(&pod, "demo", "client");
    let mesh = mesh.to_toml();

    let agent = Agent::start_program(&node, &fake, &mesh)?;
    assert!(agent.stderr().contains("fake agent starting"));
    let ready = &agent.events()[0];
    assert_eq!(ready["netns"], netns_id(node.netns_path()));
    assert_eq!(ready["cgroup"], cgroup::of_process("self")?, "the agent must not be in a pod cgroup");
    let close = agent.wait_for_event(|e| e["event"] == "conn_close", SHORT)?;
    assert_eq!(close["bytes_sent"], 123);
    let missing = agent.wait_for_event(|e| e["event"] == "never", Duration::from_millis(100));
    assert!(missing.unwrap_err().to_string().contains("no matching event"));
    let status = agent.stop()?;
    assert_eq!(status.code(), Some(0), "SIGTERM handled: {status}");

    // Drop kills an agent that is still running.
    let agent = Agent::start_program(&node, &fake, &mesh)?;
    let pid = agent.pid();
    drop(agent);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());

    // An agent that exits before ready: the error carries its status and stderr.
    let err = Agent::start_program(&node, &fake, "node = \"other\"\n").unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("exit status: 4") && text.contains("bad mesh file"), "{text}");
    Ok(())
}
