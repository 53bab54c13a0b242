"""actlab: what does an activation function do to a network's training?"""

import hashlib
import logging
import warnings
from pathlib import Path

from omegaconf import OmegaConf

# The repository this package is installed from (editable install): configs/, data/ and logs/
# live there whatever the working directory, and `${root:}` names it in the configs.
ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(ROOT / "configs")
OmegaConf.register_new_resolver("root", lambda: str(ROOT), replace=True)

NAME_MAX = 255  # bytes in a file name (Linux, macOS)


def job_dirname(name: str) -> str:
    """A job folder's name from its overrides: as it is, or where it is longer than a file name
    may be, cut and ended by a hash of the whole (two long names stay apart, the same stays the
    same for `+resume=true`)."""
    raw = name.encode()
    if len(raw) <= NAME_MAX:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return f"{raw[: NAME_MAX - len(digest) - 1].decode(errors='ignore')}-{digest}"


OmegaConf.register_new_resolver("actlab.dirname", job_dirname, replace=True)

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
