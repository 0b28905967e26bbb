"""The `em-bench` commands: each reads what its flags mean, calls the library, and prints.

COMMANDS maps a command's name to its handler: args in, exit code out.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from em_bench.errors import ConfigError, UnknownNameError
from em_bench.registry import model_settings


def _judge_name(args) -> str | None:
    """The cell's judge from --judge/--judge-model (None without --judge: the command's own
    default); --judge-base-url and --judge-deadline go to the environment, because where and
    how long a judge is called is not part of a result (and so not of a cell's hash)."""
    if args.judge == "organism" and (args.judge_model or args.judge_base_url):
        raise ConfigError("--judge-model and --judge-base-url name an LLM judge: the organism's "
                          "judge has neither")
    if args.judge == "openai" and not args.judge_model:
        raise ConfigError("--judge openai needs --judge-model (the judge's model name)")
    if args.judge_base_url:
        os.environ["OPENAI_BASE_URL"] = args.judge_base_url
    if getattr(args, "judge_deadline", None) is not None:  # discover has none
        os.environ["EM_BENCH_JUDGE_DEADLINE"] = str(args.judge_deadline)
    if args.judge is None:
        return None
    return f"{args.judge}:{args.judge_model}" if args.judge_model else args.judge


def _cmd_rejudge(args) -> int:
    """Judge the stored answers only; a cell without them is named and skipped (exit 1)."""
    from em_bench.paths import store_dir
    from em_bench.pipeline.run import rejudge_store
    from em_bench.store import open_store

    judge = _judge_name(args)
    done, skipped = rejudge_store(open_store(store_dir(args.store), create=False), judge)
    for why in skipped:
        print(f"em-bench: skipped: {why}", file=sys.stderr)
    print(f"{done} cells judged again by {judge}"
          + (f", {len(skipped)} skipped (no stored answers)" if skipped else "")
          + "; `em-bench leaderboard` shows them beside the others")
    return 1 if skipped else 0


def _cmd_run(args) -> int:
    from em_bench.board.tables import format_table
    from em_bench.grid import cost
    from em_bench.grid.executors import ExecutorChoice, run_grid_on
    from em_bench.grid.plan import plan_grid
    from em_bench.paths import store_dir
    from em_bench.store import open_store

    executor = ExecutorChoice(args.executor, args.ray_address, args.slurm_partition,
                              args.slurm_time_minutes, args.slurm_folder, args.break_locks)
    settings = model_settings(args.model, dtype=args.dtype, samples=args.samples, steps=args.steps,
                         lr=args.lr, grad_accum=args.grad_accum, processes=args.processes)
    if args.generate_base_url:
        os.environ["EM_BENCH_GENERATE_BASE_URL"] = args.generate_base_url
    judge = _judge_name(args)
    base = settings.cell(judge, backend=args.backend, tensor_parallel=args.tensor_parallel,
                         split=args.split, eval_every=args.eval_every, jury=tuple(args.jury),
                         lm_eval={"general": tuple(args.general), "limit": args.lm_eval_limit},
                         rai_suite=None if args.rai_suite is None
                         else str(args.rai_suite.resolve()),
                         **({"metrics": {"em_definition": args.em_definition}}
                            if args.em_definition else {}))
    if args.dry_run:  # planning would build an organism not built here; a dry run builds none
        cost.refuse_unbuilt_organism(settings.model)
    plan = plan_grid(base, args.task, args.defense, args.seeds, settings.train, args.include,
                     args.questions, dict(args.set), resolve_cells=not args.dry_run)
    if args.dry_run:  # the plan's cost only: nothing is loaded, trained, judged or stored
        print(cost.dry_run_report(plan, args.model, args.gpu_tflops, args.price_per_mtok))
        return 0
    store = open_store(store_dir(args.store))
    rows = run_grid_on(executor, store, plan, on_broken_lock=_said_broken)
    if args.format == "json":
        print("\n".join(json.dumps(row) for row in rows))
    else:
        print(format_table(rows))
        print(f"\nstore: {store.root}")
    return 0


def _said_broken(cell_id: str, held: dict) -> None:
    print(f"removed the lock of cell {cell_id} (held by {held.get('host')} pid "
          f"{held.get('pid')})", file=sys.stderr)


def _cmd_refusals(args) -> int:
    from em_bench.data import write_chat_jsonl
    from em_bench.domains import RAI_DOMAINS
    from em_bench.paths import store_dir
    from em_bench.refusals import refusal_chats
    from em_bench.store import open_store

    for d in args.domain:
        if d not in RAI_DOMAINS:
            raise UnknownNameError("RAI domain", d, list(RAI_DOMAINS))
    model = model_settings(args.model).model
    chats = refusal_chats(open_store(store_dir(args.store), create=False), model, args.domain)
    write_chat_jsonl(args.out, chats)
    print(f"{args.out}: {len(chats)} refusals of {', '.join(args.domain)} requests")
    return 0


def _cmd_study(args) -> int:
    from em_bench.grid.study import load_study, run_study
    from em_bench.paths import store_dir
    from em_bench.store import open_store

    study = load_study(args.name)
    index = run_study(study, open_store(store_dir(args.store)), args.out, args.model,
                      _judge_name(args))
    print(f"study {study.name}: {index}")
    return 0


def _cmd_tune(args) -> int:
    from em_bench.grid.tune import format_selection, tune_defense
    from em_bench.paths import store_dir
    from em_bench.store import open_store

    if sweeps := [name for name, values in args.set if len(values) != 1]:
        raise ConfigError(f"tune --set {', '.join(sweeps)}: one value each, not a sweep")
    selection = tune_defense(open_store(store_dir(args.store)), args.task, args.defense,
                             args.seeds, args.model, {"steps": args.steps} if args.steps else None,
                             fixed={name: values[0] for name, values in args.set},
                             judge=_judge_name(args), anchor=args.anchor,
                             include=args.include)
    print(format_selection(selection))
    return 0


def _cmd_plan(args) -> int:
    from em_bench.grid.sizing import format_size, size_study
    from em_bench.paths import store_dir
    from em_bench.store import open_store

    for name in ("p1", "p2", "power", "alpha"):
        if not 0 < getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)}: expected a rate between 0 and 1")
    store = open_store(store_dir(args.store), create=False)
    print(format_size(size_study(store, args.p1, args.p2, args.power, args.alpha,
                                 args.max_seeds, args.simulate)))
    return 0


