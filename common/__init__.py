"""fedhead: code shared by server and sites (registry, model, config, features)."""

__version__ = "0.1.0"
