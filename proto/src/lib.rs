//! The SQ request model and the phext format, shared by node and gateway.
//!
//! This crate owns what a request *means*: strict coordinates ([`coord`]), safe phext names
//! ([`name`]), the canonical libphext serialisation and checksums ([`doc`]), the read operations
//! ([`ops`], and [`streamed`] for answers made a piece at a time), the routes of `/api/v2`
//! ([`route`]), the typed requests parsed from them ([`request`]), the errors they end in
//! ([`error`]), the versioned messages that cross the wire ([`wire`]) and the typed answers to
//! admin operations ([`admin`]), which only the gateway renders as JSON.
//!
//! It knows nothing of I/O: no files, sockets, clocks or async runtimes. The gateway parses with it
//! and the node executes with it, so both agree on every request byte for byte.

pub mod admin;
pub mod auth;
pub mod calendar;
pub mod cluster;
pub mod coord;
pub mod doc;
pub mod error;
pub mod name;
pub mod ops;
pub mod request;
pub mod route;
pub mod streamed;
pub mod wire;

pub use coord::Coordinate;
pub use doc::Doc;
pub use error::ApiError;
pub use name::PhextName;
pub use request::{SqRequest, SqResponse};
pub use route::Route;