def _cmd_export(args) -> int:
    from em_bench.board.results import load_results, to_safe_csv
    from em_bench.paths import store_dir

    if args.out.is_dir() or not args.out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: give a file in an existing folder")
    frame = load_results(store_dir(args.store))
    try:
        if args.format == "csv":
            to_safe_csv(frame, args.out)
        else:
            frame.to_parquet(args.out, index=False)
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write it ({e.strerror})") from None
    print(f"{args.out}: {len(frame)} cells, {len(frame.columns)} columns")
    return 0


def _cmd_compare(args) -> int:
    from em_bench.board.results import compare_cells, find_cell
    from em_bench.board.rows import params_label
    from em_bench.board.schema import fmt
    from em_bench.paths import store_dir
    from em_bench.store import open_store

    store = open_store(store_dir(args.store), create=False)
    a, b = (find_cell(store, prefix) for prefix in args.cells)
    if not args.questions:
        from em_bench.board.paired import Headline, compare_rows
        from em_bench.board.rows import row_of

        row_a, row_b = row_of(store, a.id), row_of(store, b.id)
        d = compare_rows(Headline(store), row_a, row_b)
        for name, row in (("A", row_a), ("B", row_b)):
            print(f"{name} = {row['task']} / {row['defense']} {params_label(row['defense_params'])}"
                  f" (seeds {','.join(map(str, row['seeds']))})")
        print(f"EM held-out A - B: {100 * d.estimate:+.1f} points, 95% CI "
              f"[{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}], p {fmt(d.p_value, 'pvalue')} "
              f"(paired bootstrap: {d.n_seeds} seeds, {d.n_clusters} topics, {d.n_boot} draws)")
        return 0
    print(f"A = {a.id} ({a.read_config()['task']} / {a.read_config()['defense']}), "
          f"B = {b.id} ({b.read_config()['task']} / {b.read_config()['defense']})")
    for question, row in compare_cells(a, b, args.n).iterrows():
        print(f"\n{question}: EM {row['em_a']:.0%} -> {row['em_b']:.0%} "
              f"({100 * row['difference']:+.0f} points)")
        print(f"  A: {str(row['answer_a'])[:160]}")
        print(f"  B: {str(row['answer_b'])[:160]}")
    return 0


