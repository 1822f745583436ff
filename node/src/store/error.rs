//! The store's one error type, and how it reads to a client.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::ApiError;

/// How long a client should wait before retrying after a disk failure, in seconds. The tenant is
/// reloaded from disk on its next request, which is usually at once.
pub const IO_RETRY_AFTER_S: u64 = 1;

/// Why a store operation failed. Callers tell `QuotaExceeded` (the client's doing, nothing
/// written) from the rest (the node's doing).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The write would take the tenant past its quota; nothing was written.
    #[error("quota exceeded: the write needs {needed_bytes} bytes, {free_bytes} of {quota_bytes} are free")]
    QuotaExceeded { needed_bytes: u64, free_bytes: u64, quota_bytes: u64 },
    /// The disk failed. A failed log write unloads the tenant; it is reloaded on next use.
    #[error("I/O error: {what} {path:?}: {source}")]
    Io { what: &'static str, path: PathBuf, source: Arc<io::Error> },
    /// A file on disk does not hold what the store wrote there.
    #[error("corrupt store file {path:?}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// The tenant id is not `[a-z0-9][a-z0-9-]{0,62}`. Callers validate; this is a backstop.
    #[error("invalid tenant id {0:?}")]
    InvalidTenant(String),
    /// The request could not have come from `proto::request::parse` (a bad coordinate, phext
    /// name or text that reached the node another way). Nothing was changed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The answer would be larger than the node builds ([`proto::ops::ANSWER_BYTES_MAX`]); it was
    /// sized, not built. Asking again cannot help: the client must ask for less.
    #[error("the answer would be {answer_bytes} bytes, over the limit of {limit_bytes}")]
    AnswerTooLarge { answer_bytes: u64, limit_bytes: u64 },
    /// The tenant kept being unloaded under the request; try again.
    #[error("tenant {0} is busy being unloaded")]
    Busy(String),
    /// A write made as the tenant's primary under `ballot`, after this replica promised a
    /// newer one (another node leads the tenant now). Nothing was written.
    #[error("this replica promised ballot {promised}, above the ballot {ballot} this node leads the tenant under")]
    NotLeading { ballot: u64, promised: u64 },
}

impl StoreError {
    pub(crate) fn io<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> StoreError + 'a {
        move |source| StoreError::Io { what, path: path.to_path_buf(), source: Arc::new(source) }
    }

    pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt { path: path.to_path_buf(), detail: detail.into() }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::QuotaExceeded { needed_bytes, free_bytes, quota_bytes } => {
                ApiError::QuotaExceeded { needed_bytes, free_bytes, quota_bytes }
            }
            StoreError::InvalidRequest(detail) => ApiError::BadRequest(detail),
            StoreError::AnswerTooLarge { answer_bytes, limit_bytes } => {
                ApiError::AnswerTooLarge { answer_bytes, limit_bytes }
            }
            // Paths stay in the node's log (the store logs every failure); clients get no paths.
            StoreError::Io { .. } | StoreError::Busy(_) => ApiError::Unavailable {
                reason: "storage unavailable".into(),
                retry_after_s: IO_RETRY_AFTER_S,
            },
            StoreError::NotLeading { .. } => {
                ApiError::Unavailable { reason: e.to_string(), retry_after_s: IO_RETRY_AFTER_S }
            }
            StoreError::Corrupt { .. } => ApiError::Internal("storage error".into()),
            StoreError::InvalidTenant(_) => ApiError::Internal("invalid tenant id".into()),
        }
    }
}
