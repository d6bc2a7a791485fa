"""Experiments and demos that run the real planner, simulator and (later) runtime."""
