//! Bounds on the work one request can make the process do, so that the API cannot starve
//! ingest (in `fleetpipe up` the collectors share the process, and everywhere they share the
//! store):
//!
//! * **time**: every request but the live stream is answered within `api.request_timeout`
//!   or gets a 503 with `Retry-After` ([`deadline`], a middleware on every other route);
//! * **store queries**: at most `api.max_concurrent_queries` requests read the store at
//!   once ([`Limits::query_slot`]); one more is refused at once with a 503 and
//!   `Retry-After: 1` rather than queued. A read whose request gave up (timed out, client
//!   gone) keeps its slot until the store answers ([`QuerySlot::read`]), so timeouts and
//!   impatient retries cannot pile queries up in the store behind the limit's back;
//! * **rows**: a series request reads at most one raw reading more than
//!   [`RAW_CAP`](crate::routes::devices::RAW_CAP), or `api.max_rollup_rows` per-minute
//!   rollups (a range needing more is a 400, see [`rollup_range`](crate::routes::devices::rollup_range));
//! * **CPU**: passes over the whole in-memory index (device list, fleet summary, metrics)
//!   run on the blocking pool, at most one per core at a time ([`Limits::index_pass`]);
//!   they wait for a turn (within the request's time) rather than fail, being short.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fleetpipe_pipeline::config::ApiConfig;
use fleetpipe_store::StoreError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinError;

use crate::error::ApiError;
use crate::index::{Index, Online};

/// The limits of one API instance; cheap to clone (the semaphores are shared).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest a request (but the live stream) may take.
    pub request_timeout: Duration,
    /// Most per-minute rollup rows one series request may read.
    pub max_rollup_rows: u64,
    max_queries: usize,
    queries: Arc<Semaphore>,
    passes: Arc<Semaphore>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from_config(&ApiConfig::default())
    }
}

impl Limits {
    /// Limits with `max_queries` store queries at once (at least one).
    pub fn new(request_timeout: Duration, max_queries: usize, max_rollup_rows: u64) -> Self {
        let max_queries = max_queries.max(1);
        // More passes at once than cores would only slow each other down, and would take
        // blocking-pool threads that SQLite reads and writes also run on.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Limits {
            request_timeout,
            max_rollup_rows,
            max_queries,
            queries: Arc::new(Semaphore::new(max_queries)),
            passes: Arc::new(Semaphore::new(cores)),
        }
    }

    /// The limits the `[api]` config section sets.
    pub fn from_config(api: &ApiConfig) -> Self {
        Limits::new(
            api.request_timeout,
            api.max_concurrent_queries,
            api.max_rollup_rows,
        )
    }

    /// Store queries running now, including those whose requests have given up.
    pub fn queries_in_flight(&self) -> usize {
        self.max_queries - self.queries.available_permits()
    }

    /// A slot for one request's store reads, or a 503 (`Retry-After: 1`) when
    /// `api.max_concurrent_queries` requests are reading already.
    pub fn query_slot(&self) -> Result<QuerySlot, ApiError> {
        match Arc::clone(&self.queries).try_acquire_owned() {
            Ok(permit) => Ok(QuerySlot {
                _permit: Arc::new(permit),
            }),
            Err(_) => Err(ApiError::Busy(format!(
                "the server is busy: {} history queries are running already; try again in a \
                 second",
                self.max_queries
            ))),
        }
    }

    /// Runs `pass` over the index on the blocking pool (it may walk every device: a sort
    /// of 100k devices must not hold an async worker thread), once a turn is free.
    pub async fn index_pass<T, F>(
        &self,
        index: Arc<Index>,
        online: Online,
        pass: F,
    ) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Index, Online) -> T + Send + 'static,
    {
        let turn = Arc::clone(&self.passes)
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Unavailable("shutting down".into()))?;
        tokio::task::spawn_blocking(move || {
            let out = pass(&index, online);
            drop(turn);
            out
        })
        .await
        .map_err(join_error)
    }
}

/// One request's right to read the store; see [`Limits::query_slot`]. Clones share the
/// slot, which frees when the last one drops.
#[derive(Debug, Clone)]
pub struct QuerySlot {
    _permit: Arc<OwnedSemaphorePermit>,
}

impl QuerySlot {
    /// Runs one store read as a task of its own that holds the slot. The request awaits
    /// it; when the request is dropped (timeout, client gone), the read still runs to its
    /// end (the store would finish the query anyway: a blocking SQLite call, a PostgreSQL
    /// statement) and only then frees the slot, so the limit counts every query the store
    /// is working on.
    pub async fn read<T, F>(&self, read: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let slot = self.clone();
        let task = tokio::spawn(async move {
            let result = read.await;
            drop(slot);
            result
        });
        match task.await {
            Ok(result) => result.map_err(ApiError::from),
            Err(e) => Err(join_error(e)),
        }
    }
}

fn join_error(e: JoinError) -> ApiError {
    if e.is_panic() {
        ApiError::Internal(format!("a request task panicked: {e}"))
    } else {
        ApiError::Unavailable("shutting down".into())
    }
}

/// Middleware: answers 503 with `Retry-After` when the handler has not answered within
/// `request_timeout`, and drops it (a store read it started runs on, see
/// [`QuerySlot::read`]). Not applied to the live stream, which is endless by design.
pub async fn deadline(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::TimedOut(limits.request_timeout).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn query_slots_are_held_until_the_store_answers() {
        let limits = Limits::new(Duration::from_secs(10), 2, 1000);
        let a = limits.query_slot().unwrap();
        let b = limits.query_slot().unwrap();
        let refused = limits.query_slot().unwrap_err();
        assert_eq!(refused.retry_after(), Some(1));
        assert_eq!(limits.queries_in_flight(), 2);

        // A read whose request gave up keeps the slot until it ends.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let read = a.read(async move {
            let _ = released.await;
            Ok::<_, StoreError>(1)
        });
        assert!(tokio::time::timeout(Duration::from_millis(10), read)
            .await
            .is_err());
        drop(a);
        drop(b);
        assert_eq!(
            limits.queries_in_flight(),
            1,
            "the abandoned read holds its slot"
        );
        release.send(()).unwrap();
        for _ in 0..100 {
            if limits.queries_in_flight() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(limits.queries_in_flight(), 0);
        assert!(limits.query_slot().is_ok());
    }

    #[tokio::test]
    async fn store_errors_and_panics() {
        let limits = Limits::default();
        let slot = limits.query_slot().unwrap();
        let down = slot
            .read(async { Err::<(), _>(StoreError::Task("down".into())) })
            .await
            .unwrap_err();
        assert_eq!(down.status().as_u16(), 503);
        let bug = slot
            .read(async {
                if true {
                    panic!("bug");
                }
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap_err();
        assert_eq!(bug.status().as_u16(), 500);
    }
}
