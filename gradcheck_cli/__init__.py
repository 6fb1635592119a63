"""gradclip: does my model need gradient clipping, which setting, and where does it blow up?

Importing the package is cheap on purpose: torch is imported only by the modules that need it,
so that ``gradclip --help`` and ``gradclip --version`` answer instantly.
"""

__version__ = "0.1.0"
