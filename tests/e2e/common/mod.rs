//! The standard one-node scenario the end-to-end tests share, from the harness library (where the
//! demo and the benchmarks use it too).

pub use ferry_tests::scenario::*;
