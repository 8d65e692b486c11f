"""The ``cellseg-deploy`` command line: thin click commands over the library (see ``main.py``)."""
