//! The seam every request between processes goes through: [`Caller`].
//!
//! Nodes and gateways never name the QUIC [`Client`] in their logic; they hold an
//! `Arc<dyn Caller>`. In production that is the [`Client`]; in the simulator it is an in-memory
//! network that delays, drops, duplicates and partitions messages under one seed.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

use crate::{Client, Result};

pub type CallFuture<'a> = Pin<Box<dyn Future<Output = Result<Bytes>> + Send + 'a>>;

/// Sends one request frame to `addr` and returns the answer, within `timeout`.
pub trait Caller: Send + Sync + 'static {
    fn call(&self, addr: SocketAddr, request: Bytes, timeout: Duration) -> CallFuture<'_>;
}

impl Caller for Client {
    fn call(&self, addr: SocketAddr, request: Bytes, timeout: Duration) -> CallFuture<'_> {
        Box::pin(Client::call(self, addr, request, timeout))
    }
}
