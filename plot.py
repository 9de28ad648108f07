"""Training curves from train.py's metrics.jsonl: training loss and dev WER/CER against
minutes (or steps), one run or several on one picture.

    python plot.py runs/<run> --out curve.png
    python plot.py runs/a runs/b --labels "lr 3e-3" "lr 1e-3" --x steps --out compare.png

Needs matplotlib (pip install matplotlib), which the core does not. The minutes are wall-clock
minutes of training and evaluation. A resumed run continues the minutes of the process before
it (each process's clock starts at zero), and a line that a kill cut short is skipped.
"""
import argparse
import json
import numbers
import sys
from pathlib import Path

from data import InputError

# The fields each kind of train.py record must hold, as numbers, to be drawn.
STEP_FIELDS, EVAL_FIELDS = ("wall_seconds", "step", "loss"), ("wall_seconds", "step", "dev_wer", "dev_cer")


def read_metrics(run):
    """(training records, evaluation records) of a run folder or metrics.jsonl, each record with
    its "minutes" since the run started, summed over the processes that trained it."""
    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror}); give a run folder or its "
                         f"metrics.jsonl") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not text; give a run folder or its metrics.jsonl") from None
    steps, evals, offset, last_wall = [], [], 0.0, 0.0
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # cut short by a kill
            continue
        fields = EVAL_FIELDS if isinstance(record, dict) and "dev_wer" in record else STEP_FIELDS
        if not (isinstance(record, dict) and all(isinstance(record.get(f), numbers.Real) for f in fields)):
            continue  # not a train.py record
        wall = record["wall_seconds"]
        if wall < last_wall:  # a resumed process: its clock started again at zero
            offset += last_wall
        last_wall = wall
        record["minutes"] = (offset + wall) / 60
        (evals if "dev_wer" in record else steps).append(record)
    if not steps and not evals:
        raise InputError(f"{path}: no metrics written by train.py in it; give a run folder or its "
                         f"metrics.jsonl")
    return steps, evals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (or their metrics.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="the picture to write (.png, .pdf, .svg)")
    parser.add_argument("--labels", nargs="+", help="one per run (default: the folder names)")
    parser.add_argument("--x", choices=["minutes", "steps"], default="minutes")
    args = parser.parse_args(argv)
    labels = args.labels or [(Path(r) if Path(r).is_dir() else Path(r).parent).name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plot.py needs matplotlib: pip install matplotlib")
    try:
        metrics = [read_metrics(run) for run in args.runs]
    except InputError as e:
        sys.exit(f"error: {e}")
    figure, (loss_axes, error_axes) = plt.subplots(1, 2, figsize=(11, 4))
    if args.out.suffix.lstrip(".").lower() not in figure.canvas.get_supported_filetypes():
        args.out = args.out.with_name(args.out.name + ".png")  # as savefig would name it, said as it is
    x = "minutes" if args.x == "minutes" else "step"
    for n, ((steps, evals), label) in enumerate(zip(metrics, labels)):
        color = f"C{n}"
        loss_axes.plot([r[x] for r in steps], [r["loss"] for r in steps], color=color, label=label)
        error_axes.plot([r[x] for r in evals], [r["dev_wer"] for r in evals], "o-", color=color,
                        label=f"{label}: WER")
        error_axes.plot([r[x] for r in evals], [r["dev_cer"] for r in evals], "s--", color=color,
                        label=f"{label}: CER")
    loss_axes.set(xlabel=f"training {args.x}", ylabel="CTC loss (training)", yscale="log")
    error_axes.set(xlabel=f"training {args.x}", ylabel="dev error %", ylim=(0, 100))
    for axes in (loss_axes, error_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    try:
        figure.savefig(args.out, dpi=110)
    except (OSError, ValueError) as e:
        sys.exit(f"error: --out {args.out}: cannot write it ({e})")
    print(f"{args.out}: {len(args.runs)} run(s)", file=sys.stderr)


if __name__ == "__main__":
    main()
