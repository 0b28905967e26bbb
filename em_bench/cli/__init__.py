"""The `em-bench` command: parse, build a config, call one library function, print.

    em-bench run                                  # the demo: base vs the finance fine-tune
    em-bench run --task finance,medical --seeds 0,1,2 --format json
    em-bench run --questions my_questions.yaml  # an EM-format question file as the ood suite
    em-bench organism build | chat
    em-bench run --task finance --defense none,blockem --set lambda=0.1,1 --seeds 0,1,2
    em-bench leaderboard --format markdown        # every defense against its `none` row
    em-bench serve                                # the organism behind an OpenAI-style API
    em-bench run --judge openai --judge-model M --judge-base-url URL   # an LLM judge
    em-bench tasks [validate DIR]
    em-bench data check FILE                      # a chat JSONL or question file; runs nothing

The flags are flags.py's, the handlers commands.py's; main() dispatches and makes an error one
line and an exit code (2; 1 when judging failed, 130 when interrupted).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from pydantic import ValidationError

from em_bench.cli.commands import COMMANDS
from em_bench.cli.flags import parser
from em_bench.cli.options import refuse_nonsense
from em_bench.errors import EmBenchError, JudgingFailed, validation_problems

logger = logging.getLogger("em_bench")


def _setup(args) -> None:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)  # a line per cell at least
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft calls a transformers method that transformers 5 deprecates; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    from transformers.utils import logging as hf_logging

    from em_bench import threads

    hf_logging.disable_progress_bar()  # one bar per weight file is noise at our sizes
    threads.choose(args.threads)


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.split("\n")[0]).parse_args(argv)
    try:
        refuse_nonsense(args)
        _setup(args)
        return COMMANDS[args.command](args)
    except JudgingFailed as e:  # the other cells finished and are stored
        for line in e.lines():
            print(f"em-bench: {line}", file=sys.stderr)
        return 1
    except EmBenchError as e:
        print(f"em-bench: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:  # options that make no valid config, together
        print(f"em-bench: error: {e.title}: {validation_problems(e, 'options')}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("em-bench: interrupted; finished work is stored and a rerun resumes", file=sys.stderr)
        return 130