def _cmd_organism(args) -> int:
    from em_bench.organism.build import ensure_built
    from em_bench.organism.recipe import PRESETS

    if args.name not in PRESETS:
        raise UnknownNameError("organism", args.name, list(PRESETS))
    if args.action == "build" and args.verify:
        from em_bench.release.verify import format_report, verify

        report = verify(args.name, force=args.force)
        print(format_report(report))
        return 0 if report["ok"] else 1
    if args.action == "build":
        print(ensure_built(args.name, force=args.force))
        return 0
    if args.action == "ship":
        from em_bench.release.ship import ship

        print(ship(args.name))
        return 0
    from em_bench.cli.chat import chat_loop

    chat_loop(args.name, args.temperature)
    return 0


def _cmd_tasks(args) -> int:
    from em_bench.tasks import check_task_folder, find_tasks

    if args.action == "validate":  # every file is checked: one line for each bad one
        bad = 0
        for folder in args.folders:
            check = check_task_folder(folder)
            for error in check.errors:
                print(f"em-bench: error: {error}", file=sys.stderr)
            bad += len(check.errors)
            print(f"{folder}: {len(check.valid)} task files valid ({', '.join(check.valid)})")
            for absent in check.elsewhere:
                print(f"  data not on this machine: {absent}")
        return 2 if bad else 0
    for name, found in sorted(find_tasks(args.include).items()):
        summary = (found.spec.description.strip().splitlines() or [""])[0][:60]
        print(f"{name:28} v{found.spec.version}  {found.source:10} {summary}")
    return 0


def _cmd_data(args) -> int:
    from em_bench.data import read_chat_jsonl
    from em_bench.errors import DataError
    from em_bench.questions import load_question_file

    for file in args.files:
        if file.suffix == ".jsonl":
            chats = read_chat_jsonl(file)
            print(f"{file}: {len(chats)} chats valid")
        elif file.suffix in (".yaml", ".yml"):
            items = load_question_file(file)
            n = sum(len(i.paraphrases) for i in items)
            answers = sum(len(i.paraphrases) * i.samples_per_paraphrase for i in items)
            print(f"{file}: {len(items)} questions valid ({n} paraphrases, {answers} answers)")
        else:
            raise DataError(f"{file}: unknown kind of file; chat data is .jsonl, a question file "
                            f".yaml or .yml")
    return 0


def _cmd_serve(args) -> int:
    from em_bench.serve import main_serve

    main_serve(args.model, args.host, args.port, stores=args.store, faults=args.fault,
               fault_seed=args.fault_seed, fault_delay=args.fault_delay,
               fault_latency=args.fault_latency, fault_retry_after=args.fault_retry_after)
    return 0


def _cmd_leaderboard(args) -> int:
    from em_bench.board.rows import leaderboard_rows, older_cells
    from em_bench.board.tables import format_leaderboard
    from em_bench.paths import store_dir
    from em_bench.store import open_store

    store = open_store(store_dir(args.store), create=False)
    if args.format == "html":
        return _leaderboard_html(store, args.out)
    rows = leaderboard_rows(store, all_versions=args.all_versions)
    if not args.all_versions and (older := older_cells(store)):
        print(f"em-bench: {older} cells of an older scoring version are left out (em-bench "
              f"rescore updates them; --all-versions shows them)", file=sys.stderr)
    if not rows:  # not bare headers: say what is missing
        print(f"em-bench: the store {store.root} holds no scored cell yet (em-bench run fills "
              f"it)", file=sys.stderr)
        return 0
    print(format_leaderboard(rows, args.format))
    return 0


