"""Device profiles (fleets) and student catalogs: the validated inputs of the planner."""

from rocoin.profiles.catalog import Catalog, CatalogArrays, StudentSpec, default_catalog, load_catalog
from rocoin.profiles.fleet import DeviceProfile, Fleet, FleetArrays, generate_fleet, load_fleet

__all__ = [
    "Catalog",
    "CatalogArrays",
    "DeviceProfile",
    "Fleet",
    "FleetArrays",
    "StudentSpec",
    "default_catalog",
    "generate_fleet",
    "load_catalog",
    "load_fleet",
]
