//! ASMN's lab, the library behind `asmn-lab` (the README's main command):
//!
//! - [`bench`]: the tunnel benchmarks against veth, the null tunnel, boringtun-cli and
//!   kernel WireGuard where the machine has it;
//! - [`eval`]: the paper's evaluation (Table 2, Figs. 5-9) reproduced side by side with
//!   baselines, its report and [`charts`];
//! - [`ha`]: the highly available deployment under faults;
//! - [`odds`]: how often the RTT targets hold in repeated trials, for ASMN and for a null
//!   tunnel (the floor of a target that asks every run to win);
//! - [`scenarios`]: the flood, the revocation cut-off and the gateway path, written once
//!   for the demo, the evaluation and the integration tests;
//! - [`generators`]: the traffic generators (`asmn-lab gen ...`) the others run inside
//!   namespaces.
//!
//! It runs on the test kit (`asmn-testkit`): namespaces, processes and the tenant.

#![forbid(unsafe_code)]

pub mod bench;
pub mod charts;
pub mod eval;
pub mod generators;
pub mod ha;
pub mod odds;
pub mod scenarios;
