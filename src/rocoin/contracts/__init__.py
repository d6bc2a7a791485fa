"""The data contracts every other package shares, at the bottom of the import graph.

Fleets, student catalogs, plans, bundle manifests, the latency model ``t(d, s, k)``, the error
types, the validated file I/O, progress reporting and one-line text. Modules here import only the
standard library, numpy, pydantic, PyYAML and each other: a device, a planner and a trainer can
all read them, and nothing here pulls in an algorithm, torch, grpc or onnxruntime.
"""
