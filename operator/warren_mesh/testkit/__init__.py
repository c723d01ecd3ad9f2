"""Infrastructure for tests, benchmarks and the lab: a real etcd server, simulated agents, the kernel VM."""
