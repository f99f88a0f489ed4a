//! keybroker: serves secrets to pods from memory, as the pod's own identity.
//!
//! The core (everything in this crate except the protocol edges named below) has no FUSE, gRPC
//! or provider-SDK types in it. Request flow and module ownership: docs/ARCHITECTURE.md.
//!
//! - [`secret`]: secret bytes (zeroized, redacted);
//! - [`provider`]: where objects come from (`local` here; Vault and Azure behind the same trait);
//! - [`cache`] + [`rotation`]: one fetch per object per cycle on the node, and when to refetch;
//! - [`refresh`]: keeps one volume fresh;
//! - [`volume`]: content model, the in-memory filesystem, and the FUSE/tmpfs edges;
//! - [`audit`] + [`procinfo`]: the hash-chained audit log and who read what;
//! - [`access`]: who may open a volume's files (a binding's `readers` policy);
//! - [`config`] + [`mount`]: `keybroker mount`;
//! - [`sidecar`]: `keybroker init` / `sidecar` in the pod, as the pod;
//! - [`hardening`]: no core dumps (secrets live in memory);
//! - [`tls`]: HTTPS clients (rustls + ring, CA bundle or public roots);
//! - [`untrusted`]: YAML from pods, bounded before parsing, errors without the pod's text;
//! - [`node`]: `keybroker node`, the CSI node plugin behind the `keybroker-csi` edge.

// Two exceptions, reviewed, both in `volume::fanotify`: `adopt_group` wraps a kept fanotify
// group's descriptor (nix has no safe constructor for it), and `file_id` borrows an event's
// descriptor for one `fstat` while this process holds it.
#![deny(unsafe_code)]

pub mod access;
pub mod audit;
pub mod broker;
pub mod cache;
pub mod config;
pub mod hardening;
pub mod keeper;
pub mod mount;
pub mod node;
pub mod notify;
pub mod procinfo;
pub mod provider;
pub mod refresh;
pub mod rotation;
pub mod secret;
pub mod sidecar;
pub mod tls;
pub mod untrusted;
pub mod volume;
