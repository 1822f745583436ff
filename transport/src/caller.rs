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

use crate::{BodyReader, Client, Result};

pub type CallFuture<'a> = Pin<Box<dyn Future<Output = Result<Bytes>> + Send + 'a>>;

/// The future [`Caller::call_answer`] returns: the answer's head and a reader for its body.
pub type AnswerCallFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(Bytes, BodyReader)>> + Send + 'a>>;

/// Sends one request frame to `addr` and returns the answer, within `timeout`.
pub trait Caller: Send + Sync + 'static {
    fn call(&self, addr: SocketAddr, request: Bytes, timeout: Duration) -> CallFuture<'_>;

    /// Like [`Caller::call`], for an answer that may stream a body after its head. The default
    /// streams nothing (the simulator's network carries whole answers only).
    fn call_answer(
        &self,
        addr: SocketAddr,
        request: Bytes,
        timeout: Duration,
    ) -> AnswerCallFuture<'_> {
        Box::pin(async move { Ok((self.call(addr, request, timeout).await?, BodyReader::empty())) })
    }
}

impl Caller for Client {
    fn call(&self, addr: SocketAddr, request: Bytes, timeout: Duration) -> CallFuture<'_> {
        Box::pin(Client::call(self, addr, request, timeout))
    }

    fn call_answer(
        &self,
        addr: SocketAddr,
        request: Bytes,
        timeout: Duration,
    ) -> AnswerCallFuture<'_> {
        Box::pin(Client::call_answer(self, addr, request, timeout))
    }
}
