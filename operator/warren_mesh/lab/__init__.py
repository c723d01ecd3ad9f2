"""The user-facing lab: a multi-node mesh in network namespaces on this machine (`warren-mesh lab`), and the demo."""
