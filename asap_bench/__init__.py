"""asap-bench: a benchmark harness for 3D chest-CT encoders."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("asap-bench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
