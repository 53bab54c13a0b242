"""actlab: what does an activation function do to a network's training?"""

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
