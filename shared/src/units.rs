//! Units that carry their meaning in the type.
//!
//! Rates and bursts follow Open vSwitch's `ingress_policing_rate` (kbit/s, 1 kbit =
//! 1000 bits) and `ingress_policing_burst` (kbit).

use serde::{Deserialize, Serialize};

/// A rate in kilobits (1000 bits) per second; 0 means unlimited, as in OVS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KbitPerSec(pub u64);

impl KbitPerSec {
    /// The rate in bytes per second (1 kbit/s = 125 B/s).
    pub fn bytes_per_sec(self) -> u64 {
        self.0.saturating_mul(125)
    }

    /// Whether this rate means "no limit".
    pub fn is_unlimited(self) -> bool {
        self.0 == 0
    }
}

/// A burst size in kilobits (1000 bits); 0 means the OVS default (8000 kbit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Kbit(pub u64);

impl Kbit {
    /// Open vSwitch's burst when `ingress_policing_burst` is 0 (netdev-linux: 8000 kbit).
    pub const OVS_DEFAULT_BURST: Kbit = Kbit(8000);

    /// The size in bytes (1 kbit = 125 B).
    pub fn bytes(self) -> u64 {
        self.0.saturating_mul(125)
    }

    /// This burst with OVS's default substituted for 0.
    pub fn or_ovs_default(self) -> Kbit {
        if self.0 == 0 {
            Self::OVS_DEFAULT_BURST
        } else {
            self
        }
    }
}

/// A number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bytes(pub u64);
