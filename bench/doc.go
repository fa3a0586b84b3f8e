// Package bench holds sbora-serve's benchmark programs and load generators.
// Each program prints its results as ratios against a baseline measured in
// the same run, because the machines are noisy; bench/README.md records
// the numbers.
//
//	bench/decode   single- and multi-stream decode tok/s vs llama.cpp
//	bench/loadgen  concurrent HTTP streams over many adapters (bench/loadtest
//	               drives them; sbora-serve check runs the same driver)
//
// Kernel-level benchmarks live next to the code: make bench.
package bench
