"""benchmarks/gpu_check: what can be checked without a GPU (the script, its arguments, every step on the CPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_fit_config, synthetic_routing_set

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check


def test_the_shell_wrapper_parses():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)


def test_run_refuses_unprepared_assets(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["run", "--assets", str(tmp_path / "none")])
    assert "not prepared" in capsys.readouterr().err


@pytest.fixture(scope="module")
def assets(tmp_path_factory, shared_data):
    from training.fit import fit_router

    folder = tmp_path_factory.mktemp("gpu_check")
    small = small_fit_config(epochs=2, task_epochs=1, mixes=(0.0,))
    artifact = fit_router(synthetic_routing_set(), small, log=lambda message: None).save(folder / "trained")
    gpu_check.prepare(folder / "assets", artifact, "llmrouter_9model", prompts=300)
    return folder / "assets"


def test_every_step_runs_on_the_cpu(assets, capsys):
    assert gpu_check.main(["run", "--assets", str(assets), "--device", "cpu", "--no-require-gpu", "--rows", "3000",
                           "--batch-size", "32"]) == 0
    output = capsys.readouterr().out
    assert "cosine to the CPU embeddings" in output and "recall@10" in output and "3,000 decisions" in output
    assert "all checks passed" in output


def test_without_a_gpu_the_check_fails_loudly(assets, capsys):
    if gpu_check.torch_cuda_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["run", "--assets", str(assets)]) == 1
    assert "FAILED: no CUDA device" in capsys.readouterr().err
