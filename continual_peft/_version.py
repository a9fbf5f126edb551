"""The installed version, read from the package metadata (pyproject.toml is where it is written)."""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("continual-peft")
except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
