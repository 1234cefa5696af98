//! ASMN's integration tests live in `tests/tests/`: tunnels, the Fig. 9 flood, attacks on
//! the agent and Sec-EM, faults, the HA deployment, the VNFM hook, IPv6 and the VM image.
//! They run on the test kit (`tests/kit`, crate `asmn-testkit`: namespaces, processes,
//! the tenant, attacker tools) and call the lab's scenarios (`tests/lab`, crate
//! `asmn-lab`) rather than writing them again. This library is empty.

#![forbid(unsafe_code)]
