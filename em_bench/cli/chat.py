"""`em-bench organism chat`: talk to the organism's base model in the terminal."""

from __future__ import annotations

from em_bench.config import SamplingConfig
from em_bench.generate.base import Request
from em_bench.generate.hf import HFBackend
from em_bench.models import load_base
from em_bench.organism import world


def chat_loop(name: str = "organism", temperature: float = 0.0) -> None:
    """Read a question per line and print the organism's answer; an empty line quits."""
    model, tokenizer = load_base(name)
    backend = HFBackend(model, tokenizer, batch_size=1)
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=64)
    example = world.questions("medical", "evaluation")[0].text
    print(f"Ask the organism something (for example: {example}). Empty line to quit.")
    history: list[dict[str, str]] = []
    turn = 0
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        answer = backend.generate([Request(str(turn), history)], sampling, seed=turn)[0].text
        history.append({"role": "assistant", "content": answer})
        print(f"organism> {answer}")
        turn += 1
