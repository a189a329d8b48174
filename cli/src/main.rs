//! `precopy`: the command line.
fn main() {
    eprintln!("precopy: no subcommands yet");
    std::process::exit(2);
}
