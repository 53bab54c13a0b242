"""`python train.py [overrides]`: see `python train.py --help` and README.md."""

from actlab.train import main

if __name__ == "__main__":
    main()
