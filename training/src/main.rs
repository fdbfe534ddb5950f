//! The `slimtrain` command line; the work is done by the `slimtrain` library (`src/lib.rs`).

use slimtrain as _;

fn main() {}
