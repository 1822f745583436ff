//! QUIC between sq-cloud processes: mutual TLS from the cluster's private CA, one long-lived
//! connection per peer, one bidirectional stream per request, one versioned frame each way (an
//! answer may instead stream: a head frame, then body frames; [`Handler::handle_answer`],
//! [`Client::call_answer`]).
//!
//! This crate owns:
//! - [`certs`]: the private cluster CA and the certificates it issues (behind `sq-cloud certs`);
//! - [`frame`]: the wire frame `[b"SQC"][PROTOCOL_VERSION][len: u32 BE][payload]` and the bincode
//!   helpers [`encode`] / [`decode`] for the typed payloads other crates define;
//! - [`Server`]: accepts only peers holding a certificate from the cluster CA, learns their
//!   [`Role`] from the certificate, and hands each request to a [`Handler`];
//! - [`Client`]: a cheap-to-clone pool keeping one connection per peer address.
//!
//! Every timeout, queue and size has a named limit ([`ServerLimits`], [`ClientLimits`],
//! [`FRAME_BYTES_MAX`]). Errors are one enum, [`TransportError`], whose variants tell
//! "peer unavailable" apart from "peer refused us" and from "peer speaks another version".
//!
//! **Architecture Invariant:** transport moves opaque, versioned frames; it knows nothing of
//! tenants, Raft or HTTP. What a payload means is decided by the crates above it.
//!
//! Map of the crate:
//! - `error.rs`: [`TransportError`] and the one place quinn's errors are classified;
//! - `codes.rs`: the stream-reset and connection-close codes both sides agree on;
//! - `tls.rs`: rustls and quinn configuration (ring provider, ALPN, client-cert verification);
//! - `server.rs`, `client.rs`: the two ends;
//! - `caller.rs`: [`Caller`], the seam through which nodes and gateways send, so the simulator
//!   can put its own network in the client's place.

mod caller;
pub mod certs;
mod client;
mod codes;
mod error;
pub mod frame;
pub mod ports;
mod server;
mod tls;

pub use caller::{AnswerCallFuture, CallFuture, Caller};
pub use certs::{Identity, Role};
pub use client::{
    BodyReader, Client, ClientLimits, ClientStats, ADDED_RTT_ENV, ANSWER_HEAD_WAIT_MAX,
    ANSWER_WAIT_PER_MIB, REQUEST_PIECE_BYTES,
};
pub use error::{Result, TransportError};
pub use frame::{decode, encode, FRAME_BYTES_MAX, PROTOCOL_VERSION};
pub use ports::free_loopback_port;
pub use server::{
    body_unfold, Answer, AnswerBody, AnswerFuture, Handler, HandlerFuture, Peer, Server,
    ServerLimits,
};

/// The ALPN protocol both ends offer. A peer built for another protocol version offers another
/// string, so the TLS handshake fails before any frame is exchanged. It follows
/// [`PROTOCOL_VERSION`].
pub const ALPN: &[u8] = b"sq-cloud/2";

/// The DNS name every certificate carries and every client verifies, whatever the peer's IP.
/// Nodes move between addresses; trust comes from the cluster CA, not from the address.
pub const SERVER_NAME: &str = "sq-cloud";

#[cfg(test)]
mod tests;
