//! The `sidecar-haproxy` baseline: HAProxy 2.6 (Debian's `/usr/sbin/haproxy`) run as a classic
//! sidecar in every pod, behind the iptables REDIRECT capture of [`crate::iptables`]. It originates
//! mutual TLS toward the service's endpoints and terminates it in front of the app, with an ECDSA
//! P-256 certificate per pod carrying a SPIFFE URI, the same key type as Ferry's SVIDs.
//!
//! Outbound, the app's connections land on 127.0.0.1:[`OUTBOUND_PORT`] (or [::1]) and HAProxy
//! balances them over the endpoints' `IP:port`, ignoring the original destination (there is no
//! per-destination routing, so the endpoint list stands for the one service). Inbound, the peer
//! sidecar dials `ENDPOINT:port`, which the server pod's PREROUTING rule sends to
//! [`INBOUND_PORT`], where HAProxy terminates TLS and forwards to 127.0.0.1:`app_port`.
//!
//! The sidecars proxy opaque TCP ([`Mode::Tcp`], `sidecar-haproxy`) or HTTP/1.1 ([`Mode::Http`],
//! `sidecar-haproxy-http`: requests parsed and balanced one by one, connections kept alive and
//! reused); everything else is the same in both modes.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

use crate::iptables::{self, PROXY_GID, SidecarCapture};
use crate::{ChildGuard, Pod, names};

/// The HAProxy binary (`cargo xtask setup` installs Debian's package).
pub const HAPROXY: &str = "/usr/sbin/haproxy";
/// Where the capture sends the app's outbound TCP (on loopback), as in Istio.
pub const OUTBOUND_PORT: u16 = 15001;
/// Where the capture sends inbound TCP (on the pod's addresses), as in Istio.
pub const INBOUND_PORT: u16 = 15006;
/// The trust domain of the SPIFFE IDs in the sidecars' certificates.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The Kubernetes namespace in the SPIFFE IDs.
pub const NAMESPACE: &str = "demo";
/// How long [`HaproxySidecar::start`] waits for both listeners.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What the sidecars proxy: opaque TCP (`sidecar-haproxy`) or HTTP (`sidecar-haproxy-http`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// `mode tcp`: bytes relayed as they come, one upstream connection per app connection.
    #[default]
    Tcp,
    /// `mode http`: HTTP/1.1 parsed per request, each request balanced over the endpoints, with
    /// keep-alive and idle connections reused on both sides (see [`config`]).
    Http,
}

