"""Adapters that put gradclip's monitor inside training frameworks.

Each module imports its framework itself (``lightning``, ``transformers``), so the core of
gradclip installs and runs without them: ``pip install "gradclip[lightning]"`` or
``"gradclip[hf]"`` for the ones you use.
"""
