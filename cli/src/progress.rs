//! The live progress display of `precopy migrate`: a bar on a terminal, one status line a
//! second otherwise.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use precopy_engine::{MigrationInfo, MigrationStatus, Migrator};

/// Show a live progress bar until the migration finishes; returns the final info.
///
/// On a terminal the bar is redrawn every 200 ms; when stderr is not a terminal (and not
/// `quiet`), the same status line is printed once a second, so a slow (rate-limited)
/// migration still shows that it is alive and how far it got.
pub(crate) fn follow(m: &Migrator, total: u64, quiet: bool) -> MigrationInfo {
    let tty = std::io::stderr().is_terminal();
    let lines = !quiet && !tty;
    let bar = if quiet || !tty {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    let started = std::time::Instant::now();
    let mut next_line = Duration::from_secs(1);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let st = m.wait_for_status(MigrationStatus::Completed, Duration::from_millis(200));
        let info = m.query();
        let msg = match &info.ram {
            Some(ram) => {
                bar.set_position(ram.total.saturating_sub(ram.remaining));
                format!(
                    "{} | pass {} | sent {} | remaining {} | {:.3} mbps | dirty {} pages/s | throttle {}%",
                    st,
                    ram.dirty_sync_count,
                    HumanBytes(ram.transferred),
                    HumanBytes(ram.remaining),
                    ram.mbps,
                    ram.dirty_pages_rate,
                    info.cpu_throttle_percentage.unwrap_or(0)
                )
            }
            // No RAM statistics yet: setup, or a destination that has not read
            // the first bytes. Still say so every second.
            None => {
                format!("{st} | no RAM statistics yet (the destination has not read the setup)")
            }
        };
        if lines && started.elapsed() >= next_line && !st.is_finished() {
            next_line += Duration::from_secs(1);
            eprintln!("[{:>4}s] {msg}", started.elapsed().as_secs());
        }
        bar.set_message(msg);
        bar.tick();
        if st.is_finished() {
            break;
        }
    }
    bar.finish_and_clear();
    m.wait().unwrap_or_else(|_| m.query())
}
