//! Everything that speaks ctnetlink: socket set-up, the event decoder, the
//! kernel-side BPF filter, request building (GET, dump) and the
//! `/proc/net/netlink` drop counter. Only this module touches netlink bytes.

pub mod bpf;
pub mod decode;
pub mod procfs;
pub mod request;
pub mod socket;
