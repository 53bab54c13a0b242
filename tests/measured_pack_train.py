"""`python tests/measured_pack_train.py OUT [train.py overrides]`: train.py, except that a pack
writes its memory estimate and the memory it used to OUT (probes.measure_pack_memory)."""

import sys

import probes

from actlab.train import main

if __name__ == "__main__":
    probes.measure_pack_memory(sys.argv.pop(1))
    main()
