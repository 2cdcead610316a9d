"""Model loading and architecture adapters (the only place that knows module paths)."""

from quantlab.models.adapter import ADAPTERS, Adapter, Component
from quantlab.models.load import ALIASES, LoadedModel, get_adapter, load_config, load_model

__all__ = ["ADAPTERS", "ALIASES", "Adapter", "Component", "LoadedModel", "get_adapter", "load_config", "load_model"]
