//! placeholder (being written)
pub mod command;
pub mod placement;
pub mod state;
pub use state::*;
