"""A sweep composes its grid once per choice of config groups (hydra_plugins.actlab_grid.composed):
each job's config must be exactly the one Hydra's `load_sweep_config` gives, node for node. A
pack's member reads its `${hydra:...}` values from its own config (actlab.pack.member_from)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import QUICK
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import create_config_search_path
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import Container, DictConfig, ListConfig, Node, OmegaConf, open_dict

from actlab import NAME_MAX, job_dirname
from actlab.pack import member_from
from actlab.train import CONFIG_DIR
from hydra_plugins.actlab_grid import composed


class CountingLoader(ConfigLoaderImpl):
    composes = 0

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> Any:
        self.composes += 1
        return super().load_sweep_config(master_config, sweep_overrides)


def sweep(*overrides: str) -> tuple[CountingLoader, DictConfig, list[list[str]]]:
    """What `train.py -m <overrides>` hands its sweeper: the loader, the multirun's config and the
    grid's jobs (hydra.sweeper.params first, as the sweepers read them)."""
    loader = CountingLoader(config_search_path=create_config_search_path(str(CONFIG_DIR)))
    multirun = [*overrides, "hydra.mode=MULTIRUN"]  # what `-m` adds
    master = loader.load_configuration("train", multirun, run_mode=RunMode.MULTIRUN)
    params = [f"{k}={v}" for k, v in (master.hydra.sweeper.params or {}).items()]
    parser = OverridesParser.create(config_loader=loader)
    task = parser.parse_overrides(params + list(master.hydra.overrides.task))
    (jobs,) = BasicSweeper.split_arguments(task, None)
    return loader, master, jobs


def nodes(cfg: Container) -> list[tuple[str, type, Any, Any]]:
    """Every node of a config, with its type, metadata (flags, types, cache) and value."""
    out = []

    def walk(node: Node, path: str) -> None:
        value = None if isinstance(node, Container) else node._value()
        out.append((path, type(node), node._metadata, value))
        if isinstance(node, Container) and node._is_none() | node._is_missing():
            return
        if isinstance(node, Container) and node._is_interpolation():
            out.append((path, "interpolation", node._value(), None))
        elif isinstance(node, DictConfig):
            for k in node:
                walk(node._get_node(k), f"{path}.{k}")
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                walk(node._get_node(i), f"{path}[{i}]")

    walk(cfg, "")
    return out


# (the command line, how many compositions its grid takes: one per choice of groups)
GRIDS = {
    "values": (["seed=0,1,2", "optimizer.lr=0.1,1e-1,0.5"], 1),
    "quick groups x values": ([*QUICK, "model.act=leaky,prelu,tanh", "seed=0,1"], 3),
    "append, delete, list and dict values": (
        [
            "+trainer.foo=1,2",
            "~callbacks.progress_bar",
            "model.net.hidden_sizes=[8],[8,4]",
            "+extra={a:1}",
        ],
        1,
    ),
    "groups between values, Hydra overrides": (
        [
            "seed=3,4",
            "optimizer=adam,sgd",
            "optimizer.lr=0.1",
            "hydra.job.config.override_dirname.kv_sep=_",
            "hydra.sweep.dir=/nowhere",
        ],
        2,
    ),
    "a value twice, a job twice": (["seed=0,1", "++seed=5,0"], 1),
    "experiment act_compare": (["experiment=act_compare"], 3),
    "experiment slope_sweep": (["experiment=slope_sweep"], 1),
    "experiments x seed": (
        ["experiment=leaky_mlp,dying_relu,relu_vs_linear,leaky_regression,act_all", "seed=0,1"],
        5,
    ),
}


