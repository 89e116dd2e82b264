"""The drivers behind ``train.py``, ``eval.py`` and ``export.py``.

``cli`` runs a main with one-line errors; ``experiment`` validates a config; ``prepare`` joins
the processes and builds the mesh and data; ``train``, ``evaluate``, ``int8``, ``ptq`` and
``export`` are the jobs. Nothing in the libraries below (``quant``, ``nn``, ``models``,
``data``, ``hf``, ``train``, ``evaluate``, ``methods``) imports this package.
"""
