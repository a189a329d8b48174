//! `limits` bench binary (filled in by its issue).
fn main() {}
