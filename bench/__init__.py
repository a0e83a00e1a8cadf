"""Load testing and benchmarks of the gateway (never imported by service/)."""
