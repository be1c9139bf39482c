"""moedpo: Direct Preference Optimization for Mixture-of-Experts and dense language models."""

__version__ = "0.2.0"
