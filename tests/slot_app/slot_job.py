"""A sweep job that only holds a device slot for a random time, under the real parallel launcher.

Each job writes the slot it held and when it held it to `span.json` in its folder.
"""

import json
import random
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import actlab.launch  # noqa: F401  (registers the resolver the launcher config uses)


@hydra.main(version_base="1.3", config_path=".", config_name="slot_job")
def main(cfg: DictConfig) -> None:
    slot = instantiate(cfg.launch).acquire()
    start = time.time()
    time.sleep(random.Random(cfg.i).uniform(0.05, 0.5))
    span = {"slot": slot.index, "gpu": slot.gpu, "start": start, "end": time.time()}
    slot.release()
    (Path(HydraConfig.get().runtime.output_dir) / "span.json").write_text(json.dumps(span))


if __name__ == "__main__":
    main()
