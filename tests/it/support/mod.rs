//! Test utilities: throwaway PostgreSQL clusters and a fault-injecting TCP
//! proxy. Not every test binary uses every item, hence the `dead_code`
//! allowances.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod netns;
pub mod proxy;

pub use cluster::{process_alive, ClusterBuilder, StopMode, ThrowawayCluster};
pub use netns::NetworkNamespace;
pub use proxy::TcpProxy;
