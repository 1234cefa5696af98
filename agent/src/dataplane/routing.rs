//! Cryptokey routing: which tunnel carries packets to an overlay address, which relayed
//! sources a gateway may deliver to us, and (on a gateway) which pairs Sec-EM admitted.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use asmn_shared::ids::{InstanceKey, VnfId};

use super::peers::Slot;

/// How packets to an overlay address go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Through the peer's own tunnel.
    Direct(Slot),
    /// Through the tunnel of its gateway; the address is of an instance of `vnf`, verified
    /// by Sec-EM (so packets relayed from it are policed as that VNF's).
    Via {
        /// The gateway's slot.
        gateway: Slot,
        /// The VNF at that address.
        vnf: VnfId,
        /// The instance at that address.
        id: InstanceKey,
    },
}

impl Route {
    /// The slot whose tunnel carries the packets.
    pub fn slot(&self) -> Slot {
        match self {
            Route::Direct(s) | Route::Via { gateway: s, .. } => *s,
        }
    }
}

/// The routes and (on a gateway) the admitted pairs.
#[derive(Debug, Default)]
pub struct Routes {
    routes: HashMap<IpAddr, Route>,
    /// Unordered pairs of overlay addresses Sec-EM admitted for forwarding (a pair is
    /// connected only after both directions passed its check).
    admitted: HashSet<(IpAddr, IpAddr)>,
}

fn pair(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    if a <= b { (a, b) } else { (b, a) }
}

impl Routes {
    /// The route to `ip`.
    pub fn get(&self, ip: &IpAddr) -> Option<&Route> {
        self.routes.get(ip)
    }

    /// Sets the route to `ip`.
    pub fn insert(&mut self, ip: IpAddr, route: Route) {
        self.routes.insert(ip, route);
    }

    /// Drops every route through `slot`, and every admission of an address that was
    /// routed through it; the addresses that lost their route.
    pub fn remove_slot(&mut self, slot: Slot) -> Vec<IpAddr> {
        self.remove_where(|r| r.slot() == slot)
    }

    /// Drops the routes `pred` selects and the admissions of their addresses; the
    /// addresses that lost their route.
    fn remove_where(&mut self, pred: impl Fn(&Route) -> bool) -> Vec<IpAddr> {
        let gone: Vec<IpAddr> = self
            .routes
            .iter()
            .filter(|(_, r)| pred(r))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &gone {
            self.routes.remove(ip);
        }
        self.admitted
            .retain(|(a, b)| !gone.contains(a) && !gone.contains(b));
        gone
    }

    /// Drops the route through a gateway to instance `id`, and its admissions; the
    /// addresses that lost their route.
    pub fn remove_instance(&mut self, id: &InstanceKey) -> Vec<IpAddr> {
        self.remove_where(|r| matches!(r, Route::Via { id: i, .. } if i == id))
    }

    /// Whether instance `id` is routed through a gateway.
    pub fn has_instance(&self, id: &InstanceKey) -> bool {
        self.routes
            .values()
            .any(|r| matches!(r, Route::Via { id: i, .. } if i == id))
    }

    /// Admits the pair of `a` and `b` for forwarding.
    pub fn admit(&mut self, a: IpAddr, b: IpAddr) {
        self.admitted.insert(pair(a, b));
    }

    /// Whether the pair of `a` and `b` is admitted.
    pub fn admitted(&self, a: IpAddr, b: IpAddr) -> bool {
        self.admitted.contains(&pair(a, b))
    }

    /// How many routes there are.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// How many pairs are admitted.
    pub fn admitted_pairs(&self) -> usize {
        self.admitted.len()
    }
}

/// Whether `ip` is in the network `(net, prefix)`.
pub fn in_net(ip: IpAddr, (net, prefix): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_membership() {
        let net = ("10.77.0.0".parse().expect("ip"), 16);
        assert!(in_net("10.77.3.4".parse().expect("ip"), net));
        assert!(!in_net("10.78.0.1".parse().expect("ip"), net));
        assert!(!in_net("::1".parse().expect("ip"), net));
    }

    #[test]
    fn removing_a_gateway_drops_its_routes_and_admissions() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let vnf = VnfId::new("server").expect("vnf");
        let mut r = Routes::default();
        r.insert(ip("10.77.0.2"), Route::Direct(0));
        r.insert(ip("10.77.0.3"), Route::Direct(1));
        let id = InstanceKey::from_bytes([4; 32]);
        r.insert(
            ip("10.77.0.4"),
            Route::Via {
                gateway: 1,
                vnf,
                id,
            },
        );
        assert!(r.has_instance(&id));
        r.admit(ip("10.77.0.4"), ip("10.77.0.2"));
        assert!(r.admitted(ip("10.77.0.2"), ip("10.77.0.4")));
        let mut gone = r.remove_slot(1);
        gone.sort();
        assert_eq!(gone, vec![ip("10.77.0.3"), ip("10.77.0.4")]);
        assert_eq!(r.len(), 1);
        assert_eq!(r.admitted_pairs(), 0);
    }
}
