//! `trellisd bench NAME`: speed and memory benchmarks of full-size networks with random weights.
