"""cluster-engine: a self-hostable implementation of the Cluster Engine Images API."""
