"""actlab: what does an activation function do to a network's training?"""

from pathlib import Path

from omegaconf import OmegaConf

# The repository this package is installed from (editable install): configs/, data/ and logs/
# live there whatever the working directory, and `${root:}` names it in the configs.
ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(ROOT / "configs")
OmegaConf.register_new_resolver("root", lambda: str(ROOT), replace=True)
