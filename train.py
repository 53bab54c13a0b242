"""`python train.py [overrides]`: see `python train.py --help` and README.md."""

import gc

# Importing torch and Lightning makes about a million objects and no garbage: the collections
# Python would run meanwhile (7 full ones, 0.5 s here) find nothing, and later ones skip them.
gc.disable()
from actlab.train import main  # noqa: E402

gc.freeze()
gc.enable()

if __name__ == "__main__":
    main()
