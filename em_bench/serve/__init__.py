"""An OpenAI-compatible chat-completions server over a local model, a script, or injected faults.

    em-bench serve                   # the organism at http://127.0.0.1:8000/v1

It puts a local model behind the API that real judge and generation providers speak, so the API
clients run end to end offline. The test suite uses the same server as its stand-in provider: a
ScriptedPolicy plays a judge with a known logprob distribution, and a FaultInjector produces rate
limits, server errors, slow and broken replies, and counts how many requests a client had in
flight at once (`em-bench serve --fault KIND=RATE` turns them on in front of a model).

protocol.py is the wire format (request checks, reply types, JSON bodies), policies.py what
answers (ModelPolicy, with LoRA adapters; ScriptedPolicy), faults.py the FaultInjector, and
server.py the HTTP server, its key, and `em-bench serve`. The names below are re-exported for
the package's users; its own modules import each other directly.
"""

from em_bench.serve.faults import FAULT_KINDS, FaultInjector
from em_bench.serve.policies import ModelPolicy, Script, ScriptedPolicy, context_length
from em_bench.serve.protocol import Fault, Reply, error_body, last_user_message, token_bytes
from em_bench.serve.server import KEY_ENV, main_serve, serve, start_serving

__all__ = [
    "FAULT_KINDS",
    "KEY_ENV",
    "Fault",
    "FaultInjector",
    "ModelPolicy",
    "Reply",
    "Script",
    "ScriptedPolicy",
    "context_length",
    "error_body",
    "last_user_message",
    "main_serve",
    "serve",
    "start_serving",
    "token_bytes",
]
