"""grayagent: gray-release rules from a config store, rendered into nginx and Envoy."""

__version__ = "0.1.0"
