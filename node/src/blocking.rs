//! How the node runs blocking work (the store and its disk I/O): the one seam between the async
//! service and the synchronous store.
//!
//! In production [`spawn`] is `tokio::task::spawn_blocking`. The simulator runs a whole cluster
//! on one thread, where a thread pool would make the order of events depend on the OS scheduler;
//! on a thread it marked with [`run_inline_on_this_thread`], the work runs as an ordinary task
//! of that thread. Its effect then lands after simulated time, as a real disk's would: the task
//! first waits what the simulator says the disk takes, then runs the work, then waits again for
//! what the work cost. Other requests, handoffs and checkpoints run meanwhile.
//!
//! [`spawn_steps`] runs work that has a start and a completion (a write: logged and applied in
//! memory, then durable). In production both run on one pool thread, one after the other; in
//! the simulator, simulated time passes between them, so other writers' records join the same
//! log batch and a checkpoint or a handoff can come between a write's start and its answer.

use std::cell::RefCell;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Simulated duration of the next piece of blocking work on this thread (the disk's latency and
/// what the work before it cost).
pub type CostFn = Box<dyn Fn() -> Duration>;

thread_local! {
    static INLINE: RefCell<Option<CostFn>> = const { RefCell::new(None) };
}

/// From now on, blocking work started on this thread runs as a task of it, between waits of
/// `cost()` of (tokio) time. `None` goes back to the blocking pool. For the simulator only.
pub fn run_inline_on_this_thread(cost: Option<CostFn>) {
    INLINE.with(|i| *i.borrow_mut() = cost);
}

fn inline() -> bool {
    INLINE.with(|i| i.borrow().is_some())
}

/// Waits, on a simulator thread, what the disk says the next piece of work takes.
async fn disk_time() {
    let cost = INLINE.with(|i| i.borrow().as_ref().map_or(Duration::ZERO, |cost| cost()));
    if cost.is_zero() {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(cost).await;
    }
}

/// Runs `f` where blocking work belongs: tokio's blocking pool, or as a task on a simulator
/// thread, whose effect lands after simulated disk time.
pub fn spawn<F, T>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if !inline() {
        return tokio::task::spawn_blocking(f);
    }
    tokio::task::spawn(async move {
        disk_time().await;
        let out = f();
        disk_time().await;
        out
    })
}

/// Work in two parts: what the first part leaves to do.
pub enum Step<T> {
    Done(T),
    /// The completion, run after the first part's effect (it may wait for the disk).
    Then(Box<dyn FnOnce() -> T + Send>),
}

/// Like [`spawn`], for work with a start and a completion: on the blocking pool the two run
/// back to back on one thread; on a simulator thread, simulated disk time passes between them.
pub fn spawn_steps<F, T>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> Step<T> + Send + 'static,
    T: Send + 'static,
{
    if !inline() {
        return tokio::task::spawn_blocking(move || match f() {
            Step::Done(out) => out,
            Step::Then(rest) => rest(),
        });
    }
    tokio::task::spawn(async move {
        disk_time().await;
        let step = f();
        disk_time().await;
        match step {
            Step::Done(out) => out,
            Step::Then(rest) => {
                let out = rest();
                disk_time().await;
                out
            }
        }
    })
}
