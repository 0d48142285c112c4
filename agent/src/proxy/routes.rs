//! Where an outbound connection goes: a service VIP becomes one of its endpoints, anything else goes
//! to its original destination.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use crate::config::{AppProtocol, MeshConfig};

use super::balance::{Balancer, Endpoint, Pick};

/// A service port's name and balancer.
#[derive(Debug)]
pub struct ServiceRoute {
    /// "namespace/name".
    pub name: String,
    /// The port's declared protocol, told to the destination agent.
    pub protocol: Option<AppProtocol>,
    balancer: Balancer,
}

/// Routing table for outbound connections, built once per config.
#[derive(Debug, Default)]
pub struct Routes {
    by_vip: HashMap<SocketAddr, Arc<ServiceRoute>>,
}

/// The resolved destination of an outbound connection.
#[derive(Debug)]
pub enum Resolved {
    /// A service VIP: connect to the picked endpoint.
    Service {
        /// The service route.
        route: Arc<ServiceRoute>,
        /// The chosen endpoint; dropping it releases its load slot.
        pick: Pick,
    },
    /// Not a service: connect to the original destination.
    Direct(SocketAddr),
}

/// Why a destination could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The VIP's service has no endpoint reachable in the requested family.
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
}

impl Routes {
    /// Builds the table from the mesh config.
    pub fn build(cfg: &MeshConfig) -> Self {
        let mut by_vip = HashMap::new();
        for svc in &cfg.services {
            let name = format!("{}/{}", svc.namespace, svc.name);
            for port in &svc.ports {
                let endpoints = svc
                    .endpoints
                    .iter()
                    .filter_map(|&i| cfg.pods.get(i))
                    .map(|pod| {
                        Endpoint::new(
                            pod.key(),
                            pod.ipv4.map(|ip| SocketAddr::from((ip, port.target_port))),
                            pod.ipv6.map(|ip| SocketAddr::from((ip, port.target_port))),
                        )
                    })
                    .collect();
                let route = Arc::new(ServiceRoute {
                    name: name.clone(),
                    protocol: port.protocol,
                    balancer: Balancer::new(endpoints),
                });
                for vip in &svc.vips {
                    by_vip.insert(SocketAddr::new(*vip, port.port), route.clone());
                }
            }
        }
        Self { by_vip }
    }

    /// Resolves an original destination.
    pub fn resolve(&self, orig: SocketAddr) -> Result<Resolved, RouteError> {
        match self.by_vip.get(&orig) {
            None => Ok(Resolved::Direct(orig)),
            Some(route) => match route.balancer.pick(orig.is_ipv6()) {
                Some(pick) => Ok(Resolved::Service { route: route.clone(), pick }),
                None => Err(RouteError::NoEndpoints(route.name.clone())),
            },
        }
    }
}
