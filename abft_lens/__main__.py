"""``python -m abft_lens ...`` is ``abft-lens ...`` (torchrun users reach for it first)."""

from abft_lens.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