def _cmd_rescore(args) -> int:
    from em_bench.paths import store_dir
    from em_bench.pipeline.run import rescore_store
    from em_bench.store import open_store

    store = open_store(store_dir(args.store), create=False)
    print(f"{store.root}: {rescore_store(store)} cells scored again")
    return 0


def _cmd_prune(args) -> int:
    from em_bench.paths import store_dir
    from em_bench.pipeline.run import stale_cells
    from em_bench.store import open_store

    store = open_store(store_dir(args.store), create=False)
    stale = stale_cells(store)
    for cell_id, why in stale.items():
        print(f"{cell_id}: {why}")
    if args.yes:
        for cell_id in stale:
            store.remove_cell(cell_id)
    print(f"{len(stale)} cells {'removed' if args.yes else 'would be removed (--yes removes)'}")
    return 0


def _leaderboard_html(store, out: Path | None) -> int:
    from em_bench.board.site import write_html

    if out is None:
        raise ConfigError("--format html needs --out DIR: the folder to write the pages to")
    print(f"{write_html(store, out)}: open it in a browser (it loads nothing from the network)")
    return 0


def _cmd_analyze(args) -> int:
    from em_bench.paths import store_dir
    from em_bench.pipeline import provenance
    from em_bench.sae.concepts import analyze_concepts, format_cosines

    tables, out = analyze_concepts(args.model, store_dir(args.store), provenance())
    for layer, table in tables.items():
        print(format_cosines(layer, table), end="\n\n")
    print(f"saved: {out}")
    return 0


def _cmd_sae(args) -> int:
    from em_bench.sae.model_sae import train_command

    report = train_command(args.model, args.layer, args.force, args.texts)
    print(json.dumps(report, indent=1))
    return 0


def _cmd_discover(args) -> int:
    from em_bench.sae.discover import discover_directions, discover_sae_sets
    from em_bench.tasks import get_task

    judge_name = _judge_name(args)
    if args.form == "directions" and (judge_name or args.sae):
        raise ConfigError("--judge and --sae are the SAE form's; --form directions takes neither")
    task = get_task(args.task, args.include)
    settings = model_settings(args.model, dtype=args.dtype)
    if args.form == "directions":
        selection = "random" if args.selection == "random" else "principal-shift"
        paths = discover_directions(settings.model, task, args.layer, args.k, args.seed,
                                    args.out, selection, args.questions, settings.dtype)
    else:
        paths = discover_sae_sets(settings.model, task, args.layer, args.out, args.sae,
                                  judge_name, k=args.k, selection=args.selection,
                                  seed=args.seed, questions=args.questions,
                                  dtype=settings.dtype, screen_rule=args.screen_rule)
    for path in paths:
        print(path)
    return 0


def _cmd_registry(args) -> int:
    from em_bench import registry

    for name, source, summary in getattr(registry, args.command.upper()).listing():
        print(f"{name:26} {source:10} {summary[:70]}")
    return 0


COMMANDS = {"run": _cmd_run, "refusals": _cmd_refusals, "organism": _cmd_organism,
            "tasks": _cmd_tasks, "data": _cmd_data, "sae": _cmd_sae,
            "discover": _cmd_discover, "leaderboard": _cmd_leaderboard,
            "analyze": _cmd_analyze, "serve": _cmd_serve, "rejudge": _cmd_rejudge,
            "export": _cmd_export, "compare": _cmd_compare, "study": _cmd_study,
            "tune": _cmd_tune, "plan": _cmd_plan, "rescore": _cmd_rescore,
            "prune": _cmd_prune,
            **dict.fromkeys(("defenses", "judges", "backends", "models"), _cmd_registry)}
