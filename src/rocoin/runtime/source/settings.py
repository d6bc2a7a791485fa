"""The source's deadline settings, in a module without grpc or onnxruntime so that the command
line and the process options (:mod:`rocoin.runtime.api.options`) can show them."""

#: Default time the source waits for the groups of one query.
DEFAULT_DEADLINE_S = 1.0
#: Deadlines accepted, per query or as the default: shorter than a millisecond no device can
#: answer (every group would be missing); longer than 5 minutes a lost device holds a caller
#: (and the query's memory) for longer than any edge application waits.
MIN_DEADLINE_S = 0.001
MAX_DEADLINE_S = 300.0
