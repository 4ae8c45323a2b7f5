//! Results that are either ready now or still on their way.
//!
//! FUSE callbacks are synchronous and must never wait on the network. Most operations on local
//! paths finish in microseconds, so they should be answered on the calling FUSE thread without
//! a hop to the runtime; operations that reach a remote tier must be moved into a task. [`Op`]
//! lets the core and the tiers say which case they are in, and lets the core chain a local step
//! after a tier's step without writing it twice (see [`Op::and_then`]).

use std::future::Future;
use std::pin::Pin;

/// A boxed future that can be moved to the runtime.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The outcome of an operation: finished, or a future to drive on the runtime.
#[must_use = "an Op does nothing until it is answered or awaited"]
pub enum Op<T, E> {
    /// Finished on the calling thread.
    Ready(Result<T, E>),
    /// Needs the runtime (network, or a blocking call kept off FUSE threads).
    Pending(BoxFuture<Result<T, E>>),
}

impl<T: Send + 'static, E: Send + 'static> Op<T, E> {
    /// A finished success.
    pub fn ok(value: T) -> Self {
        Op::Ready(Ok(value))
    }

    /// A finished failure.
    pub fn err(error: impl Into<E>) -> Self {
        Op::Ready(Err(error.into()))
    }

    /// Wraps a future.
    pub fn pending(future: impl Future<Output = Result<T, E>> + Send + 'static) -> Self {
        Op::Pending(Box::pin(future))
    }

    /// Runs `next` after a success: at once if ready, else inside the future.
    pub fn and_then<U: Send + 'static>(
        self,
        next: impl FnOnce(T) -> Result<U, E> + Send + 'static,
    ) -> Op<U, E> {
        match self {
            Op::Ready(result) => Op::Ready(result.and_then(next)),
            Op::Pending(future) => Op::pending(async move { future.await.and_then(next) }),
        }
    }

    /// Runs the op `next` makes of this one's outcome, success or failure: at once if both
    /// are ready, else in one future.
    pub fn then<U: Send + 'static, E2: Send + 'static>(self, next: impl FnOnce(Result<T, E>) -> Op<U, E2> + Send + 'static) -> Op<U, E2> {
        match self {
            Op::Ready(result) => next(result),
            Op::Pending(future) => Op::pending(async move { next(future.await).into_future().await }),
        }
    }

    /// Calls `f` with the error, if the outcome is one.
    pub fn inspect_err(self, f: impl FnOnce(&E) + Send + 'static) -> Self {
        match self {
            Op::Ready(result) => Op::Ready(result.inspect_err(f)),
            Op::Pending(future) => Op::pending(async move { future.await.inspect_err(f) }),
        }
    }

    /// Converts the error type.
    pub fn err_into<E2: From<E> + Send + 'static>(self) -> Op<T, E2> {
        match self {
            Op::Ready(result) => Op::Ready(result.map_err(E2::from)),
            Op::Pending(future) => Op::pending(async move { future.await.map_err(E2::from) }),
        }
    }

    /// Waits for the outcome (for async callers).
    pub async fn into_future(self) -> Result<T, E> {
        match self {
            Op::Ready(result) => result,
            Op::Pending(future) => future.await,
        }
    }

    /// Whether the outcome is already known.
    pub fn is_ready(&self) -> bool {
        matches!(self, Op::Ready(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_chains_stay_ready() {
        let op: Op<u32, String> = Op::ok(1);
        let op = op.and_then(|v| Ok(v + 1));
        assert!(op.is_ready());
        match op {
            Op::Ready(r) => assert_eq!(r, Ok(2)),
            Op::Pending(_) => unreachable!(),
        }
    }

    #[tokio::test]
    async fn pending_chains_run_in_order() {
        let op: Op<u32, String> = Op::pending(async { Ok(1) });
        let op = op.and_then(|v| Ok(v * 10)).and_then(|v| if v == 10 { Err("ten".to_string()) } else { Ok(v) });
        assert!(!op.is_ready());
        assert_eq!(op.into_future().await, Err("ten".to_string()));
    }
}
