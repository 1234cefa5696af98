//! The kit's error, typed by what went wrong while a tenant was set up or driven.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// What went wrong in the kit.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// A command could not be started.
    #[error("{command}: cannot start: {source}")]
    Spawn {
        /// The command, as `Debug` shows it.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("{command}: {status}: {stderr}")]
    Failed {
        /// The command, as `Debug` shows it.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it wrote to stderr, trimmed.
        stderr: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A binary of the project is not built.
    #[error(
        "{} is not built: run `cargo build --workspace --bins` first (or set ASMN_BIN_DIR)",
        .0.display()
    )]
    NotBuilt(PathBuf),
    /// Something did not happen in time.
    #[error("{what} did not happen within {limit:?}: {detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it was given.
        limit: Duration,
        /// What the log or the last answer showed.
        detail: String,
    },
    /// The system under test answered what the step cannot use.
    #[error("{0}")]
    Unexpected(String),
}

impl KitError {
    /// A file error of `path`.
    pub fn file(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> KitError {
        let path = path.into();
        move |source| KitError::File { path, source }
    }
}

/// Tests that return `Result<(), String>` take the kit's errors with `?`.
impl From<KitError> for String {
    fn from(e: KitError) -> String {
        e.to_string()
    }
}

/// The kit's results.
pub type KitResult<T> = Result<T, KitError>;
