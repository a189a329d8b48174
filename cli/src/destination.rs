//! Where `precopy migrate` sends the guest and how it gets the result back to verify it:
//! an in-process destination on loopback TCP (the default), or the file of `--to file:PATH`
//! loaded back. Any other `--to` URI is verified by the process at the other end.

use std::thread::JoinHandle;

use precopy_engine::{Destination, GuestRam, IncomingError, IncomingListener, Received};
use precopy_stream::{Limits, RamTarget};

/// The receiving thread of an in-process destination, loading into a `T`.
pub(crate) type DestinationThread<T> = JoinHandle<Result<Received<T>, IncomingError>>;

/// Where to migrate to: the URI, and the thread of the in-process destination when the
/// user gave no `--to`; the destination RAM (a `T`) is received into by that thread, or
/// kept for loading a `--to file:PATH` back.
pub(crate) struct Target<T> {
    /// The URI the migration is started on.
    pub(crate) uri: String,
    /// The in-process destination, if any.
    pub(crate) local: Option<DestinationThread<T>>,
    /// The RAM to load a `--to file:PATH` stream into (unused for other URIs).
    ram: Option<T>,
}

impl<T: RamTarget + Send + 'static> Target<T> {
    /// `--to URI` as given, or an in-process destination listening on a loopback TCP port
    /// and receiving into `ram` in a thread of its own. Errors: the listener or the thread
    /// could not be started.
    pub(crate) fn start(to: Option<&str>, ram: T) -> Result<Target<T>, String> {
        if let Some(uri) = to {
            return Ok(Target {
                uri: uri.to_owned(),
                local: None,
                ram: Some(ram),
            });
        }
        let l = IncomingListener::bind("tcp:127.0.0.1:0").map_err(|e| e.to_string())?;
        let uri = l.local_uri();
        let d = Destination::new();
        let t = std::thread::Builder::new()
            .name("destination".into())
            .spawn(move || d.accept_and_receive_into(l, Limits::default(), ram))
            .map_err(|e| format!("cannot start the destination: {e}"))?;
        Ok(Target {
            uri,
            local: Some(t),
            ram: None,
        })
    }

    /// What the destination received, once the migration has finished: the in-process
    /// destination's result, or the `--to file:PATH` file loaded back (only when
    /// `completed`); `None` when this process cannot know (any other URI, or a file of a
    /// migration that did not complete). `Some(Err)` carries the message to print.
    pub(crate) fn received(self, completed: bool) -> Option<Result<Received<T>, String>> {
        if let Some(t) = self.local {
            return Some(match t.join() {
                Ok(r) => r.map_err(|e| format!("destination: {e}")),
                Err(_) => Err("destination: the receiving thread panicked".into()),
            });
        }
        let path = self.uri.strip_prefix("file:")?;
        let ram = self.ram.filter(|_| completed)?;
        let loaded = match std::fs::File::open(path) {
            Ok(f) => Destination::new()
                .receive_into(std::io::BufReader::new(f), Limits::default(), ram)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        Some(loaded.map_err(|e| format!("verify {path}: {e}")))
    }
}

/// Destination RAM equals the (stopped) source's RAM, page by page, block by block (names
/// and lengths too).
pub(crate) fn same_ram<T: RamTarget>(guest: &dyn GuestRam, r: &Received<T>) -> bool {
    let blocks = guest.blocks();
    if blocks.len() != r.image.block_count() {
        return false;
    }
    let mut page = [0u8; xbzrle::PAGE_SIZE];
    for (i, b) in blocks.iter().enumerate() {
        if r.image.block_info(i) != Some((b.name.as_str(), b.used_length)) {
            return false;
        }
        let parts = r.image.block_parts(i);
        let pages = parts.iter().flat_map(|d| d.chunks_exact(xbzrle::PAGE_SIZE));
        for (p, chunk) in pages.enumerate() {
            if guest.read_page(i, p as u64, &mut page).is_err() || page[..] != chunk[..] {
                return false;
            }
        }
    }
    true
}
