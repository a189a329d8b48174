//! The XBZRLE page cache (work in progress: see issue 3).
