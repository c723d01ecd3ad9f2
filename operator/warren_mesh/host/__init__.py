"""This host's own networking around the mesh, for its pods: the CNI network config, forwarding, masquerade."""
