//! The serving error: everything that can go wrong between a request arriving and its answer.
//!
//! Variants carry what the client needs to fix the request; `grpc::status` maps each to its
//! gRPC code in one place.

use std::time::Duration;

use crate::preprocess::PreprocessError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("model `{name}` not found; this server serves: {available}")]
    ModelNotFound { name: String, available: String },
    /// An item of a batch request failed; the batch fails with the item's code.
    #[error("requests[{index}]: {source}")]
    Item { index: usize, source: Box<Error> },
    #[error("model `{model}` has no version `{version}` loaded; it serves version(s) {serving}")]
    VersionNotFound {
        model: String,
        version: String,
        serving: String,
    },
    #[error("no model is loaded (the model directory had none)")]
    NoModels,
    /// A malformed request: the message says which field and what was expected.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Image(#[from] PreprocessError),
    #[error("top_k {top_k} is out of range for model `{model}`: use 1..={classes}, or 0 for the default")]
    TopK {
        top_k: u32,
        model: String,
        classes: usize,
    },
    #[error("the queue of model `{model}` is full ({capacity} requests waiting); retry later")]
    QueueFull { model: String, capacity: usize },
    #[error(
        "model `{model}` already has {limit} requests in flight (--max-in-flight); retry later"
    )]
    TooManyInFlight { model: String, limit: usize },
    #[error("deadline exceeded after {} ms waiting in the queue of model `{model}`; not computed", waited.as_millis())]
    DeadlineExceeded { model: String, waited: Duration },
    #[error("the server is shutting down; retry on another instance")]
    ShuttingDown,
    #[error("the server is starting: models are still loading")]
    Starting,
    #[error("inference failed in model `{model}`: {message}")]
    Backend { model: String, message: String },
    #[error("the executor of model `{model}` has stopped")]
    ExecutorGone { model: String },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0} is not implemented by this server")]
    Unimplemented(String),
    /// A repository operation this server's `--model-control` mode does not allow.
    #[error("{0}")]
    ModelControl(String),
    /// An explicit load whose model failed to load; the versions served before stay.
    #[error("model `{model}` failed to load: {reason}")]
    LoadFailed { model: String, reason: String },
}

impl Error {
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}
