"""Code paths that only run on CUDA: checked on the CPU with torch.cuda's RNG calls stood in for, and on a GPU
where one is present."""
import math

import pytest
import torch

from mtsl_plugin.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


@pytest.fixture
def fake_gpus(monkeypatch):
    """Four CUDA devices as far as the RNG is concerned: each generator's state is a byte tensor of its index;
    reading or writing every device's generator at once fails (it opens a CUDA context on each of them)."""
    states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(4)}

    def every_device(*_):
        raise AssertionError("touched the generator of every GPU")

    def get(device="cuda"):
        return states[torch.device(device).index].clone()

    def put(state, device="cuda"):
        states[torch.device(device).index] = state.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", put)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_device)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_device)
    return states


def test_a_checkpoint_keeps_the_cuda_generator_of_the_runs_device_only(fake_gpus, tmp_path):
    """A checkpoint holds the CUDA generator of the run's own device; on resume it goes into the resuming run's
    device, so under torchrun every rank (rank r on cuda:r) continues the stream rank 0 saved, as before the
    interruption, when every rank drew the same stream. A run off CUDA reads and writes no CUDA generator."""
    fake_gpus[0] = torch.full((8,), 7, dtype=torch.uint8)  # rank 0's generator has drawn
    save_checkpoint(tmp_path / "ckpt.pt", {}, device="cuda:0")
    saved = load_checkpoint(tmp_path / "ckpt.pt")["rng"]
    assert len(saved["cuda"]) == 1 and torch.equal(saved["cuda"][0], fake_gpus[0])
    set_rng_state(saved, "cuda:3")
    assert torch.equal(fake_gpus[3], fake_gpus[0])
    assert int(fake_gpus[1][0]) == 1 and int(fake_gpus[2][0]) == 2  # other GPUs untouched

    assert rng_state("cpu")["cuda"] == []
    set_rng_state(saved, "cpu")  # a GPU run's checkpoint resumed on the CPU: nothing to restore on a GPU
    assert int(fake_gpus[3][0]) == 7


def test_checkpoints_written_with_every_gpus_generator_still_restore(monkeypatch):
    """Files written before one device's state was kept hold a list of every GPU's; they restore as they did."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = {**rng_state("cpu"), "cuda": [torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)]}
    set_rng_state(state, "cuda:0")
    assert len(restored) == 1 and [int(s[0]) for s in restored[0]] == [0, 1]


def test_a_cpu_trainers_checkpoint_touches_no_gpu(fake_gpus, smoke, tmp_path):
    """A run on the CPU of a machine with GPUs saves and resumes without reading any CUDA generator."""
    from mtsl_plugin.experiment import build_data, build_stages, build_trainer, seed_everything
    from mtsl_plugin.plan import BranchingPlan
    from mtsl_plugin.tasks import build_tasks

    config = smoke(tasks=("S", "D"))
    seed_everything(0)
    data, dataset = build_data(config)
    trainer = build_trainer(config, build_tasks(config.tasks, dataset.num_classes),
                            BranchingPlan.single_task(config.tasks, 10), build_stages(config))
    trainer.save(tmp_path / "ckpt.pt")
    assert load_checkpoint(tmp_path / "ckpt.pt")["rng"]["cuda"] == []
    trainer.load(tmp_path / "ckpt.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_checkpoint_resumed_on_a_gpu_keeps_adams_step_counts_on_the_cpu(smoke, tmp_path):
    """Resuming on a GPU leaves the optimizer state as a fresh GPU run has it: moments on the GPU, Adam's step
    counts on the CPU (read onto the GPU, each would cost a device sync per parameter and step), and the GPU's
    generator restored."""
    from mtsl_plugin.experiment import build_data, build_stages, build_trainer, seed_everything
    from mtsl_plugin.plan import BranchingPlan
    from mtsl_plugin.tasks import build_tasks

    config = smoke(tasks=("S", "D")).replace(device="cuda")
    seed_everything(0)
    data, dataset = build_data(config)
    tasks, stages = build_tasks(config.tasks, dataset.num_classes), build_stages(config)
    plan = BranchingPlan.single_task(config.tasks, 10)
    first = build_trainer(config, tasks, plan, stages)
    first.fit(data, 1, checkpoint=tmp_path / "ckpt.pt", progress=False)
    expected = torch.rand(3, device="cuda")
    resumed = build_trainer(config, tasks, plan, stages)
    resumed.load(tmp_path / "ckpt.pt")
    assert torch.equal(torch.rand(3, device="cuda"), expected)
    states = list(resumed.optimizer.state.values())
    assert states and all(s["step"].device.type == "cpu" and s["exp_avg"].is_cuda for s in states)
    resumed.fit(data, 2, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_rng_states_of_a_checkpoint_loaded_onto_a_gpu_restore(tmp_path):
    """``load_checkpoint(map_location="cuda")`` brings the RNG byte tensors to the GPU; torch takes them only on
    the CPU ("RNG state must be a torch.ByteTensor"), so a resume on a GPU failed before they were moved back."""
    torch.manual_seed(5)
    save_checkpoint(tmp_path / "ckpt.pt", {})
    expected = torch.rand(3)
    torch.manual_seed(6)
    set_rng_state(load_checkpoint(tmp_path / "ckpt.pt", map_location="cuda")["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_building_a_network_reseeds_no_gpu_generator(monkeypatch):
    """Encoders, decoders and heads are built under their own seeds inside ``fork_rng(devices=[])``, which restores
    the CPU generator only: seeding with ``torch.manual_seed`` there also reseeded every GPU's generator, for
    good, in the middle of a run."""
    from mtsl_plugin.network.stages import ResNetStages

    def reseeded(*_):
        raise AssertionError("reseeded the GPU generators")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded)
    stages = ResNetStages("resnet18", backbone_args={"channels": (8, 8, 16, 16)})
    stages.build(0), stages.build_head(3, task="S")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("execution", [{}, {"fused": True, "channels_last": True}], ids=["plain", "fused-nhwc"])
def test_mtsl_runs_its_phases_on_a_gpu(smoke, tmp_path, execution):
    """The smoke preset's MTSL end to end on a GPU under bf16 autocast (alignment, measurement, merges with
    averaged Adam state, amalgamation, fine-tuning), plain and fused in NHWC: finite metrics and a merge (every
    task alike at γ 0 merges the first location)."""
    from mtsl_plugin.experiment import run_method

    config = smoke(tasks=("S", "D", "E"), threshold=0.0).replace(device="cuda", **execution)
    result = run_method(config, "mtsl", tmp_path / "run", progress=False)
    assert all(math.isfinite(v) for v in result["metrics"].values())
    assert result["plan"]["partitions"][0] == [["S", "D", "E"]]
