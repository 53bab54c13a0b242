"""actlab: what does an activation function do to a network's training?"""

import logging
import warnings
from pathlib import Path

from omegaconf import OmegaConf

# The repository this package is installed from (editable install): configs/, data/ and logs/
# live there whatever the working directory, and `${root:}` names it in the configs.
ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(ROOT / "configs")
OmegaConf.register_new_resolver("root", lambda: str(ROOT), replace=True)

# Raised inside Lightning's own code on every run (torch deprecated a class Lightning still checks
# for); nothing a user can change.
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)

# Every Trainer Lightning builds advertises its own cloud logger (and, with a default checkpoint
# callback, its model registry) in one "💡 Tip" line: not something to act on in this project.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip: For seamless cloud")
)
