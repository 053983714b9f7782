"""Commands over finished run folders: ``report``, ``export``, ``mix``, ``table``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from abft_lens.cli.common import DTYPES, positive_int


def cmd_report(args: argparse.Namespace) -> int:
    from abft_lens.reporting.report import report_from_run

    result = report_from_run(args.run_dir, output=args.output, n_prompts=args.n_prompts, png=args.png)
    print(f"wrote {result.html_path}")
    print(f"comparison: {result.comparison_path}" + (" (reused)" if result.reused else ""))
    if result.png_paths:
        print(f"wrote {len(result.png_paths)} PNG files to {result.png_paths[0].parent}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from abft_lens.reporting.export import export_run

    result = export_run(args.run_dir, args.output, peft=args.peft)
    print(f"wrote {result.output} (base {result.base_hf_dir}, {len(result.changed)} q_proj/k_proj tensors)")
    if result.adapter_dir is not None:
        print(f"PEFT adapter: {result.adapter_dir}")
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from abft_lens.io import write_json
    from abft_lens.reporting.study_folder import check_output
    from abft_lens.studies.mixing import lambda_grid, mix_runs, run_meta
    from abft_lens.training.run_folder import read_trained
    from abft_lens.backends.loading import load_model
    from abft_lens.data.tasks import load_task, task_from_description

    for path, option in ((args.output, "--output"), (args.html, "--html")):
        if path is not None:
            check_output(path, option)
    grid = lambda_grid(args.grid_min, args.grid_max, args.grid_step)
    metas = [run_meta(args.run_e2e), run_meta(args.run_abft)]
    for run_dir in (args.run_e2e, args.run_abft):
        read_trained(run_dir)  # readable and finite, before the model loads
    task = load_task(args.dataset) if args.dataset is not None else None
    if task is not None or len({meta["task"]["name"] for meta in metas}) == 1:
        checked = task if task is not None else task_from_description(metas[0]["task"])
        checked.check_test_prompts(args.k or metas[0]["train"]["k"], args.n_test)
    spec = args.model or metas[0]["model"]["name"]
    dtype = args.dtype or metas[0]["model"].get("dtype") or "float32"
    model = load_model(spec, dtype=DTYPES[dtype])
    result = mix_runs(model, args.run_e2e, args.run_abft, task=task, k=args.k, n_test=args.n_test,
                      lambdas_e2e=grid, lambdas_abft=grid, batch_size=args.batch_size)
    best = result.best
    print(f"accuracy of θ0 + λ_E·Δ_E + λ_A·Δ_A ({result.info['task']}, n={result.info['n_test']}, "
          f"k={result.info['k']})")
    print(result.markdown())
    print(f"best: λ_E={best['lambda_e2e']:g} λ_A={best['lambda_abft']:g} accuracy {best['accuracy']:.4f}")
    if args.output:
        print(f"wrote {write_json(args.output, result.to_dict())}")
    if args.html:
        print(f"wrote {result.save_html(args.html)}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from abft_lens.io import atomic_write_text
    from abft_lens.reporting.study_folder import check_output, is_study_dir
    from abft_lens.reporting.tables import table_from_runs

    if args.output is not None:
        check_output(args.output)
    if len(args.run_dirs) == 1 and is_study_dir(args.run_dirs[0]):  # a study folder: its Table 1
        from abft_lens.reporting.study_render import render_table1
        from abft_lens.reporting.study_tables import MISSING, study_tables

        tables = study_tables(args.run_dirs[0])
        text = render_table1(tables, args.format)
        print(f"wrote {atomic_write_text(args.output, text)}" if args.output else text, end="\n" if args.output else "")
        if tables.missing:  # visible on the terminal, whatever the format or the output file
            n = len(tables.missing)
            print(f"abft-lens: warning: {n} {'cell' if n == 1 else 'cells'} under Missing cells "
                  f"({', '.join(tables.missing)}): {MISSING}.", file=sys.stderr)
        return 0
    table = table_from_runs(args.run_dirs, metric=args.metric)
    text = table.render(args.format)
    if args.output:
        print(f"wrote {table.save(args.output, args.format)}")
    else:
        print(text, end="")
    return 0


def add_parsers(commands) -> None:
    report = commands.add_parser("report", help="one offline HTML page comparing a run's heads before/after training")
    report.add_argument("run_dir", type=Path, help="a run folder (from train or demo)")
    report.add_argument("--output", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)")
    report.add_argument("--n-prompts", dest="n_prompts", type=positive_int, default=64,
                        help="prompts for the head scores (ignored when RUN_DIR/comparison.json exists)")
    report.add_argument("--png", action="store_true", help="also export every figure as PNG (needs Chromium)")
    report.set_defaults(func=cmd_report)

    mix = commands.add_parser("mix", help="accuracy of base + λ_E·Δ_E2E + λ_A·Δ_ABFT over a λ grid (weight mixing)")
    mix.add_argument("run_e2e", type=Path, help="run folder of the E2E run")
    mix.add_argument("run_abft", type=Path, help="run folder of the ABFT run (same base model)")
    mix.add_argument("--model", default=None, help="base model (default: the one in the runs' config.json)")
    mix.add_argument("--dataset", default=None, help="dataset to evaluate on (default: the runs' dataset)")
    mix.add_argument("--k", type=positive_int, default=None, help="demonstrations per prompt (default: the runs' k)")
    mix.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the runs' dtype")
    mix.add_argument("--batch-size", type=positive_int, default=8)
    mix.add_argument("--n-test", type=positive_int, default=64, help="first N fixed test prompts per grid point")
    mix.add_argument("--grid-min", type=float, default=-0.5)
    mix.add_argument("--grid-max", type=float, default=1.5)
    mix.add_argument("--grid-step", type=float, default=0.25)
    mix.add_argument("--output", type=Path, default=None, help="JSON file: grid, best point, every metric")
    mix.add_argument("--html", type=Path, default=None, help="offline HTML page: heatmap and table")
    mix.set_defaults(func=cmd_mix)

    export = commands.add_parser("export", help="write a run's tuned model as a Hugging Face folder (+ PEFT adapter)")
    export.add_argument("run_dir", type=Path, help="a run folder (from train or demo)")
    export.add_argument("--output", type=Path, required=True, help="new folder for the model (must not hold files)")
    export.add_argument("--peft", action="store_true", help="LoRA runs: also write a PEFT adapter in OUTPUT/adapter")
    export.set_defaults(func=cmd_export)

    table = commands.add_parser("table", help="aggregate run folders into a table: mean ± std over seeds")
    table.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                       help="run folders (from train or demo), or one study folder (its Table 1: accuracy with "
                            "p-values, macro-F1, label balance; --metric does not apply)")
    table.add_argument("--format", choices=["markdown", "csv", "html"], default="markdown")
    table.add_argument("--metric", default="accuracy", choices=["accuracy", "macro_f1", "mean_true_label_probability", "ece"])
    table.add_argument("--output", type=Path, default=None, help="file to write (atomically) instead of stdout")
    table.set_defaults(func=cmd_table)
