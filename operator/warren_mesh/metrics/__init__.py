"""The agent's Prometheus metrics: its control-plane instruments, per-peer traffic read from the device, the
/metrics endpoint, and a reader of it for the commands that show the mesh."""
