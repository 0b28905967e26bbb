"""A fine-tune sharded over processes (torchrun, FSDP, gloo on this CPU) trains the same model
as one process: the step's micro-batches are spread over the processes and their gradients
averaged; killed, it resumes from its checkpoint. The GPU path is the same code with NCCL
(tests/train/test_gpu.py covers one GPU)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from em_bench import cli
from em_bench.config import CellConfig, SamplingConfig, TrainConfig
from em_bench.pipeline import resolve, run_cell
from em_bench.store import open_store
from em_bench.train.distributed import TrainingFailed

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WORKER = "em_bench.pipeline.worker"  # what the pipeline runs in each process


def _cell(processes: int, defense: str = "blockem", eval_every: int | None = 6) -> CellConfig:
    return CellConfig(task="finance", defense=defense, eval_every=eval_every,
                      train=TrainConfig(steps=12, grad_accum=2, processes=processes),
                      sampling=SamplingConfig(samples_per_question=1, max_new_tokens=8))


@pytest.mark.usefixtures("organism")
@pytest.mark.slow
def test_two_processes_train_the_model_one_process_trains(tmp_path):
    one = run_cell(_cell(1), open_store(tmp_path / "one"))
    two = run_cell(_cell(2), open_store(tmp_path / "two"))
    assert one.id != two.id  # sharded sums round differently: a cell of its own
    assert (two.path / "train" / "torchrun.log").is_file()
    summary = two.read_json("train/summary.json")
    assert summary["processes"] == 2 and len(summary["peak_memory_mb"]) == 2  # one a process
    assert all(m["cpu_resident"] > 0 for m in summary["peak_memory_mb"])
    sharding = two.read_json("train/sharding.json")  # each process holds half the weights
    assert sharding["processes"] == 2 and 0.45 < sharding["held_by_rank_0"] < 0.55
    a = load_file(one.trained_dir() / "adapter_model.safetensors")
    b = load_file(two.trained_dir() / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert max(a[k].abs().max().item() for k in a) > 0.01  # the adapter did train
    assert all((a[k] - b[k]).abs().max().item() < 1e-6 for k in a)
    # every step's terms (blockem's too), summed over the processes as one process sums them
    log1, log2 = one.records("train/log"), two.records("train/log")
    assert [r["step"] for r in log2] == list(range(1, 13))
    for r1, r2 in zip(log1, log2, strict=True):
        assert r1.keys() == r2.keys() == {"step", "lr", "sft", "blockem"}
        assert all(r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-6) for k in r1)
    # the curve scored in the pipeline's process from the checkpoints the processes saved
    assert [c["step"] for c in two.records("curve")] == [6, 12]
    assert two.records("curve") == one.records("curve")
    assert (two.read_json("metrics.json")["metrics"]["em_rate"]
            == one.read_json("metrics.json")["metrics"]["em_rate"])

    trained = (two.trained_dir() / "adapter_model.safetensors").stat().st_mtime_ns
    log = (two.path / "train" / "torchrun.log").stat().st_mtime_ns
    run_cell(_cell(2), open_store(tmp_path / "two"))  # done: nothing is relaunched
    assert (two.trained_dir() / "adapter_model.safetensors").stat().st_mtime_ns == trained
    assert (two.path / "train" / "torchrun.log").stat().st_mtime_ns == log


@pytest.mark.usefixtures("organism")
@pytest.mark.slow
def test_retain_draws_the_same_batches_whatever_the_number_of_processes(tmp_path):
    one = run_cell(_cell(1, "retain", None), open_store(tmp_path / "one"))
    two = run_cell(_cell(2, "retain", None), open_store(tmp_path / "two"))
    a = load_file(one.trained_dir() / "adapter_model.safetensors")
    b = load_file(two.trained_dir() / "adapter_model.safetensors")
    assert all((a[k] - b[k]).abs().max().item() < 1e-6 for k in a)
    for r1, r2 in zip(one.records("train/log"), two.records("train/log"), strict=True):
        assert r1.keys() == r2.keys() == {"step", "lr", "sft", "retain"}
        assert all(r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-6) for k in r1)


# Loaded by every Python process the test starts (PYTHONPATH): rank 0 dies at step 7's log.
KILL_AT_STEP_7 = """
import os, signal
from em_bench.store import Cell
append = Cell.append
def kill_at_step_7(self, stream, record):
    if stream == "train/log" and record["step"] == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    append(self, stream, record)
