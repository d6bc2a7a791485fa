"""The source: broadcasts each query to the groups, gathers the first answer of each group until
the deadline, zero-fills the rest and runs the head."""
