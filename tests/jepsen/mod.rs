//! A Jepsen-style register test's parts: clients that record a history, the nemesis that
//! injects faults, and the check of the history by a linearizability checker.

pub mod client;
pub mod history;
pub mod nemesis;

#[cfg(test)]
mod history_tests;
