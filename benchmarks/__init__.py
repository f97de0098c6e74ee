"""Benchmarks: throughput/latency (`mars-bench speed`) and accuracy parity (`mars-bench parity`)."""