/// A root CA and the per-pod certificates it issued, as PEM files in a temporary directory that
/// is removed on drop (HAProxy reads them once, at start-up).
pub struct Pki {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    ca_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Pki {
    /// Creates a self-signed ECDSA P-256 root for `trust_domain` and writes it to `ca.pem`.
    pub fn new(trust_domain: &str) -> Result<Pki> {
        let dir =
            tempfile::Builder::new().prefix("ferry-haproxy-").tempdir().context("creating the PKI dir")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ferry-haproxy-baseline");
        dn.push(DnType::CommonName, format!("{trust_domain} root"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        (params.not_before, params.not_after) = validity(Duration::from_secs(30 * 24 * 3600));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating the root key")?;
        let cert = params.self_signed(&key).context("signing the root")?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).with_context(|| format!("writing {}", ca_file.display()))?;
        Ok(Pki { trust_domain: trust_domain.to_owned(), issuer: Issuer::new(params, key), ca_file, dir })
    }

    /// The root certificate (PEM): what HAProxy's `ca-file` names.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The directory holding every file of this PKI (and the sidecars' configurations).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The SPIFFE ID of `service_account` in namespace [`NAMESPACE`].
    pub fn spiffe_id(&self, service_account: &str) -> String {
        format!("spiffe://{}/ns/{NAMESPACE}/sa/{service_account}", self.trust_domain)
    }

    /// Issues pod `pod_name` a leaf shaped like a Ferry SVID (ECDSA P-256, the SPIFFE URI of
    /// `service_account` as its only SAN, client and server auth) and writes certificate then key
    /// to `<dir>/<pod_name>.pem`, the single file HAProxy's `crt` takes; returns that path.
    pub fn issue(&self, pod_name: &str, service_account: &str) -> Result<PathBuf> {
        names::check_name("pod", pod_name)?;
        names::check_name("service account", service_account)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ferry");
        params.distinguished_name = dn;
        let uri = Ia5String::try_from(self.spiffe_id(service_account)).context("SPIFFE ID is not IA5")?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = validity(Duration::from_secs(24 * 3600));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a leaf key")?;
        let cert = params.signed_by(&key, &self.issuer).context("signing a leaf")?;
        let path = self.dir().join(format!("{pod_name}.pem"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {} (pod issued twice?)", path.display()))?;
        file.write_all(format!("{}{}", cert.pem(), key.serialize_pem()).as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// From an hour ago (clock skew) until `lifetime` from now.
fn validity(lifetime: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (now - time::Duration::hours(1), now + lifetime)
}

/// One running HAProxy sidecar: both directions in one process, as an Envoy sidecar does. The
/// process is killed when this drops (and by the node's teardown in any case).
#[derive(Debug)]
pub struct HaproxySidecar {
    pod: String,
    config: PathBuf,
    child: ChildGuard,
}

impl HaproxySidecar {
    /// Issues `pod` a certificate for `service_account`, writes its configuration (outbound
    /// toward `upstreams`, inbound to 127.0.0.1:`app_port`) next to it, and runs HAProxy in the
    /// pod's netns with group id [`PROXY_GID`] so the capture leaves its own sockets alone.
    /// Returns once both listeners are up; an error naming HAProxy's stderr if it exits first.
    pub fn start(
        pod: &Pod,
        pki: &Pki,
        service_account: &str,
        upstreams: &[SocketAddr],
        app_port: u16,
    ) -> Result<HaproxySidecar> {
        Self::start_mode(pod, pki, service_account, upstreams, app_port, Mode::Tcp)
    }

    /// [`HaproxySidecar::start`] proxying in `mode`.
    pub fn start_mode(
        pod: &Pod,
        pki: &Pki,
        service_account: &str,
        upstreams: &[SocketAddr],
        app_port: u16,
        mode: Mode,
    ) -> Result<HaproxySidecar> {
        let crt = pki.issue(pod.name(), service_account)?;
        let text = config(pod.name(), &crt, pki.ca_file(), upstreams, app_port, mode)?;
        let config = pki.dir().join(format!("{}.cfg", pod.name()));
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let mut cmd = pod.netns_command(HAPROXY);
        // -db: stay in the foreground, so the pid we track (and measure) is HAProxy itself.
        cmd.arg("-f").arg(&config).arg("-db");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        cmd.gid(PROXY_GID);
        let mut child =
            pod.spawn(cmd).with_context(|| format!("starting {HAPROXY} (is haproxy installed?)"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("haproxy in pod {} exited ({status}) before listening: {}", pod.name(), child.stderr());
            }
            let listening = pod.run(listening_ports)?;
            if [OUTBOUND_PORT, INBOUND_PORT].iter().all(|p| listening.contains(p)) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "haproxy in pod {} not listening on {OUTBOUND_PORT} and {INBOUND_PORT} after \
                     {START_TIMEOUT:?}: {}",
                    pod.name(),
                    child.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(HaproxySidecar { pod: pod.name().to_owned(), config, child })
    }

    /// HAProxy's pid, for reading its CPU times and memory from /proc/PID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The name of the pod this sidecar serves.
    pub fn pod_name(&self) -> &str {
        &self.pod
    }

    /// The configuration file HAProxy runs with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// What HAProxy wrote to stderr so far (warnings, alerts).
    pub fn stderr(&self) -> String {
        self.child.stderr()
    }
}

/// HAProxy sidecars on a set of pods sharing one [`Pki`]. Dropping it stops the sidecars, then
/// removes the PKI directory.
pub struct SidecarMesh {
    sidecars: Vec<HaproxySidecar>,
    pki: Pki,
}

impl SidecarMesh {
    /// For each `(pod, service account)`: installs the capture (outbound to [`OUTBOUND_PORT`],
    /// inbound to [`INBOUND_PORT`]) and starts a sidecar whose outbound side balances over
    /// `endpoints` and whose inbound side forwards to 127.0.0.1:`app_port`. Certificates come
    /// from a fresh PKI for [`TRUST_DOMAIN`].
    pub fn start(pods: &[(&Pod, &str)], endpoints: &[SocketAddr], app_port: u16) -> Result<SidecarMesh> {
        Self::start_mode(pods, endpoints, app_port, Mode::Tcp)
    }

    /// [`SidecarMesh::start`] with every sidecar proxying in `mode`.
    pub fn start_mode(
        pods: &[(&Pod, &str)],
        endpoints: &[SocketAddr],
        app_port: u16,
        mode: Mode,
    ) -> Result<SidecarMesh> {
        let pki = Pki::new(TRUST_DOMAIN)?;
        let capture = SidecarCapture {
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            inbound_exclude: vec![],
        };
        let mut sidecars = Vec::with_capacity(pods.len());
        for (pod, service_account) in pods {
            iptables::install(pod, &capture)?;
            sidecars.push(HaproxySidecar::start_mode(pod, &pki, service_account, endpoints, app_port, mode)?);
        }
        Ok(SidecarMesh { sidecars, pki })
    }

    /// The running sidecars, in the order of the pods given to [`SidecarMesh::start`].
    pub fn sidecars(&self) -> &[HaproxySidecar] {
        &self.sidecars
    }

    /// The sidecar of pod `name`, if it has one.
    pub fn sidecar(&self, name: &str) -> Option<&HaproxySidecar> {
        self.sidecars.iter().find(|s| s.pod == name)
    }

    /// The PKI the sidecars' certificates come from.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }
}

/// The sidecar's configuration. Each performance choice follows the HAProxy 2.6 manuals
/// (configuration.txt and management.txt as Debian ships them in /usr/share/doc/haproxy, also at
/// https://docs.haproxy.org/2.6/configuration.html and
/// https://docs.haproxy.org/2.6/management.html):
///
/// - No `nbthread`: "by default haproxy will start one worker thread per processor it is allowed
///   to run on" (management 2) and the manual leaves the default to the CPUs the process is bound
///   to (configuration 3.1 "nbthread"); no `cpu-map`, as the pods share the machine's cores.
/// - No `busy-polling`: it trades a whole core per thread for latency and must not share CPUs
///   with the network interrupts (configuration 3.2), which every pod here does.
/// - `maxconn` set, so the fd table is sized for it rather than for the fd hard limit, which
///   "will consume way too much RAM" (configuration 3.1 "fd-hard-limit", 3.2 "maxconn").
/// - SSL session reuse left on toward the servers ("no-ssl-reuse" is "probably only useful for
///   benchmarking", configuration 5.2) and the default session cache on the bind side
///   (`tune.ssl.cachesize`, configuration 3.2); `tune.ssl.maxrecord` left unlimited for
///   throughput (configuration 3.2).
/// - TLS 1.3 only, as Ferry's rustls configuration; OpenSSL would pick it anyway.
/// - `option tcp-smart-connect` on the backends and `option tcp-smart-accept` on the TLS
///   frontend, which save one ACK per connection for client-speaks-first protocols such as TLS
///   (configuration 4.2). No `option splice-auto`: splicing needs plaintext on both sides, and one
///   side of every connection here is TLS.
/// - No logging and no health checks: neither is on the data path of the other baselines.
/// - `mode tcp`, "the default mode. It should be used for SSL" (configuration 4.2 "mode"), which
///   also disables Nagle (management 12).
///
/// Server certificates are verified against the root only: HAProxy 2.6 cannot match a URI SAN
/// (`verifyhost` checks DNS names), so it does not pin the peer's SPIFFE ID as Ferry does.
///
/// [`Mode::Http`] changes only what HTTP needs, again after the 2.6 configuration manual:
///
/// - `mode http`, the one that parses requests; the TLS setup, threads and capture stay as above.
/// - `option http-keep-alive` (HAProxy's default, stated): keep-alive on both sides, "the lowest
///   latency on the client side" and about "twice the request rate that the http-server-close
///   option achieves on small objects" (configuration 4.2).
/// - `http-reuse always` toward the peer sidecars: idle TLS connections to an endpoint are shared
///   by every client connection, first requests included, which the manual recommends "when the
///   path to the server is known for never breaking existing connections quickly after releasing
///   them" (configuration 4.2 "http-reuse"); the peer is our own sidecar, whose keep-alive timeout
///   outlasts the idle pool's purge (5 s). It saves a TLS handshake for most new app connections.
///   Toward the app, the default and recommended `safe`.
/// - `timeout http-keep-alive 10s` and `timeout http-request 30s`: idle keep-alive connections
///   between the bench's requests (tens of ms apart) stay open; a request head may take as long as
///   Ferry allows (its header read timeout).
/// - Requests balanced one by one (`balance roundrobin`, no `option prefer-last-server`), as a
///   sidecar that does L7 load balancing does; `option tcp-smart-accept` is automatic in HTTP
///   mode, `tcp-smart-connect` stays on the backends.
/// - No `option http-no-delay` ("it is not recommended", configuration 4.2) and no `option
///   forwardfor` or other header rewriting: nothing but parsing and forwarding.
/// - HTTP/1.1 between the sidecars (no `alpn h2`): one request at a time per connection is all
///   the bench's load needs, and h2 would add framing on both sides.
fn config(
    pod: &str,
    crt: &Path,
    ca_file: &Path,
    upstreams: &[SocketAddr],
    app_port: u16,
    mode: Mode,
) -> Result<String> {
    ensure!(!upstreams.is_empty(), "sidecar of pod {pod}: no upstream endpoints");
    let crt = config_path(crt)?;
    let ca = config_path(ca_file)?;
    let (defaults, mesh_reuse, app_reuse) = match mode {
        Mode::Tcp => ("    mode tcp\n", "", ""),
        Mode::Http => (
            "    mode http\n\
             \x20   option http-keep-alive\n\
             \x20   timeout http-request 30s\n\
             \x20   timeout http-keep-alive 10s\n",
            "    http-reuse always\n",
            "    http-reuse safe\n",
        ),
    };
    let mut out = format!(
        "# HAProxy sidecar of pod {pod}, generated by ferry-tests (tests/src/haproxy.rs).\n\
         global\n\
         \x20   maxconn 8192\n\
         \x20   ssl-default-bind-options ssl-min-ver TLSv1.3\n\
         \x20   ssl-default-server-options ssl-min-ver TLSv1.3\n\
         \n\
         defaults\n\
         {defaults}\
         \x20   timeout connect 5s\n\
         \x20   timeout client 1h\n\
         \x20   timeout server 1h\n\
         \n\
         frontend outbound\n\
         \x20   bind 127.0.0.1:{OUTBOUND_PORT}\n\
         \x20   bind ::1:{OUTBOUND_PORT}\n\
         \x20   default_backend endpoints\n\
         \n\
         backend endpoints\n\
         \x20   balance roundrobin\n\
         {mesh_reuse}\
         \x20   option tcp-smart-connect\n\
         \x20   default-server ssl verify required ca-file {ca} crt {crt}\n"
    );
    for (i, upstream) in upstreams.iter().enumerate() {
        // HAProxy takes the last colon as the port separator, so IPv6 needs no brackets.
        out += &format!("    server ep{i} {}:{}\n", upstream.ip(), upstream.port());
    }
    // Automatic in HTTP mode, where forcing it is advised against (configuration 4.2).
    let smart_accept = if mode == Mode::Tcp { "    option tcp-smart-accept\n" } else { "" };
    out += &format!(
        "\n\
         frontend inbound\n\
         \x20   bind :::{INBOUND_PORT} v4v6 ssl crt {crt} ca-file {ca} verify required\n\
         {smart_accept}\
         \x20   default_backend app\n\
         \n\
         backend app\n\
         {app_reuse}\
         \x20   option tcp-smart-connect\n\
         \x20   server app 127.0.0.1:{app_port}\n"
    );
    Ok(out)
}

/// `path` as a configuration word: HAProxy splits words on whitespace and treats `#` and quotes.
fn config_path(path: &Path) -> Result<&str> {
    let text = path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))?;
    ensure!(
        !text.chars().any(|c| c.is_whitespace() || matches!(c, '#' | '"' | '\'' | '\\')),
        "{text:?} cannot be written unquoted in an HAProxy configuration"
    );
    Ok(text)
}

/// The TCP ports in LISTEN state in the calling thread's network namespace (IPv4 and IPv6).
/// Reading the tables has no side effect, unlike a probe connection, which the outbound
/// frontend would forward to an endpoint.
fn listening_ports() -> Result<Vec<u16>> {
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        // thread-self: /proc/self/net would show the main thread's namespace.
        let path = format!("/proc/thread-self/net/{table}");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        ports.extend(parse_listening(&text).with_context(|| format!("parsing {path}"))?);
    }
    Ok(ports)
}

/// The local ports of the LISTEN (state 0A) rows of a /proc/net/tcp{,6} table.
fn parse_listening(table: &str) -> Result<Vec<u16>> {
    let mut ports = Vec::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
            bail!("short row {line:?}");
        };
        if *state != "0A" {
            continue;
        }
        let port =
            local.rsplit_once(':').map(|(_, p)| p).with_context(|| format!("bad address {local:?}"))?;
        ports.push(u16::from_str_radix(port, 16).with_context(|| format!("bad port in {local:?}"))?);
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::pem::Pem;

    fn pems(path: &Path) -> Vec<Pem> {
        let bytes = std::fs::read(path).unwrap();
        Pem::iter_from_buffer(&bytes).collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn leaf_verifies_against_the_root_and_names_the_service_account() {
        let pki = Pki::new("cluster.local").unwrap();
        let path = pki.issue("server-1", "echo").unwrap();
        assert_eq!(path, pki.dir().join("server-1.pem"));
        let leaf_file = pems(&path);
        assert_eq!(
            leaf_file.iter().map(|p| p.label.as_str()).collect::<Vec<_>>(),
            ["CERTIFICATE", "PRIVATE KEY"],
            "HAProxy's crt file holds the certificate and its key"
        );
        let root_pem = &pems(pki.ca_file())[0];
        let root = root_pem.parse_x509().unwrap();
        let leaf = leaf_file[0].parse_x509().unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
        assert!(root.is_ca() && !leaf.is_ca());
        // ECDSA P-256, as Ferry's SVIDs.
        assert_eq!(
            leaf.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let curve = leaf.public_key().algorithm.parameters.as_ref().unwrap().as_oid().unwrap();
        assert_eq!(curve, x509_parser::oid_registry::OID_EC_P256);
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names, [GeneralName::URI("spiffe://cluster.local/ns/demo/sa/echo")]);
        assert!(leaf.validity().is_valid());
        // Another root does not vouch for this leaf.
        let other = Pki::new("cluster.local").unwrap();
        let other_pems = pems(other.ca_file());
        let other_root = other_pems[0].parse_x509().unwrap();
        assert!(leaf.verify_signature(Some(other_root.public_key())).is_err());
    }

    #[test]
    fn issue_rejects_bad_names_and_reissue() {
        let pki = Pki::new("cluster.local").unwrap();
        assert!(pki.issue("../etc", "echo").is_err());
        assert!(pki.issue("client", "a b").is_err());
        pki.issue("client", "client").unwrap();
        assert!(pki.issue("client", "client").is_err(), "a second certificate would be silently lost");
    }

    #[test]
    fn pki_directory_is_removed_on_drop() {
        let pki = Pki::new("cluster.local").unwrap();
        let dir = pki.dir().to_owned();
        assert!(dir.join("ca.pem").is_file());
        drop(pki);
        assert!(!dir.exists());
    }

    fn sample() -> String {
        sample_mode(Mode::Tcp)
    }

    fn sample_mode(mode: Mode) -> String {
        let upstreams: Vec<SocketAddr> =
            vec!["10.233.1.3:8080".parse().unwrap(), "[fd00:233:1::4]:8080".parse().unwrap()];
        config("client", Path::new("/tmp/p/client.pem"), Path::new("/tmp/p/ca.pem"), &upstreams, 8080, mode)
            .unwrap()
    }

    #[test]
    fn config_has_both_directions_with_mutual_tls() {
        let text = sample();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let has = |l: &str| lines.contains(&l);
        assert!(has("mode tcp"));
        assert!(has("bind 127.0.0.1:15001") && has("bind ::1:15001"), "{text}");
        assert!(
            has("default-server ssl verify required ca-file /tmp/p/ca.pem crt /tmp/p/client.pem"),
            "{text}"
        );
        assert!(has("server ep0 10.233.1.3:8080") && has("server ep1 fd00:233:1::4:8080"), "{text}");
        assert!(
            has("bind :::15006 v4v6 ssl crt /tmp/p/client.pem ca-file /tmp/p/ca.pem verify required"),
            "{text}"
        );
        assert!(has("server app 127.0.0.1:8080"), "{text}");
        assert!(has("balance roundrobin"));
        assert!(
            !text.contains("nbthread") && !text.contains("busy-polling") && !text.contains("no-ssl-reuse")
        );
        assert!(has("option tcp-smart-accept") && !text.contains("http"), "{text}");
    }

    #[test]
    fn http_mode_parses_requests_and_reuses_connections() {
        let text = sample_mode(Mode::Http);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let has = |l: &str| lines.contains(&l);
        assert!(has("mode http") && !has("mode tcp"), "{text}");
        assert!(has("option http-keep-alive") && has("timeout http-keep-alive 10s"), "{text}");
        assert!(has("http-reuse always") && has("http-reuse safe"), "{text}");
        // The same mutual TLS as the TCP sidecar.
        assert!(
            has("bind :::15006 v4v6 ssl crt /tmp/p/client.pem ca-file /tmp/p/ca.pem verify required"),
            "{text}"
        );
        assert!(!has("option tcp-smart-accept") && !text.contains("prefer-last-server"), "{text}");
        // Only what HTTP mode needs differs.
        let tcp = sample_mode(Mode::Tcp);
        let only_tcp: Vec<&str> = tcp.lines().filter(|l| !text.lines().any(|h| h == *l)).collect();
        assert_eq!(only_tcp, ["    mode tcp", "    option tcp-smart-accept"], "{text}");
    }

    #[test]
    fn config_refuses_unwritable_paths_and_no_endpoints() {
        let up: Vec<SocketAddr> = vec!["10.0.0.1:80".parse().unwrap()];
        assert!(config("p", Path::new("/tmp/a b.pem"), Path::new("/ca.pem"), &up, 80, Mode::Tcp).is_err());
        assert!(config("p", Path::new("/a.pem"), Path::new("/tmp/#ca.pem"), &up, 80, Mode::Tcp).is_err());
        assert!(config("p", Path::new("/a.pem"), Path::new("/ca.pem"), &[], 80, Mode::Http).is_err());
    }

    /// HAProxy itself accepts the configuration with real certificates (`-c` only checks).
    #[test]
    fn haproxy_accepts_the_generated_config() {
        let pki = Pki::new("cluster.local").unwrap();
        let crt = pki.issue("client", "client").unwrap();
        let upstreams: Vec<SocketAddr> =
            vec!["10.233.1.3:8080".parse().unwrap(), "[fd00:233:1::4]:8080".parse().unwrap()];
        for mode in [Mode::Tcp, Mode::Http] {
            let cfg = pki.dir().join(format!("client-{mode:?}.cfg"));
            let text = config("client", &crt, pki.ca_file(), &upstreams, 8080, mode).unwrap();
            std::fs::write(&cfg, text).unwrap();
            let out = std::process::Command::new(HAPROXY).arg("-c").arg("-f").arg(&cfg).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{mode:?}: {}{stderr}", String::from_utf8_lossy(&out.stdout));
            assert!(!stderr.contains("WARNING"), "{mode:?}: {stderr}");
        }
    }

    #[test]
    fn parse_listening_keeps_listen_rows_only() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
           1: 0301E90A:1F90 0201E90A:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
           2: 00000000000000000000000000000000:3A9E 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 3 1\n";
        assert_eq!(parse_listening(table).unwrap(), vec![15001, 15006]);
        assert!(parse_listening("header\n 0: garbage\n").is_err());
    }
}
