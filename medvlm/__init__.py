"""medvlm: find what a medical phrase refers to in a medical image, as a box, points and a pixel mask.

Importing this package is cheap (no torch); heavy parts load when first used.
"""

from medvlm._compat import install_import_hook

__version__ = "0.1.0"

install_import_hook()
