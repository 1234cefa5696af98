//! What ASMN's lab (`asmn-lab`) and its integration tests share:
//!
//! - [`netns`]: network namespaces, veth pairs, bridges and processes inside them, each
//!   removed or stopped on drop (RAII), with unique names;
//! - [`tenant`]: a whole tenant in namespaces: Sec-EM, `asmnctl`, agents on a bridge,
//!   their bundles, metrics and waits;
//! - [`attacker`]: attacker tools built from the agent's own libraries (a rogue peer with
//!   stolen state, forged Sec-EM requests);
//! - [`packets`]: packet helpers both sides use;
//! - [`error`]: the kit's typed error.

#![forbid(unsafe_code)]

pub mod attacker;
pub mod error;
pub mod netns;
pub mod packets;
pub mod tenant;

pub use error::{KitError, KitResult};
