//! Entry points of the fuzz targets (`shared/fuzz/`), shared with the test that replays
//! the committed corpus on every CI run. Each must return without panicking on any input.

use std::sync::{Arc, OnceLock};

use governor::clock::FakeRelativeClock;

use crate::catalog::{self, SecCatalog};
use crate::policy::{PolicyEngine, SourceKey};
use crate::wire::{self, msg};

/// Catalog and VNFD parsing.
pub fn catalog(data: &[u8]) {
    let _ = catalog::parse_vnfd("fuzz.yaml", data);
    let _ = catalog::parse_catalog("fuzz.yaml", data);
    let _ = crate::sol001::parse_sol001("fuzz.yaml", data);
}

fn example_catalog() -> Arc<SecCatalog> {
    static C: OnceLock<Arc<SecCatalog>> = OnceLock::new();
    C.get_or_init(|| {
        let c = catalog::parse_vnfd(
            "example",
            include_bytes!("../../images/examples/web-server.vnfd.yaml"),
        )
        .map(|v| v.catalog)
        .unwrap_or_else(|_| {
            SecCatalog::deny_all(crate::ids::VnfId::new("x").unwrap_or_else(|_| unreachable!()))
        });
        Arc::new(c)
    })
    .clone()
}

/// Packet classification and policing. The first byte picks the source VNF. The engine
/// persists across inputs (building one, with its port index, costs far more than a
/// packet); only limiter state carries over, and no decision may panic in any state.
pub fn packet(data: &[u8]) {
    use std::cell::RefCell;
    type State = (
        PolicyEngine<FakeRelativeClock>,
        FakeRelativeClock,
        [SourceKey; 3],
    );
    thread_local! {
        static ENGINE: RefCell<Option<State>> = const { RefCell::new(None) };
    }
    ENGINE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let (e, clock, sources) = slot.get_or_insert_with(|| {
            let clock = FakeRelativeClock::default();
            let mut e = PolicyEngine::new(example_catalog(), clock.clone());
            let name = |n: &str| crate::ids::VnfId::new(n).unwrap_or_else(|_| unreachable!());
            let sources = [
                SourceKey::UNKNOWN,
                e.source_key(&name("client")),
                e.source_key(&name("monitor")),
            ];
            (e, clock, sources)
        });
        let (pick, pkt) = data.split_first().map_or((0, data), |(b, rest)| (*b, rest));
        let src = sources[usize::from(pick) % sources.len()];
        for _ in 0..3 {
            let _ = e.handle_packet(src, pkt);
            clock.advance(std::time::Duration::from_micros(u64::from(pick)));
        }
        let _ = e.counters();
    });
}

/// Frame decoding and conversion of every message into its domain type.
pub fn wire(data: &[u8]) {
    let mut d = wire::FrameDecoder::new();
    if d.push(data).is_ok() {
        while let Ok(Some(f)) = d.next_frame() {
            convert(&f);
        }
    }
    convert(data);
}

fn convert(payload: &[u8]) {
    use crate::chain::{Reveal, SealedRenewal};
    use wire::{BootstrapBundle, Enroll, Enrolled, Peer, Refused};
    let Ok(env) = wire::decode_envelope(payload) else {
        return;
    };
    match &env.body {
        Some(msg::Body::Enroll(m)) => drop(Enroll::try_from(m)),
        Some(msg::Body::Peer(m)) => drop(Peer::try_from(m)),
        Some(msg::Body::VerifyRequested(m)) => {
            if let Some(p) = &m.peer {
                drop(Peer::try_from(p));
            }
        }
        Some(msg::Body::CatalogPush(m)) => drop(SecCatalog::try_from(m)),
        Some(msg::Body::ApplyCatalog(m)) => {
            if let Some(c) = &m.catalog {
                drop(SecCatalog::try_from(c));
            }
        }
        Some(msg::Body::InstanceCreated(m)) => drop(BootstrapBundle::try_from(m)),
        Some(msg::Body::Enrolled(m)) => drop(Enrolled::try_from(m)),
        Some(msg::Body::Refused(m)) => drop(Refused::try_from(m)),
        Some(msg::Body::Reattest(m)) => {
            if let Some(r) = &m.reveal {
                drop(Reveal::try_from(r));
            }
            if let Some(r) = &m.renewal {
                drop(SealedRenewal::try_from(r));
            }
        }
        _ => {}
    }
    // Re-encoding what decoded must not fail or panic either.
    let _ = wire::encode_frame(&env);
}
