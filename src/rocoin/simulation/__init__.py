"""Failure simulation of a plan: Monte-Carlo (:func:`simulate`) and exact (:func:`analytic`)."""

from rocoin.simulation.analytic import AnalyticResult, analytic
from rocoin.simulation.montecarlo import SimulationResult, simulate

__all__ = ["AnalyticResult", "SimulationResult", "analytic", "simulate"]
