"""Plain single-device model definitions; `parallel/` makes them distributed."""

from models.build import build_model, param_counts
from models.config import ModelConfig
from models.flops import flops_per_token

__all__ = ["ModelConfig", "build_model", "flops_per_token", "param_counts"]
