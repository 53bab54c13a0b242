"""`python eval.py ckpt_path=<run>/checkpoints/<file>.ckpt`: see README.md (Daily loop)."""

from actlab.eval import main

if __name__ == "__main__":
    main()
