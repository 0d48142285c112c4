//! The original-destination table: the proxy claims a redirected connection's record on accept.

use std::{net::SocketAddr, sync::Mutex};

use aya::maps::{HashMap, MapData};
use ferry_common::{ConnKey, SockAddr};

use super::addr::{sock_addr_from_std, sock_addr_to_std};

/// (pod netns cookie, app address) -> original destination, written by the sock_ops program.
pub struct OrigDstTable {
    // aya's remove takes &mut self; one lookup and one delete per accepted connection, so a plain
    // mutex is cheap next to the accept itself.
    map: Mutex<HashMap<MapData, ConnKey, SockAddr>>,
}

impl OrigDstTable {
    /// Wraps the kernel map.
    pub fn new(map: HashMap<MapData, ConnKey, SockAddr>) -> Self {
        Self { map: Mutex::new(map) }
    }

    /// Takes (looks up and deletes) the original destination of a connection accepted from `peer`
    /// in the pod whose netns cookie is `netns_cookie`.
    pub fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = ConnKey { netns_cookie, src: sock_addr_from_std(peer), pad: 0 };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let value = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        sock_addr_to_std(&value)
    }
}
