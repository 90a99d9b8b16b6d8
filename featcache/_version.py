"""featcache's version, in a module of its own: the modules below the package read it from here, never from the
package's ``__init__`` (no module imports the package it lives in)."""

__version__ = "0.1.0"
