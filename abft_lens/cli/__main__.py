"""``python -m abft_lens.cli ...`` is ``abft-lens ...``, as is ``python -m abft_lens``: the README's
``torchrun --nproc_per_node 8 -m abft_lens.cli train ...`` runs through here."""

from abft_lens.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
