"""The source's client API: the Open Inference Protocol (KServe v2) over REST and gRPC, and the
one client rocoin ships (load generation for the demo and the benchmarks)."""
