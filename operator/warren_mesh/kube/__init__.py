"""One client of the Kubernetes API, for the operator and the enroller."""
