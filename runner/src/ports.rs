//! Host ports: checking that the user's ports are free, picking free ones for tests.

use std::net::{Ipv4Addr, TcpListener};

use crate::error::{Error, Result};

/// Checks that `port` can be bound on 127.0.0.1; `flag` is the runner option that changes it.
pub fn ensure_free(port: u16, flag: &'static str) -> Result<()> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map(drop)
        .map_err(|source| Error::PortInUse { port, flag, source })
}

/// A port on 127.0.0.1 that was free a moment ago (the kernel's pick for an ephemeral bind).
pub fn pick_free() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| Error::io("binding an ephemeral port on 127.0.0.1", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::io("reading an ephemeral port", e))?
        .port();
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_port_is_reported_with_its_flag() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let err = ensure_free(port, "--metrics-port").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&port.to_string()), "{msg}");
        assert!(msg.contains("--metrics-port"), "{msg}");
        drop(listener);
        let free = pick_free().unwrap();
        assert_ne!(free, 0);
        ensure_free(free, "--nbd-port").unwrap();
    }
}
