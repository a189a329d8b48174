//! Why the migration thread stopped: a cancel, or a typed failure whose text becomes
//! `query-migrate`'s `error-desc`.

use std::io;

use precopy_pagecache::CacheError;
use precopy_stream::WriteError;

use super::pages::{ChannelCloseError, SendError};
use crate::guest::GuestError;

/// Why a migration failed; its text becomes `query-migrate`'s `error-desc`.
#[derive(Debug, thiserror::Error)]
pub(super) enum SourceError {
    /// Writing the stream (the transport dropped, ...).
    #[error("stream: {0}")]
    Stream(#[from] WriteError),
    /// The guest failed.
    #[error("guest: {0}")]
    Guest(#[from] GuestError),
    /// The guest has no RAM block.
    #[error("guest: no RAM blocks")]
    NoRamBlocks,
    /// The pass limit ([`Migrator::set_pass_limit`](crate::Migrator::set_pass_limit)).
    #[error("did not converge within {0} dirty-bitmap syncs")]
    NotConverged(u64),
    /// The XBZRLE cache could not be built (the cache's message names it).
    #[error(transparent)]
    Cache(CacheError),
    /// The page compressor could not be built (`multifd-*-level`, zstd context).
    #[error("page compression: {0}")]
    Compress(precopy_compress::CompressError),
    /// The XBZRLE cache could not be resized (the cache's message names it).
    #[error("resize: {0}")]
    CacheResize(#[source] CacheError),
    /// Closing the sink failed (e.g. an `exec:` command failed).
    #[error("closing the transport: {0}")]
    Close(#[source] io::Error),
    /// Writing a multifd page channel failed (the connection dropped, ...).
    #[error("multifd channel {channel}: stream: {source}")]
    Channel {
        /// Page channel, 1..=`multifd-channels`.
        channel: usize,
        /// The write error.
        #[source]
        source: WriteError,
    },
    /// Closing a multifd page channel failed.
    #[error(transparent)]
    ChannelClose(#[from] ChannelCloseError),
}

/// Why the loop stopped early.
pub(super) enum Stop {
    Cancelled,
    Failed(SourceError),
}

impl<E: Into<SourceError>> From<E> for Stop {
    fn from(e: E) -> Self {
        Stop::Failed(e.into())
    }
}

impl From<SendError> for SourceError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Guest(e) => SourceError::Guest(e),
            SendError::Stream(e) => SourceError::Stream(e),
            SendError::Channel { channel, source } => SourceError::Channel { channel, source },
        }
    }
}
