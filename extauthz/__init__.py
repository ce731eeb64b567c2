"""extauthz: an Envoy external-authorization gRPC service that validates bearer tokens."""

from .config import Config, ConfigError, load_config
from .decision import Decision, Reason
from .engine import CheckInput, Engine

__all__ = ["CheckInput", "Config", "ConfigError", "Decision", "Engine", "Reason", "load_config"]
__version__ = "0.1.0"
