"""The admin tools: what a person runs against a mesh's store (status, showconf, graph, external peers) and what
an administrator does to it once (migrate its keys)."""
