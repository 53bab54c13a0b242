"""A sweep job that only holds a device slot, under the real parallel launcher.

Each job holds its slot until it has seen every slot held at once (or, near the sweep's end, every
job still to finish holding one), then writes the slot it held and when to `span.json` in its
folder. So the jobs provably overlap and use every slot, however fast or loaded the machine: the
outcome depends on the slots' locks alone, never on how long a job happens to take.
"""

import json
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import actlab.launch  # noqa: F401  (registers the resolver the launcher config uses)


@hydra.main(version_base="1.3", config_path=".", config_name="slot_job")
def main(cfg: DictConfig) -> None:
    slots = instantiate(cfg.launch)
    slot = slots.acquire()
    start = time.time()
    sweep = Path(HydraConfig.get().sweep.dir)
    # Waiting workers outnumber the slots, so a free slot is soon taken while jobs remain.
    while slots.busy() < min(len(slots), cfg.jobs - len(list(sweep.glob("*/span.json")))):
        time.sleep(0.01)
    span = {"slot": slot.index, "gpu": slot.gpu, "start": start, "end": time.time()}
    (Path(HydraConfig.get().runtime.output_dir) / "span.json").write_text(json.dumps(span))
    slot.release()


if __name__ == "__main__":
    main()
