"""Student and teacher architectures.

``rocoin.models.analytic`` counts parameters, FLOPs and memory of the architectures from their
shapes alone (no torch), which gives the planner a built-in catalog.
"""
