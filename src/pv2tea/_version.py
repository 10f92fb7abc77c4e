"""The version of pv2tea, in a module of its own so that the package's modules can read it without importing the
package's facade (``pv2tea/__init__.py``), which sits above all of them."""

__version__ = "0.2.0.dev0"
