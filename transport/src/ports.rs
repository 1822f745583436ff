//! Loopback ports for processes started on one machine (`sq-cloud dev`'s nodes, tests'
//! gateways).

use std::hash::{BuildHasher, Hasher};
use std::ops::Range;

/// Where [`free_loopback_port`] looks: below the kernel's ephemeral range (32768–60999 by
/// default). A port the kernel handed out and got back can go at once to another socket (some
/// process's outgoing connection, a QUIC client's endpoint), and then the server meant for it
/// cannot bind it.
pub const LOOPBACK_PORTS: Range<u16> = 20_000..32_000;

/// A random port of [`LOOPBACK_PORTS`] that `free` finds free (by binding it), or `None` if
/// none of 1,000 tries was.
pub fn free_loopback_port(free: impl Fn(u16) -> bool) -> Option<u16> {
    let span = u64::from(LOOPBACK_PORTS.end - LOOPBACK_PORTS.start);
    (0..1_000).find_map(|_| {
        // A fresh `RandomState` is a fresh random key: a random port each time.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = LOOPBACK_PORTS.start + (h.finish() % span) as u16;
        free(port).then_some(port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the port found is one the check accepted, from the range; none is found when the
    // check accepts none.
    #[test]
    fn a_free_port_is_one_the_check_accepted() {
        let port = free_loopback_port(|p| p % 2 == 0).expect("an even port");
        assert!(LOOPBACK_PORTS.contains(&port) && port % 2 == 0, "{port}");
        assert_eq!(free_loopback_port(|_| false), None);
    }
}
