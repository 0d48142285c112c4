//! Simulated-node harness.
