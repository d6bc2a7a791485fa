"""The runtime: device workers and the source. Imports neither torch nor training code."""
