//! The pre-copy migration engine (work in progress: see issue 5).
