"""The machine an agent runs on: its underlay (address, MTU, subnets), and its own networking around the mesh for
its pods (the CNI network config, forwarding, masquerade)."""
