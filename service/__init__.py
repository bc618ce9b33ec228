"""purchase-intent's online half: an HTTP service that scores users with the exported ONNX model.

Importing the package does nothing: no settings are read and no app is built until
``python -m service`` (or a test) calls :func:`service.app.create_app`.
"""

from __future__ import annotations
