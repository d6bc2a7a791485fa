"""rocoin: failure-resilient cooperative DNN inference over heterogeneous edge devices."""

__version__ = "0.1.0"
