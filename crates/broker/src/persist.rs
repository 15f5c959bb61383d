//! The broker's side of persistence: the contract (`Persistence`, what it
//! keeps) lives in `roost-bus`, the hub implements it; here is how the
//! broker runs the writes nobody waits for.

pub use roost_bus::{Done, PersistError, Persistence, QueuePage, Queued, Restore, Retained};

/// Runs a write nobody waits for, logging a failure.
pub(crate) fn background(done: Done) {
    tokio::spawn(async move {
        if let Err(e) = done.await {
            tracing::error!(error = %e, "the broker could not save its state");
        }
    });
}
