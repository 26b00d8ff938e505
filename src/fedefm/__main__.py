"""``python -m fedefm``: the same command line as ``fedefm``."""

from fedefm.cli import app

app(prog_name="fedefm")