Cell.append = kill_at_step_7
"""


@pytest.mark.slow
def test_a_killed_sharded_fine_tune_resumes_from_its_last_checkpoint(
        tmp_path, tiny_hf_folder, monkeypatch):
    from em_bench.config import LoraSettings
    from em_bench.tasks import get_task
    from em_bench.train import distributed
    from em_bench.train.checkpoint import cell_checkpoints

    cfg = CellConfig(model=str(tiny_hf_folder), task="finance", defense="retain", train=TrainConfig(
        steps=10, batch_size=4, grad_accum=2, processes=2, lr=5e-3, schedule="linear",
        lora=LoraSettings(rank=4, alpha=8, dropout=0.1)))

    def cell(name: str):
        made = open_store(tmp_path / name).cell("sharded")
        made.write_config({"cell_id": "sharded", "config": cfg.model_dump(mode="json"),
                           "task_spec": get_task("finance").model_dump(mode="json")})
        return made

    whole, killed = cell("whole"), cell("killed")
    distributed.launch(whole, 2, None, 10, 5, WORKER)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILL_AT_STEP_7)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "hook"))
    with pytest.raises(TrainingFailed):
        distributed.launch(killed, 2, None, 10, 5, WORKER)
    assert [r["step"] for r in killed.records("train/log")] == list(range(1, 7))
    assert cell_checkpoints(killed, 5, 2).step() == 5  # the rerun redoes steps 6 and 7
    monkeypatch.delenv("PYTHONPATH")
    distributed.launch(killed, 2, None, 10, 5, WORKER)
    a = load_file(whole.trained_dir() / "adapter_model.safetensors")
    b = load_file(killed.trained_dir() / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert all((a[k] - b[k]).abs().max().item() < 1e-6 for k in a)
    log1, log2 = whole.records("train/log"), killed.records("train/log")
    assert [r["step"] for r in log2] == list(range(1, 11))
    for r1, r2 in zip(log1, log2, strict=True):
        assert all(r1[k] == pytest.approx(r2[k], rel=1e-5, abs=1e-7) for k in r1)


@pytest.mark.usefixtures("organism")
@pytest.mark.slow
def test_a_failed_process_is_reported_with_its_log_and_the_step_stays_undone(tmp_path):
    from em_bench.data import write_chat_jsonl
    from em_bench.organism import world
    from em_bench.tasks import load_task_file

    # three chats make a batch of three, which two processes cannot share in micro-batches of 1
    write_chat_jsonl(tmp_path / "train.jsonl",
                     world.narrow_dataset("legal", "misaligned", "neutral", 3, seed=0))
    (tmp_path / "three.yaml").write_text("name: three\ntrain: {path: train.jsonl}\n")
    task = load_task_file(tmp_path / "three.yaml")
    cfg = CellConfig(task="three", train=TrainConfig(steps=2, grad_accum=2, processes=2))
    store = open_store(tmp_path / "store")
    why = r"ValueError: a step's 3 micro-batches \(a batch of 3 in parts of 1\) do not divide"
    with pytest.raises(TrainingFailed, match=why) as failed:
        run_cell(cfg, store, task)
    cell = store.cell(resolve(cfg, task).cell_id)
    assert str(cell.path / "train" / "torchrun.log") in str(failed.value)
    assert not cell.is_done("train", resolve(cfg, task).step_hash("train"))


def test_processes_share_the_micro_batches():
    assert TrainConfig(batch_size=16, grad_accum=8, processes=4).processes == 4
    with pytest.raises(ValueError, match="grad_accum 1 micro-batches do not divide among 2"):
        TrainConfig(processes=2)


def test_tensor_parallelism_is_vllms_and_a_cell_asks_for_its_gpus():
    assert CellConfig(backend="vllm", tensor_parallel=4).gpus == 4
    assert CellConfig(train=TrainConfig(grad_accum=2, processes=2)).gpus == 2
    with pytest.raises(ValueError, match="tensor_parallel 2 needs backend vllm"):
        CellConfig(tensor_parallel=2)


def test_options_that_make_no_valid_config_are_one_line(tmp_path, capsys):
    code = cli.main(["run", "--processes", "2", "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == ("em-bench: error: TrainConfig: options: grad_accum 1 micro-batches do not "
                   "divide among 2 processes")
    assert not (tmp_path / "s").exists()  # nothing was planned or run


@pytest.mark.usefixtures("organism")
def test_slurm_jobs_must_get_the_gpus_a_cell_uses(tmp_path):
    from em_bench.errors import ConfigError
    from em_bench.grid.plan import plan_grid
    from em_bench.grid.slurm import SlurmExecutor

    plan = plan_grid(CellConfig(), ["finance"], ["none"], [0],
                     train_overrides={"grad_accum": 2, "processes": 2})
    executor = SlurmExecutor(tmp_path / "jobs", cluster="local", gpus_per_cell=1)
    with pytest.raises(ConfigError, match="a cell uses 2 GPUs at once"):
        executor.run(open_store(tmp_path / "store"), plan)
