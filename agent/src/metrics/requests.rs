//! Istio's request families under the `ferry_` prefix (`ferry_requests_total`,
//! `ferry_request_duration_milliseconds`, `ferry_request_bytes`, `ferry_response_bytes`) with Istio's
//! label set, and the count of requests the HTTP layer refused before policy, by reason.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::{CONN_LABELS, ConnLabels, MetricsError, RequestProtocol, register};

/// Istio's request labels: the connection's, then the response's.
pub const REQUEST_LABELS: [&str; 13] = [
    CONN_LABELS[0],
    CONN_LABELS[1],
    CONN_LABELS[2],
    CONN_LABELS[3],
    CONN_LABELS[4],
    CONN_LABELS[5],
    CONN_LABELS[6],
    CONN_LABELS[7],
    CONN_LABELS[8],
    CONN_LABELS[9],
    "response_code",
    "response_flags",
    "grpc_response_status",
];

/// Labels of `ferry_http_rejected_requests_total`.
pub const REJECTION_LABELS: [&str; 4] =
    ["reporter", "destination_workload", "destination_workload_namespace", "reason"];

/// Istio's duration buckets, in milliseconds.
pub const REQUEST_DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's size buckets, in bytes: 1 to 10^8 by powers of ten.
pub const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// One finished request, as the families count it.
#[derive(Debug, Clone)]
pub struct RequestSample<'a> {
    /// The connection's labels (`request_protocol` is replaced by [`RequestSample::protocol`]).
    pub labels: &'a ConnLabels,
    /// HTTP or gRPC.
    pub protocol: RequestProtocol,
    /// The status code sent to the client.
    pub response_code: u16,
    /// Envoy's response flags, `-` for none.
    pub response_flags: &'a str,
    /// `grpc-status`, if the response had one.
    pub grpc_status: Option<&'a str>,
    /// From request head to response end.
    pub duration: Duration,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
}

/// Distinct outcomes one connection keeps resolved series for; past this, lookups go through the
/// families (a connection rarely sees more than a few status codes).
const CACHED_OUTCOMES: usize = 8;

/// The request series of one connection: its labels are fixed, so each distinct outcome
/// (protocol, code, flags, gRPC status) is looked up in the families once, not per request.
pub struct ConnRequests {
    families: RequestFamilies,
    labels: ConnLabels,
    cache: std::sync::Mutex<Vec<(Outcome, Series)>>,
}

#[derive(Clone, PartialEq, Eq)]
struct Outcome {
    protocol: RequestProtocol,
    code: u16,
    flags: String,
    grpc: Option<String>,
}

#[derive(Clone)]
struct Series {
    total: prometheus::IntCounter,
    duration: prometheus::Histogram,
    request_bytes: prometheus::Histogram,
    response_bytes: prometheus::Histogram,
}

impl ConnRequests {
    /// Counts one finished request of this connection (`sample.labels` is ignored: the
    /// connection's are used).
    pub fn observe(&self, sample: &RequestSample<'_>) {
        let outcome = |s: &RequestSample<'_>| Outcome {
            protocol: s.protocol,
            code: s.response_code,
            flags: s.response_flags.to_owned(),
            grpc: s.grpc_status.map(str::to_owned),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let hit = cache.iter().find(|(o, _)| {
            o.protocol == sample.protocol
                && o.code == sample.response_code
                && o.flags == sample.response_flags
                && o.grpc.as_deref() == sample.grpc_status
        });
        let series = match hit {
            Some((_, series)) => series.clone(),
            None => {
                let series = self.families.series(&RequestSample { labels: &self.labels, ..sample.clone() });
                if cache.len() < CACHED_OUTCOMES {
                    cache.push((outcome(sample), series.clone()));
                }
                series
            }
        };
        drop(cache);
        series.observe(sample);
    }
}

