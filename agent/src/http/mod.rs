//! The HTTP layer of the node proxy. For now: Istio's path normalization, which authorization and
//! forwarding must agree on.

pub mod path;
