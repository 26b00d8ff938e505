"""The ClientApp a hospital's SuperNode runs: a thin forwarder to the silo's warm worker (no torch here).

Flower 1.42 starts this app in a fresh ``flwr-clientapp`` process for every message. When the node
config names a ``worker-socket`` (``fedefm flower supernode`` starts the worker and sets it), the
message's records go to that worker (``worker``) and its reply comes back, so the process imports
only Flower and this module. Without one (a ``flower-supernode`` started by hand) the silo's work
(``silo``) runs here, importing torch and decoding the silo's images for every message, and what the
silo keeps between messages lives in the Context's state.

Every reply carries a "timing" MetricRecord, measured here and at the worker: "startup-s" (this
process's start to the message's handler: Python, Flower, and without a worker torch and fedefm),
"compute-s" (the silo's work, decoding included), "socket-s" (to the worker and back, less its
compute), "replied-at" (wall-clock time the reply left the handler).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedefm.errors import FedefmError
from fedefm.federated.flower import wire

app = ClientApp()


class WorkerFailed(FedefmError, RuntimeError):
    """The silo's worker answered a message with an error; the message is the worker's reason."""


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 where it cannot be read)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return 0.0
    started_ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, after the command name
    return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


def in_process(message: Message, context: Context) -> tuple[RecordDict, float]:
    """The silo's reply computed in this process (no worker); returns it and the seconds spent importing the work."""
    started = time.perf_counter()
    from fedefm.federated.flower import silo  # torch and fedefm: seconds, paid by every message without a worker

    imported = time.perf_counter() - started
    kind, node_config, run_config = message.metadata.message_type, context.node_config, context.run_config
    session = None
    if kind in silo.SESSION_MESSAGES:  # continue the generators and memory the last message of this run kept
        classes = list(message.content["run"]["classes"])
        session = silo.load_session(context.state, silo.open_session(node_config, run_config, classes))
    reply, session = silo.answer(kind, message.content, node_config, run_config, session)
    if kind in silo.SESSION_MESSAGES:
        silo.save_session(context.state, session)
    return reply, imported


def forward(message: Message, context: Context) -> Message:
    """Answer ``message`` through the silo's worker (or in this process without one), with the "timing" record.

    Raises:
        WorkerFailed: the worker answered with an error (Flower sends its reason to the relay).
        WireError: the node config names a worker that cannot be reached.
    """
    startup = process_age_s()
    started = time.perf_counter()
    path = context.node_config.get("worker-socket")
    if path:
        meta = {"op": "message", "run-id": context.run_id, "message-type": message.metadata.message_type,
                "run-config": dict(context.run_config)}
        answer, content = wire.call(Path(str(path)), meta, message.content,
                                    timeout=float(context.run_config.get("reply-timeout", 600)))
        if "error" in answer:
            raise WorkerFailed(f"silo worker: {answer['error']}")
        compute = float(answer["compute-s"])
        socket_s = time.perf_counter() - started - compute
    else:
        content, imported = in_process(message, context)
        startup += imported
        compute, socket_s = time.perf_counter() - started - imported, 0.0
    content["timing"] = MetricRecord({"startup-s": startup, "compute-s": compute, "socket-s": socket_s,
                                      "replied-at": time.time()})
    return Message(content, reply_to=message)


@app.query()
def describe(message: Message, context: Context) -> Message:
    """Reply with the silo id and its number of training images."""
    return forward(message, context)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Run this wave's tasks in order: host overseas experts, then (if listed) the home update."""
    return forward(message, context)


@app.train("mix")
def mix(message: Message, context: Context) -> Message:
    """Mix the silo's updated model with its neighbours' by its row of W."""
    return forward(message, context)


@app.query("session")
def session(message: Message, context: Context) -> Message:
    """Reply with what the silo keeps between messages (generators, the algorithm's memory), for a checkpoint."""
    return forward(message, context)


@app.train("restore")
def restore(message: Message, context: Context) -> Message:
    """Set what the silo keeps between messages from a checkpoint (a resumed run)."""
    return forward(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the global model (and the silo's own) on the silo's held-out validation or test images."""
    return forward(message, context)
