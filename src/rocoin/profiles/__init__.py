"""Profiles without measuring: synthetic fleets like the paper's and analytic student catalogs."""

from rocoin.profiles.generate import analytic_catalog, default_catalog, generate_fleet

__all__ = ["analytic_catalog", "default_catalog", "generate_fleet"]