impl Series {
    fn observe(&self, sample: &RequestSample<'_>) {
        self.total.inc();
        self.duration.observe(sample.duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(sample.request_bytes as f64);
        self.response_bytes.observe(sample.response_bytes as f64);
    }
}

/// The registered request families.
#[derive(Clone)]
pub(super) struct RequestFamilies {
    total: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    rejected: IntCounterVec,
}

impl RequestFamilies {
    /// Creates and registers the families in `registry`.
    pub(super) fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let name = "ferry_requests_total";
        let total = IntCounterVec::new(Opts::new(name, "HTTP requests handled."), &REQUEST_LABELS)
            .map_err(|source| MetricsError::Register { name, source })?;
        register(registry, name, Box::new(total.clone()))?;
        let histogram = |name: &'static str, help: &str, buckets: &[f64]| {
            let family =
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &REQUEST_LABELS)
                    .map_err(|source| MetricsError::Register { name, source })?;
            register(registry, name, Box::new(family.clone()))?;
            Ok::<_, MetricsError>(family)
        };
        let duration = histogram(
            "ferry_request_duration_milliseconds",
            "From request head to response end.",
            &REQUEST_DURATION_BUCKETS_MS,
        )?;
        let request_bytes = histogram("ferry_request_bytes", "Request body sizes.", &SIZE_BUCKETS)?;
        let response_bytes = histogram("ferry_response_bytes", "Response body sizes.", &SIZE_BUCKETS)?;
        let name = "ferry_http_rejected_requests_total";
        let rejected = IntCounterVec::new(
            Opts::new(name, "Requests refused with 400 before policy (ambiguous framing or authority)."),
            &REJECTION_LABELS,
        )
        .map_err(|source| MetricsError::Register { name, source })?;
        register(registry, name, Box::new(rejected.clone()))?;
        Ok(Self { total, duration, request_bytes, response_bytes, rejected })
    }

    /// Counts one finished request.
    pub(super) fn observe(&self, sample: &RequestSample<'_>) {
        self.series(sample).observe(sample);
    }

    /// The request series of one connection.
    pub(super) fn for_connection(&self, labels: &ConnLabels) -> ConnRequests {
        ConnRequests { families: self.clone(), labels: labels.clone(), cache: Default::default() }
    }

    /// The four series of one sample's label values.
    fn series(&self, sample: &RequestSample<'_>) -> Series {
        let conn = sample.labels.values();
        let mut code = [b'0'; 3];
        let code = format_code(&mut code, sample.response_code);
        let protocol = match sample.protocol {
            RequestProtocol::Grpc => "grpc",
            _ => "http",
        };
        let values = [
            conn[0],
            conn[1],
            conn[2],
            conn[3],
            conn[4],
            conn[5],
            conn[6],
            conn[7],
            conn[8],
            protocol,
            code,
            sample.response_flags,
            sample.grpc_status.unwrap_or("-"),
        ];
        Series {
            total: self.total.with_label_values(&values),
            duration: self.duration.with_label_values(&values),
            request_bytes: self.request_bytes.with_label_values(&values),
            response_bytes: self.response_bytes.with_label_values(&values),
        }
    }

    /// Counts a request refused before policy.
    pub(super) fn rejected(&self, labels: &ConnLabels, reason: &str) {
        let values = [
            "destination",
            labels.destination_workload.as_str(),
            labels.destination_workload_namespace.as_str(),
            reason,
        ];
        self.rejected.with_label_values(&values).inc();
    }
}

/// A status code as text without allocating (status codes have three digits).
fn format_code(buf: &mut [u8; 3], code: u16) -> &str {
    let code = code.min(999);
    buf[0] = b'0' + (code / 100) as u8;
    buf[1] = b'0' + (code / 10 % 10) as u8;
    buf[2] = b'0' + (code % 10) as u8;
    std::str::from_utf8(buf).unwrap_or("000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_counts_into_the_same_series_as_the_families() {
        let registry = Registry::new();
        let families = RequestFamilies::new(&registry).expect("families");
        let mut labels = ConnLabels::unknown(super::super::Reporter::Destination);
        labels.destination_workload = "echo".into();
        let conn = families.for_connection(&labels);
        let sample = |code, flags| RequestSample {
            labels: &labels,
            protocol: RequestProtocol::Http,
            response_code: code,
            response_flags: flags,
            grpc_status: None,
            duration: Duration::from_millis(3),
            request_bytes: 10,
            response_bytes: 20,
        };
        for code in [200, 200, 403, 200] {
            conn.observe(&sample(code, "-"));
        }
        families.observe(&sample(200, "-"));
        for code in 500..520 {
            conn.observe(&sample(code, "UC"));
        }
        let count = |code: &str| {
            let mut values = labels.values();
            values[9] = "http";
            let v = [&values[..], &[code, "-", "-"]].concat();
            families.total.with_label_values(&v).get()
        };
        assert_eq!((count("200"), count("403")), (4, 1));
        let total: u64 = (500..520)
            .map(|c: u16| {
                let mut values = labels.values().to_vec();
                values[9] = "http";
                let code = c.to_string();
                values.extend([code.as_str(), "UC", "-"]);
                families.total.with_label_values(&values).get()
            })
            .sum();
        assert_eq!(total, 20, "outcomes past the cache are still counted");
    }

    #[test]
    fn codes_are_three_digits() {
        for (code, text) in [(200, "200"), (0, "000"), (503, "503"), (1000, "999")] {
            assert_eq!(format_code(&mut [b'0'; 3], code), text);
        }
    }
}
