"""rdbt: a command-line power tool for the Anima family of text-to-image models."""

__version__ = "0.1.0"
