"""Peers: the service next to other servers of the same model and body (``make bench-peers``).

``bentoml_service.py`` runs in its own venv (``bench/.venv-peers``, BentoML and its dependencies);
``python -m bench.peers`` runs in the project's venv and starts both servers. See bench/README.md.
"""
