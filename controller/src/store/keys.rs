//! The key schema: where each kind of record lives in the store, under [`PREFIX`]. Every
//! key Sec-EM reads or writes is made here, so the layout (and what a schema migration
//! must move) is in one place.
//!
//! | key | value |
//! |---|---|
//! | `vnfs/<vnf>` | the on-boarded VNF: VNFD and golden digests |
//! | `catalogs/<vnf>` | the Sec-catalog in force (agents' pushes follow it) |
//! | `catalog-history/<vnf>/<version, 20 digits>` | every version that was in force |
//! | `catalog-acknowledged/<vnf>` | the last version announced as acknowledged by all |
//! | `instances/<id hex>` | an instance: identity, chain position, state, keys |
//! | `names/<tenant>/<vnf>/<name>` | the instance holding that name (hex ID) |
//! | `gateways/<tenant>/<vnf>/<id hex>` | an enrolled gateway instance of that VNF |
//! | `overlays/<tenant>/<ip>` | the instance at that overlay address (hex ID) |
//! | `tenants/<tenant>/next-host` | the next overlay host number to hand out |
//! | `acks/<id hex>` | the catalog version an agent acknowledged, and how fast |
//! | `verify-back/<peer hex>/<requester hex>` | a peer asked to verify a requester |
//! | `admin-revoked/<serial>` | an admin certificate on the deny-list |
//! | `audit/<seq, 20 digits>` | a block of audit records (see `audit`) |
//! | `subscriptions/<id>`, `subscription-cursors/<id>` | event subscriptions, positions |
//! | `notify/lease` | which replica delivers notifications |
//!
//! Outside [`PREFIX`]: `meta/schema` (see [`super::schema`]).

use std::net::IpAddr;

use asmn_shared::ids::{InstanceKey, InstanceName, TenantId, VnfId};

use super::PREFIX;

/// An on-boarded VNF.
pub fn vnf_key(vnf: &VnfId) -> String {
    format!("{}{vnf}", vnfs_prefix())
}

/// Every on-boarded VNF.
pub fn vnfs_prefix() -> String {
    format!("{PREFIX}vnfs/")
}

/// Where catalogs in force live (agents and the push service watch it).
pub fn catalog_prefix() -> String {
    format!("{PREFIX}catalogs/")
}

/// The catalog in force for `vnf`.
pub fn catalog_key(vnf: &VnfId) -> String {
    format!("{}{vnf}", catalog_prefix())
}

/// Every version `vnf`'s catalog has had.
pub fn catalog_history_prefix(vnf: &VnfId) -> String {
    format!("{PREFIX}catalog-history/{vnf}/")
}

/// Version `version` of `vnf`'s catalog (zero-padded: listed in version order).
pub fn catalog_history_key(vnf: &VnfId, version: u64) -> String {
    format!("{}{version:020}", catalog_history_prefix(vnf))
}

/// The last version of `vnf`'s catalog announced as acknowledged by every agent.
pub fn catalog_acknowledged_key(vnf: &VnfId) -> String {
    format!("{PREFIX}catalog-acknowledged/{vnf}")
}

/// Key of an instance record.
pub fn instance_key(id: &InstanceKey) -> String {
    format!("{}{}", instances_prefix(), id.to_hex())
}

/// Every instance record.
pub fn instances_prefix() -> String {
    format!("{PREFIX}instances/")
}

/// The instance named `name` of `vnf` in `tenant`.
pub fn name_key(tenant: &TenantId, vnf: &VnfId, name: &InstanceName) -> String {
    format!("{PREFIX}names/{tenant}/{vnf}/{name}")
}

/// The enrolled gateway instances of `vnf` in `tenant`.
pub fn gateways_prefix(tenant: &TenantId, vnf: &VnfId) -> String {
    format!("{PREFIX}gateways/{tenant}/{vnf}/")
}

/// Gateway instance `id` of `vnf` in `tenant`, while it is enrolled.
pub fn gateway_key(tenant: &TenantId, vnf: &VnfId, id: &InstanceKey) -> String {
    format!("{}{}", gateways_prefix(tenant, vnf), id.to_hex())
}

/// The instance at overlay address `ip` of `tenant`.
pub fn overlay_index_key(tenant: &TenantId, ip: &IpAddr) -> String {
    format!("{PREFIX}overlays/{tenant}/{ip}")
}

/// The next overlay host number of `tenant`.
pub fn overlay_counter_key(tenant: &TenantId) -> String {
    format!("{PREFIX}tenants/{tenant}/next-host")
}

/// Instance `id`'s last catalog acknowledgement.
pub fn ack_key(id: &InstanceKey) -> String {
    format!("{}{}", acks_prefix(), id.to_hex())
}

/// Every catalog acknowledgement.
pub fn acks_prefix() -> String {
    format!("{PREFIX}acks/")
}

/// Where requests to verify back live: `<prefix><peer hex>/<requester hex>`.
pub fn verify_back_prefix() -> String {
    format!("{PREFIX}verify-back/")
}

/// `peer` is asked to verify `requester`.
pub fn verify_back_key(peer: &InstanceKey, requester: &InstanceKey) -> String {
    format!(
        "{}{}/{}",
        verify_back_prefix(),
        peer.to_hex(),
        requester.to_hex()
    )
}

/// An admin certificate serial on the deny-list.
pub fn admin_revoked_key(serial: &str) -> String {
    format!("{}{serial}", admin_revoked_prefix())
}

/// The deny-list of admin certificates.
pub fn admin_revoked_prefix() -> String {
    format!("{PREFIX}admin-revoked/")
}

/// Every subscription.
pub fn subscriptions_prefix() -> String {
    format!("{PREFIX}subscriptions/")
}

/// Subscription `id`.
pub fn subscription_key(id: &str) -> String {
    format!("{}{id}", subscriptions_prefix())
}

/// The last event subscription `id` acknowledged.
pub fn subscription_cursor_key(id: &str) -> String {
    format!("{PREFIX}subscription-cursors/{id}")
}

/// Which replica delivers notifications.
pub fn notify_lease_key() -> String {
    format!("{PREFIX}notify/lease")
}
