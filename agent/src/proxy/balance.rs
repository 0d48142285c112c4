//! Endpoint selection for service VIPs: power of two choices over active connections.
//!
//! Picking the less loaded of two random endpoints keeps load even without global coordination and
//! avoids the herding that "least connections" over all endpoints causes when many picks happen at
//! once (the choice Linkerd and Envoy make too).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

/// One endpoint of a service port.
#[derive(Debug)]
pub struct Endpoint {
    /// "namespace/name" of the endpoint pod.
    pub pod: String,
    /// IPv4 target (pod address and target port), if the pod has one.
    pub v4: Option<SocketAddr>,
    /// IPv6 target, if the pod has one.
    pub v6: Option<SocketAddr>,
    active: AtomicUsize,
}

impl Endpoint {
    /// A new endpoint with no active connections.
    pub fn new(pod: String, v4: Option<SocketAddr>, v6: Option<SocketAddr>) -> Self {
        Self { pod, v4, v6, active: AtomicUsize::new(0) }
    }

    fn target(&self, prefer_v6: bool) -> Option<SocketAddr> {
        if prefer_v6 { self.v6.or(self.v4) } else { self.v4.or(self.v6) }
    }
}

/// The endpoints of one service port.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<Arc<Endpoint>>,
}

/// A chosen endpoint; holding it counts as one active connection.
#[derive(Debug)]
pub struct Pick {
    endpoint: Arc<Endpoint>,
    /// The address to connect to.
    pub target: SocketAddr,
}

impl Pick {
    /// The endpoint pod's "namespace/name".
    pub fn pod(&self) -> &str {
        &self.endpoint.pod
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// A balancer over `endpoints`.
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        Self { endpoints: endpoints.into_iter().map(Arc::new).collect() }
    }

    /// Picks an endpoint for a connection whose original destination was IPv6 (`prefer_v6`) or
    /// IPv4; `None` when the service has no endpoints.
    pub fn pick(&self, prefer_v6: bool) -> Option<Pick> {
        let n = self.endpoints.len();
        let chosen = match n {
            0 => return None,
            1 => &self.endpoints[0],
            _ => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                let (la, lb) = (ea.active.load(Ordering::Relaxed), eb.active.load(Ordering::Relaxed));
                if la < lb || (la == lb && fastrand::bool()) { ea } else { eb }
            }
        };
        let target = chosen.target(prefer_v6)?;
        chosen.active.fetch_add(1, Ordering::Relaxed);
        Some(Pick { endpoint: chosen.clone(), target })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, last: u8) -> Endpoint {
        Endpoint::new(name.into(), Some(SocketAddr::from(([10, 0, 0, last], 80))), None)
    }

    #[test]
    fn concurrent_connections_spread_evenly() {
        let b = Balancer::new(vec![ep("a", 1), ep("b", 2)]);
        let held: Vec<Pick> = (0..10).map(|_| b.pick(false).unwrap()).collect();
        let on_a = held.iter().filter(|p| p.pod() == "a").count();
        // With two endpoints, P2C compares both every time, so held load is exactly balanced.
        assert_eq!(on_a, 5);
    }

    #[test]
    fn released_picks_free_their_slot() {
        let b = Balancer::new(vec![ep("a", 1), ep("b", 2)]);
        let first = b.pick(false).unwrap();
        let name = first.pod().to_string();
        let second = b.pick(false).unwrap();
        assert_ne!(second.pod(), name, "the loaded endpoint must not be chosen");
        drop(first);
        drop(second);
        assert!(b.endpoints.iter().all(|e| e.active.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn family_preference_falls_back() {
        let b = Balancer::new(vec![ep("a", 1)]);
        assert_eq!(b.pick(true).unwrap().target, SocketAddr::from(([10, 0, 0, 1], 80)));
        assert!(Balancer::new(vec![]).pick(false).is_none());
    }
}
