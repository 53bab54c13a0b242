"""`python tests/held_pack_train.py EPOCH HOLD [train.py overrides]`: train.py, except that a pack
holds at the start of its epoch EPOCH while the file HOLD exists (probes.hold_packs)."""

import sys

import probes

from actlab.train import main

if __name__ == "__main__":
    epoch, hold = sys.argv.pop(1), sys.argv.pop(1)
    probes.hold_packs(int(epoch), hold)
    main()
