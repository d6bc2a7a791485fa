"""A local cluster: one device worker process per device of a fleet, and a source process."""
