"""The ServerApp: the relay of ``relay.py`` behind Flower's ``@app.main()``."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedefm.federated.flower import relay

app = ServerApp()
log = logging.getLogger(__name__)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the pre-training the run config describes; the run folder lands in its ``out`` on this machine."""
    logging.getLogger("fedefm").setLevel(logging.INFO)
    summary = relay.run(grid, context.run_config)
    log.info("fedefm run finished: %s", summary)
