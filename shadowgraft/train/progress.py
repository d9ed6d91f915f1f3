"""What a training run shows while it runs: a rich bar on a terminal, one line per log row otherwise."""

from __future__ import annotations

from rich.console import Console


class TrainProgress:
    """Context manager fed with the rows written to ``train_log.jsonl``.

    >>> with TrainProgress(total=100, start=0, console=Console(stderr=True)) as p:   # doctest: +SKIP
    ...     p.update({"step": 1, "epoch": 0.01, "loss": 2.3, "lr": 2e-5, "tokens_per_s": 5400.0})
    """

    def __init__(self, *, total: int, start: int, console: Console | None, enabled: bool = True):
        self.total, self.start = total, start
        self.console = console
        self.enabled = enabled and console is not None
        self.bar = None

    def __enter__(self) -> "TrainProgress":
        if self.enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=self.start, loss="-", lr="-", tps="-")
        return self

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        loss, lr, tps = f"{row['loss']:.4f}", f"{row['lr']:.2e}", f"{row['tokens_per_s']:,.0f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], loss=loss, lr=lr, tps=tps)
        else:
            # DPO rows also say how often chosen beats rejected, and by how much.
            dpo = (f"  acc {row['reward_accuracy']:.2f}  margin {row['reward_margin']:.4f}"
                   if "reward_accuracy" in row else "")
            self.console.print(f"step {row['step']}/{self.total}  epoch {row['epoch']:.3f}  loss {loss}{dpo}  lr {lr}  "
                               f"{tps} tok/s", highlight=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
