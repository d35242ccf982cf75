"""deeplense: classify strong-lensing images by dark-matter substructure (no / sphere / vort)."""

__version__ = "0.1.0"

from .data import CLASSES  # noqa: E402

__all__ = ["CLASSES", "__version__"]
