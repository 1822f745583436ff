//! How the node runs blocking work (the store and its disk I/O): the one seam between the async
//! service and the synchronous store.
//!
//! In production [`spawn`] is `tokio::task::spawn_blocking`. The simulator runs a whole cluster
//! on one thread, where a thread pool would make the order of events depend on the OS scheduler;
//! on a thread it marked with [`run_inline_on_this_thread`], the work runs as an ordinary task
//! of that thread, followed by the simulated time the disk says it took.

use std::cell::RefCell;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Simulated duration of the blocking work that just ran on this thread.
pub type CostFn = Box<dyn Fn() -> Duration>;

thread_local! {
    static INLINE: RefCell<Option<CostFn>> = const { RefCell::new(None) };
}

/// From now on, blocking work started on this thread runs inline, then waits `cost()` of (tokio)
/// time. `None` goes back to the blocking pool. For the simulator only.
pub fn run_inline_on_this_thread(cost: Option<CostFn>) {
    INLINE.with(|i| *i.borrow_mut() = cost);
}

fn inline() -> bool {
    INLINE.with(|i| i.borrow().is_some())
}

fn inline_cost() -> Duration {
    INLINE.with(|i| i.borrow().as_ref().map_or(Duration::ZERO, |cost| cost()))
}

/// Runs `f` where blocking work belongs: tokio's blocking pool, or inline on a simulator thread.
pub fn spawn<F, T>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if !inline() {
        return tokio::task::spawn_blocking(f);
    }
    tokio::task::spawn(async move {
        let out = f();
        let cost = inline_cost();
        if !cost.is_zero() {
            tokio::time::sleep(cost).await;
        }
        out
    })
}
