"""The fluxkit version, importable without importing the library."""
__version__ = "0.3.0"