@pytest.mark.parametrize("grid", GRIDS)
def test_each_job_is_composed_as_hydra_composes_it(grid: str) -> None:
    overrides, compositions = GRIDS[grid]
    loader, master, jobs = sweep(*overrides)
    got = list(composed(jobs, loader, master))
    assert loader.composes == compositions, "a composition per choice of groups, no more"
    assert len(got) == len(jobs)
    # The first, a middle and the last job: Hydra takes a third of a second for each.
    for i in sorted({0, len(jobs) // 2, len(jobs) - 1}):
        job, cfg = jobs[i], got[i]
        assert nodes(cfg) == nodes(loader.load_sweep_config(master, job)), job


def test_a_job_the_short_way_fails_for_fails_with_hydras_error() -> None:
    # ReLU has no slope: Hydra's own message, for the first of its jobs.
    loader, master, jobs = sweep("model.act=leaky,relu", "model.act.negative_slope=0.1,0.2")
    got = composed(jobs, loader, master)
    assert [next(got).model.act.negative_slope for _ in range(2)] == [0.1, 0.2]
    with pytest.raises(ConfigCompositionException, match="Could not override 'model.act.negat"):
        next(got)


def test_a_job_alone_in_its_groups_is_composed_once() -> None:
    loader, master, jobs = sweep("model.act=relu,leaky,none")
    assert [c.hydra.runtime.choices["model.act"] for c in composed(jobs, loader, master)] == [
        "relu",
        "leaky",
        "none",
    ]
    assert loader.composes == 3


def test_members_read_their_own_hydra_values_and_leave_hydras_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader, master, jobs = sweep("seed=0,1")
    fulls = list(composed(jobs, loader, master))
    for i, cfg in enumerate(fulls):  # as the packed sweeper writes members.yaml
        with open_dict(cfg):
            cfg.hydra.sweep.dir = str(tmp_path)
            cfg.hydra.runtime.output_dir = str(tmp_path / f"job{i}")
    OmegaConf.save(OmegaConf.create(fulls), tmp_path / "members.yaml")
    # The pack job's own HydraConfig stays, and nothing may set it.
    pack_job = OmegaConf.create({"hydra": {"runtime": {"output_dir": "pack"}}})
    monkeypatch.setattr(HydraConfig.instance(), "cfg", pack_job)
    monkeypatch.setattr(HydraConfig, "__setattr__", lambda *_: pytest.fail("HydraConfig set"))
    for i, full in enumerate(OmegaConf.load(tmp_path / "members.yaml")):
        m = member_from(full, i)
        assert (m.cfg.seed, m.cfg.paths.output_dir, m.out) == (i, str(m.out), tmp_path / f"job{i}")
        assert m.cfg.launch.lock_dir == f"{tmp_path}/.slots"
        # Its `.hydra/` is a solo job's: the config as composed, its overrides.
        task = OmegaConf.to_container(fulls[i])
        del task["hydra"]
        assert OmegaConf.to_container(OmegaConf.load(m.out / ".hydra" / "config.yaml")) == task
        assert OmegaConf.load(m.out / ".hydra" / "overrides.yaml") == [f"seed={i}"]
    assert HydraConfig.instance().cfg is pack_job


def test_a_job_folder_name_longer_than_a_file_name_is_cut_with_a_hash_of_the_whole() -> None:
    short = "model.act=leaky,seed=1"
    assert job_dirname(short) == short
    long = ",".join(f"+model.extra_{i}=value_{i}" for i in range(20))
    other = long[:-1] + "X"  # the same for 254 bytes, another tail
    assert len(long.encode()) > NAME_MAX
    cut, cut_other = job_dirname(long), job_dirname(other)
    assert len(cut.encode()) == len(cut_other.encode()) == NAME_MAX
    assert cut != cut_other and cut == job_dirname(long)  # apart, and the same on resume
    assert cut.startswith(long[:200])
    wide = "model.act=" + "é" * 200  # cut between bytes of a character: the character goes
    assert len(job_dirname(wide).encode()) <= NAME_MAX and "\ufffd" not in job_dirname(wide)
    cfg = OmegaConf.create({"name": long, "subdir": "${actlab.dirname:${name}}"})
    assert cfg.subdir == cut  # as hydra.sweep.subdir resolves it
